"""`os.exec*` in a script: in a fresh job the program replaces the job's process and its status ends
the job. In a resident worker it runs as the invocation's child, with the invocation's
environment, and its status ends the invocation; the worker lives on for the next."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Workflow

SNAKEFILE = """
configfile: "config.yaml"

rule all:
    input: "out/after.txt"

rule hand_over:
    output: "out/{name}.txt"
    resources: sticky="t"
    script: "hand_over.py"

rule after:
    input: "out/first.txt", "out/second.txt"
    output: "out/after.txt"
    resources: sticky="t"
    script: "after.py"
"""

HAND_OVER = """
import os
os.environ["HANDED"] = snakemake.wildcards.name
if snakemake.wildcards.name == "first":
    os.execvp("sh", ["sh", "-c", 'echo "by sh: $HANDED" > "$0"', snakemake.output[0]])
else:
    os.execle("/bin/sh", "sh", "-c", 'echo "by sh with its own: $HANDED" > "$0"', snakemake.output[0], {"HANDED": "given"})
raise SystemExit("never here: exec does not return")
"""

AFTER = """
import os
open(snakemake.output[0], "w").write(f"{os.environ.get('HANDED', 'unset')}\\n")
"""

FAILING = """
import os
os.execv("/bin/sh", ["sh", "-c", "exit 3"])
"""


def exec_workflow(root: Path, slots: int) -> Workflow:
    root.mkdir()
    wf = Workflow(root)
    wf.write("Snakefile", SNAKEFILE)
    wf.write("config.yaml", f"sticky:\n  t: {{setup: t.py, slots: {slots}}}\n")
    wf.write("t.py", "def setup():\n    return None\n")
    wf.write("hand_over.py", HAND_OVER)
    wf.write("after.py", AFTER)
    return wf


def outputs(wf: Workflow) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((wf.root / "out").glob("*.txt"))}


@pytest.mark.parametrize("slots", [1, 2])
def test_exec_in_a_script_ends_its_invocation_with_the_programs_status(tmp_path: Path, slots: int):
    local = exec_workflow(tmp_path / "local", slots)
    run = local.run(executor=None, cores=2)
    assert run.returncode == 0, run.output
    sticky = exec_workflow(tmp_path / "sticky", slots)
    run = sticky.run("--sticky-workers", "1", cores=2)
    assert run.returncode == 0, run.output
    assert outputs(sticky) == outputs(local)
    assert outputs(sticky)["first.txt"] == "by sh: first\n", outputs(sticky)

    sticky.write("hand_over.py", FAILING)
    run = sticky.run("--sticky-workers", "1", "--forcerun", "hand_over", "--keep-going", cores=2)
    assert run.returncode != 0 and "os.execv('/bin/sh', ...), which ended with status 3" in run.output, run.output


SPAWNING = """
import multiprocessing, os

def seen(name):
    return os.environ.get(name, "unset")

if __name__ == "__main__":
    os.environ["SPAWNED_SEES"] = snakemake.wildcards.name
    os.environ.pop("HOME", None)
    with multiprocessing.get_context(snakemake.wildcards.method).Pool(1) as pool:
        found = pool.map(seen, ["SPAWNED_SEES", "HOME"])
    open(snakemake.output[0], "w").write(f"{found}\\n")
"""

SPAWN_SNAKEFILE = """
configfile: "config.yaml"

rule all:
    input: expand("out/{method}-{name}.txt", method=("spawn", "forkserver", "fork"), name=("a", "b"))

rule spawning:
    output: "out/{method}-{name}.txt"
    resources: sticky="t"
    script: "spawning.py"
"""


def test_children_of_every_start_method_get_the_invocations_environment(tmp_path: Path):
    found = {}
    for mode, executor in (("local", None), ("sticky", "sticky")):
        root = tmp_path / mode
        root.mkdir()
        wf = Workflow(root)
        wf.write("Snakefile", SPAWN_SNAKEFILE)
        wf.write("config.yaml", "sticky:\n  t: {setup: t.py, slots: 2}\n")
        wf.write("t.py", "def setup():\n    return None\n")
        wf.write("spawning.py", SPAWNING)
        run = wf.run(*(("--sticky-workers", "1") if executor else ()), executor=executor, cores=2)
        assert run.returncode == 0, run.output
        found[mode] = outputs(wf)
    assert found["sticky"] == found["local"]
    assert found["sticky"]["spawn-a.txt"] == "['a', 'unset']\n", found
