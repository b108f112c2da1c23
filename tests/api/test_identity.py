"""A template's results identity: what decides its results (setup, kwargs, the content of the files
its kwargs name, package versions), hashed; in a rule's params it reruns the template's outputs
when the model changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from snakemake_executor_plugin_sticky.api.identity import FileHashes, named_paths, results_identity

from conftest import Workflow

TEMPLATE = "def setup(model_dir, scale=1):\n    return {'scale': scale}\n"


def config_for(model: str, scale: int = 1, slots: int = 1) -> dict:
    return {"sticky": {"t": {"setup": "t.py", "kwargs": {"model_dir": model, "scale": scale}, "slots": slots}}}


def test_named_paths_are_the_kwargs_that_name_existing_files(tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "w.gguf").write_bytes(b"x")
    kwargs = {"model_dir": "m", "nested": {"file": str(tmp_path / "w.gguf")}, "name": "not-a-path", "n": 3}
    assert named_paths(kwargs, tmp_path) == {"model_dir": tmp_path / "m", "nested.file": tmp_path / "w.gguf"}


def test_the_identity_follows_the_models_bytes_not_the_pool(tmp_path: Path):
    (tmp_path / "t.py").write_text(TEMPLATE)
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    first = results_identity("t", config_for("m"), tmp_path)
    assert first == results_identity("t", config_for("m", slots=4), tmp_path)  # how, not what
    assert first != results_identity("t", config_for("m", scale=2), tmp_path)
    (model / "weights.bin").write_bytes(b"\0" * 999 + b"\1")
    changed = results_identity("t", config_for("m"), tmp_path)
    assert changed != first and len(changed) == 16


def test_a_file_is_hashed_again_only_when_its_size_or_time_changes(tmp_path: Path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 10)
    cache = FileHashes(tmp_path / "cache.json")
    first = cache.of_file(file)
    cache.save()
    again = FileHashes(tmp_path / "cache.json")
    stat = file.stat()
    file.write_bytes(b"b" * 10)  # same size, same time: taken as unchanged, as make would
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again.of_file(file) == first and not again.changed
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert again.of_file(file) != first and again.changed


SNAKEFILE = """
from snakemake_executor_plugin_sticky import sticky_identity

configfile: "config.yaml"

rule all:
    input: expand("out/{i}.txt", i=range(3))

rule score:
    output: "out/{i}.txt"
    params: model=sticky_identity("t", config)
    resources: sticky="t"
    script: "score.py"
"""


def test_a_changed_byte_in_the_model_reruns_the_templates_outputs(workflow: Workflow):
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write("config.yaml", "sticky:\n  t:\n    setup: t.py\n    kwargs: {model_dir: model}\n")
    workflow.write("t.py", TEMPLATE)
    workflow.write("score.py", "open(snakemake.output[0], 'w').write(snakemake.params.model + '\\n')\n")
    (workflow.root / "model").mkdir()
    (workflow.root / "model" / "weights.bin").write_bytes(b"\0" * 4096)
    run = workflow.run("--sticky-workers", "1", cores=2)
    assert run.returncode == 0, run.output
    dry = workflow.run("-n", cores=2)
    assert dry.returncode == 0 and "Nothing to be done" in dry.output, dry.output

    (workflow.root / "model" / "weights.bin").write_bytes(b"\0" * 4095 + b"\1")
    dry = workflow.run("-n", cores=2)
    assert dry.returncode == 0, dry.output
    assert all(f"out/{i}.txt" in dry.output for i in range(3)), dry.output
    assert "Params have changed" in dry.output or "params" in dry.output.lower(), dry.output


def test_what_the_template_staged_in_the_latest_run_counts_and_the_working_directory_does_not(tmp_path: Path):
    (tmp_path / "t.py").write_text("def setup(where='.'):\n    return None\n")
    staged = tmp_path / "elsewhere.bin"
    staged.write_bytes(b"a")
    history = tmp_path / ".snakemake" / "sticky" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text(json.dumps({"templates": {"t": {"staged": [str(staged)]}}}) + "\n")
    config = {"sticky": {"t": {"setup": "t.py", "kwargs": {"where": "."}}}}
    first = results_identity("t", config, tmp_path)
    (tmp_path / "output.txt").write_text("the workflow writes here: no new identity")
    assert results_identity("t", config, tmp_path) == first
    staged.write_bytes(b"bb")
    assert results_identity("t", config, tmp_path) != first
