"""Fault injection against real Snakemake and real Dask: killed, preempted and hung workers,
poisoned state, broken templates, Ctrl-C, and a soak test with random kills."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from conftest import Workflow, interrupt
from helpers import (
    CAREFUL,
    HOLDS_THE_LOCK,
    LLM_TEMPLATE,
    ONE_TEMPLATE_SNAKEFILE,
    RECORD_SCRIPT,
    complete_output,
    complete_outputs,
    hang_among_400,
    report_of,
    sticky_workflow,
    strike,
    wait_for,
)


def test_worker_killed_mid_invocation(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", CAREFUL)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=40", "sleep=0.2", "victim=5")
    victim = strike(workflow, 5, signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert complete_outputs(workflow, 40), "every output whole, the killed attempt's half one replaced"
    assert f"end 5 {victim}" not in workflow.read("out/5.json")
    setups = workflow.lines("setups-llm.txt")
    assert len(setups) == 3 and str(victim) in setups, "the lost worker was replaced and rebuilt"
    # the replacement may still be building its state when the run ends: only finished builds count
    llm = report_of(workflow)
    assert llm["workers_lost"] == 1 and llm["state_builds"] <= len(setups)
    assert workflow.leftover_processes() == []


@pytest.mark.parametrize(
    "wait, why",
    [
        ("1", "more than --sticky-max-worker-losses 1"),
        ("0", "No worker of sticky template 'llm' could start"),  # it dies as it starts: start attempts
    ],
    ids=["after-a-second", "at-once"],
)
def test_losses_beyond_the_budget_fail_the_template(workflow: Workflow, wait: str, why: str):
    """A worker that dies while it builds the state (a native crash in setup) is no invocation's
    fault: such losses count against the template's budget, or its start attempts where the
    worker dies as it starts. Either way the template fails, once, and nothing restarts forever."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "templates/counting.py",
        f"""
        import os, signal, time
        def setup(name, delay=0.0):
            open(f"setups-{{name}}.txt", "a").write(f"{{os.getpid()}}\\n")
            time.sleep({wait})  # with 1, the worker is up, and the invocations wait for the state
            os.kill(os.getpid(), signal.SIGKILL)
    """,
    )
    run = workflow.run("--sticky-workers", "1", "--sticky-max-worker-losses", "1", "--config", "count=2", timeout=120)
    assert run.returncode != 0
    assert "Error in rule infer" in run.output and why in run.output, run.output
    assert "crashed its worker" not in run.output, "the waiting invocations are not blamed"
    assert len(workflow.lines("setups-llm.txt")) >= 2, "one loss was tolerated, the second was one too many"
    assert workflow.leftover_processes() == []


@pytest.mark.parametrize("workers, slots", [(2, 1), (1, 4)])
def test_an_invocation_that_crashes_its_worker_every_time_fails_alone(workflow: Workflow, workers: int, slots: int):
    sticky_workflow(
        workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0}", f"delay: 0.2}}\n    slots: {slots}")
    )
    # invocation 5 dies of a segfault, as a native crash in a model would, on every attempt
    workflow.write(
        "scripts/record.py",
        "import ctypes, time\nif snakemake.wildcards.i == '5':\n    time.sleep(0.5)\n    ctypes.string_at(0)\n"
        + workflow.read("scripts/record.py"),
    )
    run = workflow.run(
        "--sticky-workers", str(workers), "--keep-going", "--config", "count=12", "sleep=0.3", cores=4, timeout=240
    )
    assert run.returncode != 0
    done = sorted(int(p.stem) for p in workflow.root.glob("out/*.json"))
    assert done == [i for i in range(12) if i != 5], "the other invocations completed"
    assert "crashed its worker 3 times" in run.output and "signal 11 (SIGSEGV)" in run.output, run.output
    assert run.output.count("Error in rule infer") == 1
    assert len(workflow.lines("setups-llm.txt")) <= workers + 3, "a handful of state builds"
    assert "cannot schedule new futures" not in run.output
    assert workflow.leftover_processes() == []


SHORT = ("--sticky-workers", "2", "--keep-going", "--scheduler", "greedy", "--config", "count=200")


