"""No error becomes a hang: a failure injected into each background path of the plugin ends the
run with a message that says what failed, and leaves no process behind.

Each run is the real `snakemake` CLI in a Python process that first replaces one function of the
plugin with one that raises (a wrapper script; nothing in the plugin knows about it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import Workflow, snakemake_env
from helpers import LLM_TEMPLATE, ONE_TEMPLATE_SNAKEFILE, sticky_workflow

INJECT = """
import sys
from importlib import import_module

target, name, when = sys.argv[1], sys.argv[2], sys.argv[3]
owner = import_module(target.rsplit(":", 1)[0])
for part in target.rsplit(":", 1)[1].split(".") if ":" in target else []:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = []

def injected(*args, **kwargs):
    calls.append(1)
    if when == "always" or len(calls) == int(when):
        raise RuntimeError(f"injected failure in {name}")
    return original(*args, **kwargs)

setattr(owner, name, injected)
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[4:]]
main()
"""

# Where a failure is injected: (module[:class], function, on which call).
PATHS = {
    "dispatch": ("snakemake_executor_plugin_sticky.head.engines.base:DaskBackend", "submit", "1"),
    "engine events": ("snakemake_executor_plugin_sticky.head.executor:Executor", "worker_event", "always"),
    "result collection": ("snakemake_executor_plugin_sticky.head.engines.base:DaskBackend", "_complete", "2"),
    "completion delivery": ("snakemake_executor_plugin_sticky.head.executor:Executor", "tell_snakemake", "2"),
    "backend start": ("snakemake_executor_plugin_sticky.head.engines.local:EmbeddedBackend", "__init__", "always"),
    "worker start": ("snakemake_executor_plugin_sticky.head.engines.local:EmbeddedBackend", "_nanny", "always"),
}

LATE_SNAKEFILE = """
configfile: "config.yaml"
N = int(config.get("count", 12))
rule all:
    input: expand("out/{i}.json", i=range(N))
rule first:
    output: "first.txt"
    shell: "echo first > {output}"
rule infer:
    input: "first.txt"
    output: "out/{i}.json"
    params: sleep=0
    resources: sticky="llm"
    script: "scripts/record.py"
"""


# The engine starts at once when sticky jobs are ready from the start, else with the first one.
CASES = [(path, "at once") for path in PATHS] + [
    ("backend start", "after a local job"),
    ("dispatch", "after a local job"),
]


@pytest.mark.parametrize("path, start", CASES)
def test_a_failure_in_a_background_path_ends_the_run_with_its_message(workflow: Workflow, path: str, start: str):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE if start == "at once" else LATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("inject.py", INJECT)
    target, name, when = PATHS[path]
    run = subprocess.run(
        [
            sys.executable,
            "inject.py",
            target,
            name,
            when,
            "--executor",
            "sticky",
            "--cores",
            "4",
            "--nocolor",
            "--sticky-workers",
            "2",
            "--config",
            "count=6",
        ],
        cwd=workflow.root,
        env=snakemake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    assert run.returncode != 0, run.stdout
    assert f"injected failure in {name}" in run.stdout, run.stdout
    assert workflow.leftover_processes() == []
