"""Jobs without a `sticky` resource run exactly as under Snakemake's local executor."""

from __future__ import annotations

from conftest import Workflow

SNAKEFILE = """
rule all:
    input: "shell.txt", "run.txt", "script.txt", "piped.txt", "shadowed.txt", "bench.tsv", "logged.txt"
rule shell_rule:
    output: "shell.txt"
    threads: 2
    shell: "echo threads={threads} > {output}"
rule run_rule:
    output: "run.txt"
    params: word="ran"
    run:
        with open(output[0], "w") as f:
            f.write(params.word + "\\n")
rule script_rule:
    output: "script.txt"
    params: value=42
    script: "scripts/plain.py"
rule producer:
    output: pipe("stream.pipe")
    shell: "printf 'a\\\\nb\\\\n' > {output}"
rule consumer:
    input: "stream.pipe"
    output: "piped.txt"
    shell: "wc -l < {input} > {output}"
rule shadow_rule:
    output: "shadowed.txt"
    shadow: "minimal"
    shell: "touch scratch.tmp && echo shadow > {output}"
rule bench_rule:
    output: "bench.txt"
    benchmark: "bench.tsv"
    shell: "echo bench > {output}"
rule logged_rule:
    output: "logged.txt"
    log: "logs/logged.log"
    shell: "(echo to-log >&2; echo out > {output}) 2> {log}"
"""


def test_non_sticky_jobs_behave_as_under_the_local_executor(workflow: Workflow):
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write(
        "scripts/plain.py",
        "open(snakemake.output[0], 'w').write(f'{snakemake.params.value} {snakemake.rule}\\n')\n",
    )
    produced = {}
    for executor in ("sticky", None):
        run = workflow.run("bench.txt", "all", executor=executor)
        assert run.returncode == 0, run.output
        produced[executor] = {
            name: workflow.read(name)
            for name in ("shell.txt", "run.txt", "script.txt", "piped.txt", "shadowed.txt", "logs/logged.log")
        }
        assert (workflow.root / "bench.tsv").read_text().startswith("s\th:m:s")
        assert not (workflow.root / "scratch.tmp").exists(), "the shadow rule ran in its shadow folder"
        for name in (
            "shell.txt",
            "run.txt",
            "script.txt",
            "piped.txt",
            "shadowed.txt",
            "bench.txt",
            "bench.tsv",
            "logged.txt",
        ):
            (workflow.root / name).unlink()
    assert produced["sticky"] == produced[None]
    assert produced["sticky"]["script.txt"] == "42 script_rule\n"
    assert produced["sticky"]["piped.txt"].strip() == "2"
    assert produced["sticky"]["shell.txt"] == "threads=2\n"
    assert produced["sticky"]["logs/logged.log"] == "to-log\n"
    assert workflow.leftover_processes() == []


def test_jobs_after_sticky_workers_started_keep_the_users_environment(workflow: Workflow):
    """Dask gives its workers an environment of its own (malloc trimming, one BLAS thread, a fixed
    hash seed); a spawning Nanny would set it in the Snakemake process itself, and every later
    local job would inherit it. (Snakemake sets OMP_NUM_THREADS per job itself.)"""
    workflow.write(
        "Snakefile",
        """
        configfile: "config.yaml"
        rule all:
            input: "local.txt"
        rule sticky_first:
            output: "worker.txt"
            resources: sticky="probe"
            script: "scripts/env.py"
        rule local_after:
            input: "worker.txt"
            output: "local.txt"
            script: "scripts/env.py"
        """,
    )
    workflow.write("config.yaml", "sticky:\n  probe:\n    setup: probe.py\n")
    workflow.write("probe.py", "def setup():\n    return {}\n")
    workflow.write(
        "scripts/env.py",
        """
        import os
        from snakemake_executor_plugin_sticky import sticky_state
        if snakemake.rule == "sticky_first":
            sticky_state(snakemake)
        with open(snakemake.output[0], "w") as f:
            f.write(os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset") + "\\n")
        """,
    )
    run = workflow.run(unset=("MALLOC_TRIM_THRESHOLD_",))
    assert run.returncode == 0, run.output
    assert workflow.read("worker.txt") == "65536\n", "a worker gets Dask's malloc trimming"
    assert workflow.read("local.txt") == "unset\n", "a local job sees the user's environment"
    # and, as with Dask's own Nannies, what the user sets wins in the workers too
    run = workflow.run("--forceall", env={"MALLOC_TRIM_THRESHOLD_": "123"})
    assert run.returncode == 0, run.output
    assert workflow.read("worker.txt") == "123\n" and workflow.read("local.txt") == "123\n"
