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
        for name in ("shell.txt", "run.txt", "script.txt", "piped.txt", "shadowed.txt", "bench.txt", "bench.tsv", "logged.txt"):
            (workflow.root / name).unlink()
    assert produced["sticky"] == produced[None]
    assert produced["sticky"]["script.txt"] == "42 script_rule\n"
    assert produced["sticky"]["piped.txt"].strip() == "2"
    assert produced["sticky"]["shell.txt"] == "threads=2\n"
    assert produced["sticky"]["logs/logged.log"] == "to-log\n"
    assert workflow.leftover_processes() == []
