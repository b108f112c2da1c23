"""The claim-verification demo workflow, end to end at a tiny size, with real torch + transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from snakemake_executor_plugin_sticky.api import stage as staging

from conftest import Workflow
from helpers import noise

DEMO = Path(__file__).resolve().parents[2] / "workflow"


@pytest.fixture
def demo(workflow: Workflow) -> Workflow:
    shutil.copytree(DEMO, workflow.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("results", ".snakemake"))
    return workflow


def demo_config(demo: Workflow) -> dict:
    return yaml.safe_load(demo.read("config/config.yaml"))


def verdicts(demo: Workflow) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((demo.root / "results/verdicts").glob("*.jsonl"))}


def test_demo_gives_the_same_verdicts_under_sticky_and_local_executors(demo: Workflow):
    size = ["--config", "claims=30", "claims_per_invocation=8", "batch_size=4"]
    sticky = demo.run(*size)
    assert sticky.returncode == 0, sticky.output
    summary = json.loads(demo.read("results/summary.json"))
    assert summary["claims"] == 30 and summary["labelled"] == 30
    assert sum(summary["predicted"].values()) == 30
    assert sum(sum(row.values()) for row in summary["confusion"].values()) == 30
    assert summary["gold"] == {"SUPPORTS": 10, "REFUTES": 10, "NOT ENOUGH INFO": 10}
    assert "random weights" in summary["note"] and "random weights" in demo.read("results/summary.md")
    sticky_verdicts = verdicts(demo)
    assert len(sticky_verdicts) == 4  # ceil(30 / 8) invocations
    # the shell step asked the first claim through the endpoint: the template's own verdict
    asked = json.loads(demo.read("results/asked.json"))
    first = json.loads(sticky_verdicts["00000.jsonl"].splitlines()[0])
    claim = json.loads(demo.read("results/claims.jsonl").splitlines()[0])
    assert f"Evidence: {claim['evidence'][0]}\nClaim: {claim['claim']}\nVerdict:" == demo_config(demo)["question"]
    assert asked["choices"][0]["message"]["content"] == first["predicted"], asked
    loads = [demo.read(f"results/logs/verify/{shard}") for shard in ("00000.log", "00003.log")]
    assert all("was loaded in" in log for log in loads)

    shutil.rmtree(demo.root / "results/verdicts")
    (demo.root / "results/summary.json").unlink()
    local = demo.run(*size, executor="local", cores=2)
    assert local.returncode == 0, local.output
    assert verdicts(demo) == sticky_verdicts, "the sticky path must not change results"
    assert demo.leftover_processes() == []


def test_a_cold_demo_stages_its_model_at_copy_speed_and_logs_no_warning(demo: Workflow, tmp_path: Path):
    run = demo.run("--config", "claims=24", "claims_per_invocation=4", "--sticky-cache-dir", str(tmp_path / "cache"))
    assert run.returncode == 0, run.output
    # its workers retire while the run goes on: the summary runs after them
    assert run.output.index("retiring 2 worker(s)") < run.output.index("localrule summarize")
    assert noise(run.output) == [], run.output
    report = json.loads(demo.read(".snakemake/sticky/report.json"))
    (cold,) = [s for w in report["templates"]["llm"]["workers"] for s in w["stagings"] if s["from"] == "shared"]
    assert cold["seconds"] - cold["copy_seconds"] < staging.ANNOUNCE_WAIT_S / 2, cold
    assert demo.leftover_processes() == []


def test_malformed_claims_line_fails_naming_file_and_line(demo: Workflow):
    good = {
        "id": 1,
        "claim": "Paris is the capital of France.",
        "evidence": ["The capital of France is Paris."],
        "label": "SUPPORTS",
    }
    demo.write(
        "my_claims.jsonl",
        "\n".join(
            [
                json.dumps(good),
                json.dumps({**good, "id": 2}),
                '{"id": 3, "claim": "broken",',
                json.dumps({**good, "id": 4}),
            ]
        ),
    )
    run = demo.run("--config", "claims_file=my_claims.jsonl", timeout=120)
    assert run.returncode != 0
    assert "my_claims.jsonl, line 3: not valid JSON" in run.output, run.output
    assert not (demo.root / "results/verdicts").exists()


def test_real_fever_file_shape_is_accepted(demo: Workflow):
    """FEVER's own files carry evidence as page ids, and test sets have no labels."""
    rows = [
        {
            "id": 75397,
            "verifiable": "VERIFIABLE",
            "label": "SUPPORTS",
            "claim": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
            "evidence": [[[92206, 104971, "Nikolaj_Coster-Waldau", 7], [92206, 104971, "Fox_Broadcasting_Company", 0]]],
        },
        {
            "id": 150448,
            "verifiable": "NOT VERIFIABLE",
            "label": "NOT ENOUGH INFO",
            "claim": "Roman Atwood is a content creator.",
            "evidence": [[[174271, None, None, None]]],
        },
        {"id": 3, "claim": "A claim from a test set, without a label.", "evidence": []},
    ]
    demo.write("fever.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    run = demo.run("--config", "claims_file=fever.jsonl", "claims_per_invocation=2")
    assert run.returncode == 0, run.output
    summary = json.loads(demo.read("results/summary.json"))
    assert summary["claims"] == 3 and summary["labelled"] == 2
