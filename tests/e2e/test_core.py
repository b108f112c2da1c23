"""End-to-end behaviour of `--executor sticky` with real Snakemake (CLI) and real Dask."""

from __future__ import annotations

import json
import shutil
import time

from conftest import Workflow, interrupt
from helpers import (
    LLM_TEMPLATE,
    ONE_TEMPLATE_SNAKEFILE,
    RECORD_SCRIPT,
    clear_fidelity_results,
    fidelity_results,
    fidelity_workflow,
    noise,
    outputs,
    report_of,
    sticky_workflow,
)


def test_state_built_once_per_worker_reused_and_torn_down(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    run = workflow.run("--sticky-workers", "2", "--config", "count=16")
    assert run.returncode == 0, run.output
    # invocations are ready from the start, so their workers start before any job
    assert run.output.index("starting worker 2/2") < run.output.index("Execute")

    setups = workflow.lines("setups-llm.txt")
    assert len(setups) == 2 and len(set(setups)) == 2, setups
    results = outputs(workflow, "out/*.json")
    assert len(results) == 16
    # every invocation ran in a process that built the state, and used that resident state
    assert {r["pid"] for r in results} <= set(map(int, setups))
    assert all(r["state_pid"] == r["pid"] for r in results)
    # the state persisted between invocations: each worker's call counter kept growing
    per_worker = {}
    for r in results:
        per_worker.setdefault(r["pid"], []).append(r["calls"])
    assert sum(max(calls) for calls in per_worker.values()) == 16
    assert sorted(workflow.lines("teardowns-llm.txt")) == sorted(setups)
    assert workflow.leftover_processes() == []


def test_invocations_run_side_by_side_on_all_workers(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    run = workflow.run("--sticky-workers", "4", "--config", "count=4", "sleep=3", cores=4)
    assert run.returncode == 0, run.output
    results = outputs(workflow, "out/*.json")
    assert len({r["pid"] for r in results}) == 4, "each of the 4 workers should take one invocation"
    assert max(r["started"] for r in results) < min(r["finished"] for r in results), "all 4 overlap"


def test_mixed_rules_two_templates_and_what_the_script_sees(workflow: Workflow):
    sticky_workflow(
        workflow,
        """
        configfile: "config.yaml"
        rule all:
            input: expand("a/{sample}.json", sample=["x", "y"]), "b/z.json", "plain/done.txt", "runblock.txt"
        rule with_a:
            output: "a/{sample}.json"
            log: "logs/a/{sample}.log"
            params: sleep=0, greeting=lambda wc: f"hi {wc.sample}"
            threads: 2
            resources: sticky="alpha"
            script: "scripts/record.py"
        rule with_b:
            input: "plain/done.txt"
            output: "b/{sample}.json"
            params: sleep=0
            resources: sticky="beta"
            script: "scripts/record.py"
        rule plain_shell:
            output: "plain/done.txt"
            shell: "echo plain > {output}"
        rule plain_run:
            output: "runblock.txt"
            run:
                with open(output[0], "w") as f:
                    f.write("run block\\n")
        """,
        """
        sticky:
          alpha:
            setup: templates/counting.py
            kwargs: {name: alpha}
          beta:
            setup: templates/counting.py
            kwargs: {name: beta}
            slots: 2
        """,
    )
    run = workflow.run()
    assert run.returncode == 0, run.output
    x, y = outputs(workflow, "a/*.json")
    (z,) = outputs(workflow, "b/*.json")
    assert x["template"] == y["template"] == "alpha" and z["template"] == "beta"
    assert z["pid"] not in (x["pid"], y["pid"]), "each template has workers of its own"
    assert len(workflow.lines("setups-alpha.txt")) == 1 and len(workflow.lines("setups-beta.txt")) == 1
    assert x["wildcards"] == {"sample": "x"} and x["params"]["greeting"] == "hi x"
    assert x["threads"] == 2 and x["rule"] == "with_a" and x["resources_sticky"] == "alpha"
    assert x["scriptdir"] == str(workflow.root / "scripts")
    assert workflow.read("logs/a/y.log") == "log of with_a {'sample': 'y'}\n"
    assert workflow.read("plain/done.txt") == "plain\n" and workflow.read("runblock.txt") == "run block\n"
    # print() in the script reaches the user
    assert "stdout of a/x.json" in run.output and "stderr of b/z.json" in run.output
    assert workflow.leftover_processes() == []


def test_a_template_retires_when_its_last_job_is_done(workflow: Workflow):
    sticky_workflow(
        workflow,
        """
        configfile: "config.yaml"
        rule all:
            input: "timeline-seen.txt"
        rule first:
            output: "first/{i}.json"
            params: sleep=0
            resources: sticky="alpha"
            script: "scripts/record.py"
        rule second:
            input: expand("first/{i}.json", i=range(3))
            output: "second/{i}.json"
            params: sleep=0
            resources: sticky="beta"
            script: "scripts/record.py"
        rule after_the_sticky_jobs:  # a local job: by its time the timeline is drawn
            input: expand("second/{i}.json", i=range(3))
            output: "timeline-seen.txt"
            shell: "for i in $(seq 100); do test -s .snakemake/sticky/timeline.png && break; sleep 0.1; done; test -s .snakemake/sticky/timeline.png && touch {output}"
        """,
        """
        sticky:
          alpha:
            setup: templates/counting.py
            kwargs: {name: alpha}
          beta:
            setup: templates/counting.py
            kwargs: {name: beta, delay: 1.0}
        """,
    )
    run = workflow.run("--sticky-workers", "2", "--sticky-dashboard-address", "127.0.0.1:0")
    assert run.returncode == 0, run.output
    assert "Sticky template 'alpha': all its jobs are done; retiring 2 worker(s)." in run.output, run.output
    # the dashboard is attached once, though beta's pool starts after alpha's is gone
    assert run.output.count("Dask dashboard of the sticky workers") == 1, run.output
    assert "dashboard could not start" not in run.output
    # alpha's workers tore down their state while the run went on, before beta's jobs ran
    assert len(workflow.lines("teardowns-alpha.txt")) == 2
    torn_down = (workflow.root / "teardowns-alpha.txt").stat().st_mtime
    assert torn_down < min(r["started"] for r in outputs(workflow, "second/*.json"))
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))
    assert report["templates"]["alpha"]["workers_lost"] == 0
    assert all(w["retired"] for w in report["templates"]["alpha"]["workers"])
    assert "lose already computed" not in run.output
    assert noise(run.output) == [], run.output  # workers that retire mid-run close without a word
    assert workflow.leftover_processes() == []