def test_short_invocations_share_tasks_and_one_that_crashes_its_worker_still_fails_alone(workflow: Workflow):
    """Short invocations travel several to a Dask task (head/chunking.py). When one of them
    crashes its worker every time, its task comes back lost and its other invocations run again,
    one per task; it alone fails, and it does not start a fourth time."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0}", "delay: 0.2}"))
    crash = "import ctypes, time\nif snakemake.wildcards.i == '150':\n    time.sleep(0.3)\n    ctypes.string_at(0)\n"
    workflow.write("scripts/record.py", crash + RECORD_SCRIPT)
    run = workflow.run(*SHORT, cores=32, timeout=300)
    assert run.returncode != 0
    done = sorted(int(p.stem) for p in workflow.root.glob("out/*.json"))
    assert done == [i for i in range(200) if i != 150], run.output[-3000:]
    assert report_of(workflow)["dask_tasks"] < 200 * 0.75, "most invocations shared a task with others"
    assert "crashed its worker 3 times" in run.output and run.output.count("Error in rule infer") == 1
    assert len(workflow.lines("setups-llm.txt")) <= 2 + 3, "a state build per crash, no more"
    assert workflow.leftover_processes() == []


def test_a_task_lost_to_a_crash_runs_again_and_an_invocation_that_recovers_completes(workflow: Workflow):
    """A crash inside a task of several invocations loses none of them: the task comes back lost
    and its invocations run again, one per task. Here one script crashes its worker 4 times at its
    start (one more than --sticky-invocation-crashes would allow were each crash seen while it
    ran; a crash at a script's first line may come before the word that it runs leaves the
    worker), then succeeds: the run completes every invocation, whichever way it was counted."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0}", "delay: 0.2}"))
    crash = (
        "import ctypes\nif snakemake.wildcards.i == '150':\n"
        "    with open('crashes-150', 'a+') as f:\n        f.seek(0)\n        crashes = len(f.read())\n"
        "        f.write('x')\n    if crashes < 4:\n        ctypes.string_at(0)\n"
    )
    workflow.write("scripts/record.py", crash + RECORD_SCRIPT)
    run = workflow.run(*SHORT, "--sticky-invocation-crashes", "5", cores=32, timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    assert len(list(workflow.root.glob("out/*.json"))) == 200
    assert workflow.read("crashes-150") == "xxxxx"
    llm = report_of(workflow)
    assert llm["dask_tasks"] < 200 * 0.75 and llm["workers_lost"] == 4
    assert workflow.leftover_processes() == []


def test_preempted_worker_finishes_its_invocation_tears_down_and_leaves(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", CAREFUL)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=8", "sleep=0.5", "victim=1", "victim_sleep=3")
    victim = strike(workflow, 1, signal.SIGTERM)
    # Hold the Snakemake process (scheduler and client) still while the invocation ends, as a
    # busy one may be: the worker must not leave with a result that was not fetched yet.
    wait_for(lambda: (workflow.root / "victim-ending-1").exists())
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert complete_outputs(workflow, 8)
    assert f"end 1 {victim}" in workflow.read("out/1.json"), (
        "the running invocation finished within the grace, its result fetched before the worker left"
    )
    assert str(victim) in workflow.lines("teardowns-llm.txt"), "teardown ran in the preempted worker"
    assert "got SIGTERM (preempted)" in output
    preempted = [w for w in report_of(workflow)["workers"] if w["preempted"]]
    assert [w["pid"] for w in preempted] == [victim] and not preempted[0]["lost"]
    assert workflow.leftover_processes() == []


def test_preempted_worker_hands_back_what_outlasts_the_grace(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", CAREFUL)
    proc = workflow.popen(
        "--sticky-workers", "2", "--sticky-preempt-grace", "1", "--config", "count=4", "victim=0", "victim_sleep=600"
    )
    victim = strike(workflow, 0, signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert complete_outputs(workflow, 4)
    assert f"end 0 {victim}" not in workflow.read("out/0.json"), "handed back and run elsewhere"
    assert workflow.leftover_processes() == []


def test_hung_invocation_times_out_and_its_worker_is_replaced(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", CAREFUL)
    # one job at a time, the hung one first: the jobs after it need the replacement worker
    run = workflow.run(
        "--sticky-workers",
        "1",
        "--sticky-invocation-timeout",
        "4",
        "--keep-going",
        "--prioritize",
        "out/2.json",
        "--config",
        "count=4",
        "victim=2",
        "victim_sleep=600",
        cores=1,
        timeout=180,
    )
    assert run.returncode != 0
    assert "Invocation of rule 'infer' timed out after 4 s" in run.output
    assert "Error in rule infer" in run.output
    assert [i for i in range(4) if (workflow.root / f"out/{i}.json").exists()] == [0, 1, 3]
    assert len(workflow.lines("setups-llm.txt")) == 2, "the worker of the hung invocation was replaced"
    assert workflow.leftover_processes() == []


HANGS_ONCE = """
import os, time
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
if not os.path.exists("hung-pid"):
    open("hung-pid", "w").write(str(os.getpid()))
    time.sleep(600)
hung = int(open("hung-pid").read())
try:
    alive = open(f"/proc/{hung}/stat").read().split()[2] != "Z"
except FileNotFoundError:
    alive = False
open(snakemake.output[0], "w").write(f"hung worker alive: {alive}")
"""


def test_a_retry_of_a_hung_invocation_runs_once_the_hung_worker_has_ended(workflow: Workflow):
    """Without a fence the hung attempt writes in place: its retry, on the other worker, must
    not write beside it."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/record.py", HANGS_ONCE)
    run = workflow.run(
        "--sticky-workers", "2", "--sticky-invocation-timeout", "3", "--retries", "1", "--config", "count=1"
    )
    assert run.returncode == 0, run.output
    assert "timed out after 3 s" in run.output
    assert workflow.read("out/0.json") == "hung worker alive: False"
    assert workflow.leftover_processes() == []


def test_a_hung_invocation_among_many_short_ones_holds_up_only_itself(workflow: Workflow):
    run = hang_among_400(workflow, "--sticky-workers", "2", cores=64, timeout=300)
    assert report_of(workflow)["dask_tasks"] < 400, "short invocations shared tasks"
    assert workflow.leftover_processes() == [], run.output


def test_a_step_that_holds_the_interpreter_lock_is_a_busy_worker_not_a_lost_one(workflow: Workflow):
    """Its heartbeats stop for three times Dask's worker-ttl; its Nanny vouches for it meanwhile."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/record.py", HOLDS_THE_LOCK)
    run = workflow.run(
        "--sticky-workers", "1", "--config", "count=2", "hold=15", env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"}
    )
    assert run.returncode == 0, run.output
    assert "was lost" not in run.output and "failed to heartbeat" not in run.output, run.output
    assert report_of(workflow)["workers_lost"] == 0
    assert len(set(workflow.lines("setups-llm.txt"))) == 1, "one worker, never replaced"


def test_poisoning_exception_rebuilds_the_state(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("templates/counting.py", "poisoned_by = ('MemoryError',)\n" + workflow.read("templates/counting.py"))
    workflow.write(
        "scripts/record.py",
        "if snakemake.wildcards.i == '1':\n    raise MemoryError('out of GPU memory')\n"
        + workflow.read("scripts/record.py"),
    )
    run = workflow.run("--sticky-workers", "1", "--keep-going", "--config", "count=4")
    assert run.returncode != 0
    assert "MemoryError: out of GPU memory" in run.output and "poisoned its state" in run.output
    setups = workflow.lines("setups-llm.txt")
    assert len(setups) == 2 and len(set(setups)) == 1, "rebuilt in the same worker process"
    assert len(workflow.lines("teardowns-llm.txt")) == 2, "the poisoned state was torn down"
    assert len(list(workflow.root.glob("out/*.json"))) == 3


def test_broken_template_fails_fast_and_alone(workflow: Workflow):
    sticky_workflow(
        workflow,
        """
        configfile: "config.yaml"
        rule all:
            input: expand("good/{i}.json", i=range(3)), expand("bad/{i}.json", i=range(3)), "plain.txt"
        rule good:
            output: "good/{i}.json"
            resources: sticky="good"
            script: "scripts/record.py"
        rule bad:
            output: "bad/{i}.json"
            resources: sticky="bad"
            script: "scripts/record.py"
        rule plain:
            output: "plain.txt"
            shell: "echo plain > {output}"
        """,
        """
        sticky:
          good: {setup: templates/counting.py, kwargs: {name: good}}
          bad: {setup: templates/counting.py, kwargs: {name: bad, fail: true}}
        """,
    )
    run = workflow.run("--keep-going", "--sticky-setup-retry-delay", "0.5", timeout=120)
    assert run.returncode != 0
    assert "Sticky template 'bad'" in run.output and "RuntimeError: cannot load model for bad" in run.output
    assert len(workflow.lines("setups-bad.txt")) == 3
    assert all((workflow.root / f"good/{i}.json").exists() for i in range(3))
    assert not list(workflow.root.glob("bad/*.json"))
    assert workflow.read("plain.txt") == "plain\n"


def test_ctrl_c_twice_exits_at_once(workflow: Workflow):
    """The first Ctrl-C waits for teardown (here one that would take 600 s, within a grace of
    120 s); a second one ends Snakemake at once, and the forkserver ends the workers."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write(
        "templates/counting.py", workflow.read("templates/counting.py") + "    import time; time.sleep(600)\n"
    )
    proc = workflow.popen("--sticky-workers", "2", "--sticky-teardown-grace", "120", "--config", "count=8", "sleep=60")
    wait_for(lambda: len(workflow.lines("setups-llm.txt")) == 2)
    wait_for(lambda: "rule infer" in proc.log.read_text())
    interrupt(proc)
    wait_for(lambda: "press Ctrl-C again to stop at once" in proc.log.read_text())
    interrupt(proc)
    proc.communicate(timeout=60)  # far below the first Ctrl-C's 120 s of teardown grace
    assert workflow.leftover_processes(wait_s=10) == []


def test_rerun_after_ctrl_c_redoes_exactly_the_unfinished_jobs(workflow: Workflow):
    """As with Snakemake's local executor: the interrupted job's output is marked incomplete."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", CAREFUL)
    proc = workflow.popen("--sticky-workers", "1", "--config", "count=6", "victim=3", "victim_sleep=600")
    wait_for(lambda: (workflow.root / "victim-ran-3").exists())
    interrupt(proc)
    first, _ = proc.communicate(timeout=30)
    assert len(workflow.lines("teardowns-llm.txt")) == 1, "first Ctrl-C runs teardown"
    assert not complete_output(workflow, 3)
    # A job Snakemake had not heard of when it stopped is incomplete to it, however complete its
    # file looks (an invocation that shared a task with the victim, or whose result was on its way).
    finished = first.count("(Rule: infer)")
    refused = workflow.run("--sticky-workers", "1", "--config", "count=6", "victim=3")
    assert refused.returncode != 0 and "IncompleteFilesException" in refused.output
    assert "out/3.json" in refused.output
    rerun = workflow.run("--sticky-workers", "1", "--rerun-incomplete", "--config", "count=6", "victim=3")
    assert rerun.returncode == 0, rerun.output
    assert rerun.output.count("rule infer:") == 6 - finished
    assert complete_outputs(workflow, 6)


@pytest.mark.slow
def test_soak_random_kills(workflow: Workflow):
    count, workers = 1000, 3
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.5"))
    workflow.write("scripts/record.py", CAREFUL)
    proc = workflow.popen(
        "--sticky-workers",
        str(workers),
        "--max-jobs-per-timespan",
        "1000/1s",
        "--sticky-status-interval",
        "5",
        "--config",
        f"count={count}",
        "sleep=0.05",
        cores=workers,
    )
    rng = random.Random(7)
    kills, deadline = 0, time.monotonic() + 300

    def mid_run() -> bool:  # a kill as the run retires its workers is no loss: kills stop before
        return proc.poll() is None and len(list((workflow.root / "out").glob("*.json"))) < 0.9 * count

    while mid_run() and kills < 8 and time.monotonic() < deadline:
        time.sleep(rng.uniform(2.0, 4.0))
        pids = [int(p) for p in workflow.lines("setups-llm.txt")]
        alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if alive and mid_run():
            os.kill(rng.choice(alive), signal.SIGKILL)
            kills += 1
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    assert kills >= 2, f"the run ended before the soak: {kills} kill(s)"
    assert complete_outputs(workflow, count)
    llm = report_of(workflow)
    assert llm["invocations"] >= count
    assert llm["workers_lost"] == kills and llm["rebuilds"] >= kills - 1
    print(f"soak: {count} invocations, {kills} workers killed, {llm['rebuilds']} state rebuilds")
    assert workflow.leftover_processes() == []