def test_the_executor_says_when_the_window_leaves_workers_waiting(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0"))
    expected = {
        1: ["Sticky workers offer 2 invocation slots but --cores 1 lets Snakemake run at most 1 jobs"],
        2: [
            "Sticky workers offer 2 invocation slots and --cores 2 lets Snakemake run 2 jobs at once",
            "--cores 8 keeps invocations queued behind the running ones",
        ],
        8: [],
    }
    for cores, messages in expected.items():
        shutil.rmtree(workflow.root / "out", ignore_errors=True)
        run = workflow.run("--sticky-workers", "2", "--config", "count=2", cores=cores)
        assert run.returncode == 0, run.output
        assert all(m in run.output for m in messages), run.output
        if not messages:
            assert "Sticky workers offer" not in run.output, run.output
        assert LARGE_RUN_HINT not in run.output, "2 jobs are not a large run"


LARGE_RUN_HINT = "sticky jobs, and Snakemake's default ILP scheduler solves a problem over every ready job"


def test_the_executor_points_a_large_run_to_faster_scheduling(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0"))
    run = workflow.run("--sticky-workers", "2", "--config", "count=200", cores=32)
    assert run.returncode == 0, run.output
    assert f"200 {LARGE_RUN_HINT}" in run.output, run.output
    assert "--scheduler firstfit --scheduler-subsample 256" in run.output
    assert "pip install" not in run.output, "the firstfit scheduler is installed here"
    assert len(outputs(workflow, "out/*.json")) == 200


def test_failing_invocation_fails_its_job_only_and_state_survives(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "scripts/record.py",
        "def explode(i):\n    raise ValueError(f'bad claim {i}')\n\n"
        "if snakemake.wildcards.i == '3':\n    explode(snakemake.wildcards.i)\n" + RECORD_SCRIPT,
    )
    run = workflow.run("--sticky-workers", "1", "--keep-going", "--config", "count=6")
    assert run.returncode != 0
    assert "ValueError: bad claim 3" in run.output
    assert 'record.py", line 2, in explode' in run.output, "the traceback points into the script"
    assert "Error in rule infer" in run.output
    results = outputs(workflow, "out/*.json")
    assert len(results) == 5
    assert len(workflow.lines("setups-llm.txt")) == 1, "the state survived the error"
    assert max(r["calls"] for r in results) == 5
    assert len(workflow.lines("teardowns-llm.txt")) == 1
    assert workflow.leftover_processes() == []


def test_setup_that_raises_fails_invocations_naming_template_after_bounded_attempts(workflow: Workflow):
    sticky_workflow(
        workflow,
        ONE_TEMPLATE_SNAKEFILE,
        """
        sticky:
          llm:
            setup: templates/counting.py
            kwargs: {name: llm, fail: true}
        """,
    )
    run = workflow.run(
        "--sticky-workers",
        "1",
        "--sticky-setup-attempts",
        "3",
        "--sticky-setup-retry-delay",
        "0.2",
        "--config",
        "count=3",
        timeout=120,
    )
    assert run.returncode != 0
    assert "Sticky template 'llm'" in run.output and "could not be set up after 3 attempt(s)" in run.output
    assert "RuntimeError: cannot load model for llm" in run.output
    assert len(workflow.lines("setups-llm.txt")) == 3, "exactly the bounded number of attempts"
    assert not list(workflow.root.glob("out/*.json"))
    assert workflow.leftover_processes() == []


def test_same_outputs_under_sticky_and_local_executor(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "scripts/record.py",
        """
        from snakemake_executor_plugin_sticky import sticky_state
        state = sticky_state(snakemake)
        with open(snakemake.output[0], "w") as f:
            f.write(f"{state['name']} {snakemake.wildcards.i} {int(snakemake.wildcards.i) ** 2}\\n")
        """,
    )
    sticky = workflow.run("--sticky-workers", "2", "--config", "count=5")
    assert sticky.returncode == 0, sticky.output
    sticky_outputs = {p.name: p.read_text() for p in workflow.root.glob("out/*.json")}
    assert len(workflow.lines("setups-llm.txt")) == 2

    for p in workflow.root.glob("out/*.json"):
        p.unlink()
    (workflow.root / "setups-llm.txt").unlink()
    local = workflow.run("--config", "count=5", executor=None, cores=2)
    assert local.returncode == 0, local.output
    assert {p.name: p.read_text() for p in workflow.root.glob("out/*.json")} == sticky_outputs
    # create-destroy: every invocation built the state itself
    assert len(workflow.lines("setups-llm.txt")) == 5
    assert len(workflow.lines("teardowns-llm.txt")) == 2 + 5


def test_ctrl_c_stops_everything(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=8", "sleep=30")
    deadline = time.monotonic() + 60
    while len(workflow.lines("setups-llm.txt")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # invocations are now sleeping inside the workers
    interrupted = time.monotonic()
    interrupt(proc)
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - interrupted < 30, output
    assert proc.returncode != 0
    assert workflow.leftover_processes(wait_s=10) == [], output
    assert not list(workflow.root.glob("out/*.json"))


def test_failed_workflow_leaves_no_process(workflow: Workflow):
    sticky_workflow(
        workflow,
        """
        configfile: "config.yaml"
        rule all:
            input: "out/sticky.json", "out/broken.txt"
        rule infer:
            output: "out/sticky.json"
            params: sleep=2
            resources: sticky="llm"
            script: "scripts/record.py"
        rule broken:
            output: "out/broken.txt"
            shell: "exit 1"
        """,
        LLM_TEMPLATE,
    )
    run = workflow.run()
    assert run.returncode != 0
    assert "Error in rule broken" in run.output
    assert workflow.leftover_processes() == []


def test_retries_rerun_a_failed_invocation_on_the_resident_state(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "scripts/record.py",
        """
        import os
        from snakemake_executor_plugin_sticky import sticky_state
        state = sticky_state(snakemake)
        marker = f"attempted-{snakemake.wildcards.i}"
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("flaky first attempt")
        open(snakemake.output[0], "w").write(str(state["pid"]))
        """,
    )
    run = workflow.run("--sticky-workers", "1", "--retries", "1", "--config", "count=2")
    assert run.returncode == 0, run.output
    assert run.output.count("RuntimeError: flaky first attempt") == 2
    assert len(workflow.lines("setups-llm.txt")) == 1


def test_workers_are_pinned_to_their_gpus(workflow: Workflow):
    """Each worker sees only its own GPU ids (no CUDA needed to check the pinning itself)."""
    sticky_workflow(
        workflow,
        ONE_TEMPLATE_SNAKEFILE,
        """
        sticky:
          llm:
            setup: templates/counting.py
            kwargs: {name: llm}
            gpus: 1
        """,
    )
    workflow.write(
        "scripts/record.py",
        """
        import os, time
        from snakemake_executor_plugin_sticky import sticky_state
        sticky_state(snakemake)
        time.sleep(1)
        open(snakemake.output[0], "w").write(f"{os.getpid()} {os.environ['CUDA_VISIBLE_DEVICES']}")
        """,
    )
    run = workflow.run("--config", "count=6", env={"CUDA_VISIBLE_DEVICES": "3,5"})
    assert run.returncode == 0, run.output
    seen = {tuple(p.read_text().split()) for p in workflow.root.glob("out/*.json")}
    assert {gpu for _, gpu in seen} == {"3", "5"}, "one worker per visible GPU, each pinned to one"
    assert len({pid for pid, _ in seen}) == 2


def test_template_may_read_what_upstream_jobs_write(workflow: Workflow):
    """Workers of a template whose invocations wait on upstream jobs start after those jobs."""
    workflow.write(
        "Snakefile",
        """
        configfile: "config.yaml"
        rule all:
            input: expand("out/{i}.txt", i=range(3))
        rule weights:
            output: "weights.txt"
            shell: "sleep 2 && echo 7 > {output}"
        rule infer:
            input: "weights.txt"
            output: "out/{i}.txt"
            resources: sticky="reader"
            script: "scripts/use.py"
        """,
    )
    workflow.write(
        "config.yaml", "sticky:\n  reader:\n    setup: templates/reader.py\n    kwargs: {path: weights.txt}\n"
    )
    workflow.write("templates/reader.py", "def setup(path):\n    return open(path).read().strip()\n")
    workflow.write(
        "scripts/use.py",
        "from snakemake_executor_plugin_sticky import sticky_state\n"
        "open(snakemake.output[0], 'w').write(sticky_state(snakemake))\n",
    )
    run = workflow.run("--sticky-setup-attempts", "1")
    assert run.returncode == 0, run.output
    assert [workflow.read(f"out/{i}.txt") for i in range(3)] == ["7"] * 3
    assert run.output.index("rule weights") < run.output.index("starting worker 1/1")


def test_workers_are_forked_from_a_forkserver_that_leaves_with_snakemake(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "scripts/record.py",
        """
        import json, os
        import psutil
        from snakemake_executor_plugin_sticky import sticky_state
        sticky_state(snakemake)
        parent = psutil.Process(os.getppid())
        with open(snakemake.output[0], "w") as f:
            json.dump({"parent": parent.cmdline(), "grandparent": parent.parent().pid}, f)
        """,
    )
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=4")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    results = outputs(workflow, "out/*.json")
    # forked from multiprocessing's forkserver, itself a child of Snakemake, not from Snakemake
    assert all("forkserver" in " ".join(r["parent"]) for r in results)
    assert {r["grandparent"] for r in results} == {proc.pid}
    # it leaves at once with Snakemake (holding Snakemake's output open a moment longer otherwise)
    assert workflow.leftover_processes(wait_s=1.0) == []


def test_scripts_see_their_outputs_on_local_workers_as_under_the_local_executor(workflow: Workflow):
    fidelity_workflow(workflow)
    local = workflow.run("--keep-going", executor="local", cores=2)
    assert local.returncode != 0 and local.output.count("Error in rule crash") == 2, local.output
    expected = fidelity_results(workflow)
    clear_fidelity_results(workflow)
    run = workflow.run("--keep-going", "--sticky-workers", "2", "--sticky-invocation-crashes", "1")
    assert run.returncode != 0 and run.output.count("Error in rule crash") == 2, run.output
    assert fidelity_results(workflow) == expected
    assert workflow.leftover_processes() == []


JOB_ENVIRONMENT = """
import os, sys, tempfile
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
names = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")
with open(snakemake.output[0], "w") as f:
    f.write(" ".join(f"{n}={os.environ.get(n)}" for n in names) + f" tempfile={tempfile.gettempdir()}\\n")
sys.stderr = open(snakemake.log[0], "w")
print("before the failure", file=sys.stderr)
if snakemake.wildcards.i == "1":
    raise ValueError("a failure whose traceback the log holds")
"""


def test_a_script_gets_snakemakes_job_environment_and_its_traceback_lands_in_its_log(workflow: Workflow):
    """TMPDIR and its kin from the rule's tmpdir resource, `tempfile` following them; a script
    that points sys.stderr at its log and fails finds its traceback there, as in a fresh process."""
    snakefile = """
        configfile: "config.yaml"
        rule all:
            input: expand("out/{i}.txt", i=range(2))
        rule job:
            output: "out/{i}.txt"
            log: "logs/{i}.log"
            resources: sticky="llm", tmpdir=lambda wildcards: os.path.abspath(f"tmp-{wildcards.i}")
            script: "scripts/job.py"
    """
    sticky_workflow(workflow, snakefile, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/job.py", JOB_ENVIRONMENT)
    for i in range(2):
        (workflow.root / f"tmp-{i}").mkdir()
    found = {}
    for executor in ("local", "sticky"):
        sticky = ["--sticky-workers", "1"] if executor == "sticky" else []
        run = workflow.run("--keep-going", *sticky, executor=executor, cores=1)
        assert run.returncode != 0, run.output
        if executor == "sticky":  # and in Snakemake's error message, where the local run had it nowhere else
            assert "ValueError: a failure whose traceback the log holds" in run.output, run.output
        failed = workflow.read("logs/1.log").splitlines()  # the frames' file names and lines are the runner's own
        found[executor] = (workflow.read("out/0.txt"), workflow.read("logs/0.log"), failed[0], failed[1], failed[-1])
        shutil.rmtree(workflow.root / "out")
        shutil.rmtree(workflow.root / "logs")
    assert found["sticky"] == found["local"]
    tmp = str(workflow.root / "tmp-0")
    assert found["local"][0] == f"TMPDIR={tmp} TMP={tmp} TEMP={tmp} TEMPDIR={tmp} tempfile={tmp}\n"
    assert found["local"][2:] == (
        "before the failure",
        "Traceback (most recent call last):",
        "ValueError: a failure whose traceback the log holds",
    )


def test_what_setup_sets_in_the_process_stays_though_an_invocation_came_during_setup(workflow: Workflow):
    """The first invocation arrives while setup runs: its view of the process begins after setup
    has done what it does, so its end undoes none of it."""
    snakefile = """
        configfile: "config.yaml"
        rule all:
            input: expand("out/{i}.txt", i=range(2))
        rule look:
            output: "out/{i}.txt"
            resources: sticky="slow"
            script: "scripts/look.py"
    """
    sticky_workflow(workflow, snakefile, "sticky:\n  slow:\n    setup: templates/slow.py\n")
    workflow.write(
        "templates/slow.py",
        """
        import socket, time

        def setup():
            time.sleep(1.5)  # the first invocation is on the worker meanwhile
            socket.setdefaulttimeout(7.0)  # a setting of the whole process
            return {}
        """,
    )
    workflow.write(
        "scripts/look.py",
        "import socket\nopen(snakemake.output[0], 'w').write(str(socket.getdefaulttimeout()))\n",
    )
    run = workflow.run("--sticky-workers", "1", cores=1)
    assert run.returncode == 0, run.output
    assert [workflow.read(f"out/{i}.txt") for i in range(2)] == ["7.0", "7.0"]


def test_exits_and_alarms_of_a_script_end_its_invocation_not_the_worker(workflow: Workflow):
    """`exit()` ends the script and leaves the worker's standard input open; `os._exit(3)` fails
    the job with its status, and the worker lives on; `signal.alarm` is refused with why."""
    snakefile = """
        configfile: "config.yaml"
        rule all:
            input: "out/look.txt"
        rule look:
            input: "out/exit.txt"
            output: "out/look.txt"
            resources: sticky="llm"
            script: "scripts/look.py"
        rule early:
            output: "out/{how}.txt"
            resources: sticky="llm"
            script: "scripts/early.py"
    """
    sticky_workflow(workflow, snakefile, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write(
        "scripts/early.py",
        """
        import os, signal
        how = snakemake.wildcards.how
        open(f"pid-{how}", "w").write(str(os.getpid()))
        if how == "exit":
            open(snakemake.output[0], "w").write("done")
            exit()
        elif how == "os_exit":
            os._exit(3)
        else:
            signal.alarm(5)
        """,
    )
    workflow.write(
        "scripts/look.py",
        "import os, sys\nopen(snakemake.output[0], 'w').write(f'{os.getpid()} stdin closed: {sys.stdin.closed}')\n",
    )
    run = workflow.run("--sticky-workers", "1", "--keep-going", "out/look.txt", "out/os_exit.txt", "out/alarm.txt")
    assert run.returncode != 0
    assert "ended its process with os._exit(3)" in run.output, run.output
    assert "signal.alarm(...) cannot interrupt a script" in run.output and "The timer was not set" in run.output
    pids = {workflow.read(f"pid-{how}") for how in ("exit", "os_exit", "alarm")}
    assert workflow.read("out/look.txt") == f"{pids.pop()} stdin closed: False" and not pids, "one worker throughout"
    assert report_of(workflow)["workers_lost"] == 0


def test_library_options_a_script_sets_end_with_it(workflow: Workflow):
    snakefile = """
        configfile: "config.yaml"
        rule all:
            input: "out/after.txt"
        rule first:
            output: "out/first.txt"
            resources: sticky="llm"
            script: "scripts/options.py"
        rule after:
            input: "out/first.txt"
            output: "out/after.txt"
            resources: sticky="llm"
            script: "scripts/options.py"
    """
    sticky_workflow(workflow, snakefile, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write(
        "scripts/options.py",
        """
        import pandas as pd
        import transformers
        seen = f"{pd.get_option('display.max_rows')} {transformers.logging.get_verbosity()}"
        pd.set_option("display.max_rows", 3)
        transformers.logging.set_verbosity_error()
        open(snakemake.output[0], "w").write(seen)
        """,
    )
    local = workflow.run(executor="local", cores=1)
    assert local.returncode == 0, local.output
    expected = [workflow.read(f"out/{name}.txt") for name in ("first", "after")]
    shutil.rmtree(workflow.root / "out")
    run = workflow.run("--sticky-workers", "1", cores=1)
    assert run.returncode == 0, run.output
    assert [workflow.read(f"out/{name}.txt") for name in ("first", "after")] == expected == ["60 30", "60 30"]
