"""Templates that own processes and threads, as inference engines do (vLLM's engine core,
DataLoader workers, a model server binary): they run in resident workers, and nothing they start
outlives its worker. Real Snakemake (CLI, its output through a pipe), real Dask, real torch.

Bound checked here: every helper is gone within GONE_S of the event that ends its worker
(retirement, Ctrl-C, SIGKILL of the worker or of Snakemake), with a teardown grace of 2 s.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Workflow, interrupt
from helpers import (
    ENGINE_SNAKEFILE,
    GONE_S,
    GRACE,
    all_helpers,
    engine_results,
    engine_workflow,
    helper_pids,
    running,
    wait_for,
    wait_until_gone,
)


def test_template_owns_a_spawned_pool_that_every_invocation_uses(workflow: Workflow):
    engine_workflow(workflow)
    # output through a pipe, read to its end: a helper that outlived snakemake would hold it
    run = workflow.run("--sticky-workers", "2", *GRACE, "--config", "count=8", cores=2)
    assert run.returncode == 0, run.output
    found = helper_pids(workflow)
    assert len(found) == 2, "each worker built its state once"
    for result in engine_results(workflow):
        own = found[result["worker"]]
        assert all(r["pid"] != result["worker"] and r["ppid"] == result["worker"] for r in result["pool"]), (
            "the pool ran in child processes of the worker"
        )
        assert {r["pid"] for r in result["pool"]} <= set(own) and result["server"] in own
        assert [r["x"] for r in result["pool"]] == [0, 1, 4, 9]
    assert wait_until_gone(all_helpers(workflow)) == []
    assert "no reaper guards" not in run.output
    assert workflow.leftover_processes() == []


def test_invocation_iterates_a_dataloader_with_two_worker_processes(workflow: Workflow):
    workflow.write("Snakefile", ENGINE_SNAKEFILE.replace("scripts/use.py", "scripts/load.py"))
    workflow.write("config.yaml", "sticky:\n  engine:\n    setup: templates/plain.py\n")
    workflow.write("templates/plain.py", "import os\ndef setup():\n    return {'pid': os.getpid()}\n")
    workflow.write(
        "scripts/load.py",
        """
        import json, os
        import torch
        from torch.utils.data import DataLoader, Dataset
        from snakemake_executor_plugin_sticky import sticky_state

        class Items(Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                return torch.tensor([i, os.getpid()])

        state = sticky_state(snakemake)
        batches = list(DataLoader(Items(), batch_size=2, num_workers=2))
        rows = torch.cat(batches).tolist()
        with open(snakemake.output[0], "w") as f:
            json.dump({"worker": state["pid"], "items": [r[0] for r in rows], "loaders": sorted({r[1] for r in rows})}, f)
    """,
    )
    run = workflow.run("--sticky-workers", "1", *GRACE, "--config", "count=3", cores=2)
    assert run.returncode == 0, run.output
    for result in engine_results(workflow):
        assert result["items"] == list(range(8))
        assert len(result["loaders"]) == 2 and result["worker"] not in result["loaders"]
    assert workflow.leftover_processes() == []


@pytest.mark.parametrize("how", ["sigkill", "preempted", "timed-out"])
def test_a_worker_that_ends_mid_run_takes_its_helpers_along(workflow: Workflow, how: str):
    engine_workflow(workflow)
    flags = {"timed-out": ("--sticky-invocation-timeout", "6", "--retries", "1")}.get(how, ())
    proc = workflow.popen(
        "--sticky-workers",
        "2",
        *GRACE,
        "--sticky-preempt-grace",
        "1",
        *flags,
        "--config",
        "count=24",
        "sleep=0.5",
        "victim=3",
        pipe=True,
    )
    wait_for(lambda: (workflow.root / "victim-ran").exists())
    victim = int(workflow.read("victim-ran"))
    theirs = helper_pids(workflow)[victim]
    assert len(running(theirs)) == 4  # two pool processes, the server, the daemon
    if how != "timed-out":  # else its Nanny kills the worker of the hung invocation
        os.kill(victim, signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    assert wait_until_gone(theirs, within=GONE_S + 6) == [], "the worker's pool, server and daemon went with it"
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert len(engine_results(workflow)) == 24
    said = {"sigkill": "was lost", "preempted": "got SIGTERM (preempted)", "timed-out": "timed out after 6 s"}[how]
    assert said in output
    # a replacement (if it came before the other worker had done the rest) met no old process
    assert workflow.lines("seen-alive-at-setup.txt") == [], "the replacement started after the old tree was gone"
    assert wait_until_gone(all_helpers(workflow)) == []
    assert workflow.leftover_processes() == []


GPU_SNAKEFILE = """
        configfile: "config.yaml"
        rule all:
            input: expand("second/{i}.txt", i=range(2))
        rule first:
            output: "first/{i}.txt"
            resources: sticky="first"
            script: "scripts/note.py"
        rule second:
            input: expand("first/{i}.txt", i=range(2))
            output: "second/{i}.txt"
            resources: sticky="second"
            script: "scripts/note.py"
    """


GPU_CONFIG = """
        sticky:
          first: {setup: templates/holder.py, kwargs: {name: first}, gpus: 1}
          second: {setup: templates/holder.py, kwargs: {name: second}, gpus: 1}
    """


GPU_HOLDER = """
        import glob, os, subprocess, sys

        def running(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        def setup(name):
            others = [int(p) for path in glob.glob("holders/*.txt") for p in open(path).read().split()]
            os.makedirs("holders", exist_ok=True)
            open(f"alive-at-setup-of-{name}.txt", "w").write(" ".join(str(p) for p in others if running(p)))
            code = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(0.5)"
            server = subprocess.Popen([sys.executable, "-c", code])
            open(f"holders/{name}.txt", "w").write(f"{os.getpid()} {server.pid}")
            return {"gpus": os.environ["CUDA_VISIBLE_DEVICES"]}
    """


GPU_NOTE = """
        from snakemake_executor_plugin_sticky import sticky_state
        open(snakemake.output[0], "w").write(sticky_state(snakemake)["gpus"])
    """


def test_a_gpu_goes_to_the_next_template_once_the_last_ones_processes_are_gone(workflow: Workflow):
    workflow.write("Snakefile", GPU_SNAKEFILE)
    workflow.write("config.yaml", GPU_CONFIG)
    # The first template's server ignores SIGTERM: it holds "the GPU" until SIGKILL at the grace.
    workflow.write("templates/holder.py", GPU_HOLDER)
    workflow.write("scripts/note.py", GPU_NOTE)
    run = workflow.run(*GRACE, cores=2, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert run.returncode == 0, run.output
    assert workflow.read("second/0.txt") == "0", "both templates ran on GPU 0"
    assert "waits for GPU(s) 0 until the retiring workers of template(s) first" in run.output
    assert workflow.read("alive-at-setup-of-second.txt") == "", "the first template's worker and server were gone"
    assert workflow.leftover_processes() == []


@pytest.mark.parametrize("end", ["retirement", "ctrl-c", "ctrl-c-twice", "snakemake-sigkill"])
def test_the_whole_tree_is_gone_when_the_run_ends(workflow: Workflow, end: str):
    engine_workflow(workflow, kwargs="{stubborn: true, endless_thread: true}")
    sleep = "0" if end == "retirement" else "600"
    proc = workflow.popen("--sticky-workers", "2", *GRACE, "--config", "count=4", f"sleep={sleep}", pipe=True)
    wait_for(lambda: len(helper_pids(workflow)) == 2 and all(len(h) == 4 for h in helper_pids(workflow).values()))
    if end != "retirement":
        wait_for(lambda: "rule infer" in proc.log.read_text())
        time.sleep(1)
    if end.startswith("ctrl-c"):
        interrupt(proc)
        if end == "ctrl-c-twice":
            time.sleep(0.3)
            interrupt(proc)
    elif end == "snakemake-sigkill":
        os.kill(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert (proc.returncode == 0) == (end == "retirement"), output
    workers = list(helper_pids(workflow))
    assert wait_until_gone(workers + all_helpers(workflow)) == [], "workers, pools, servers and daemons are gone"
    assert workflow.leftover_processes() == []


POISON_SNAKEFILE = """
        configfile: "config.yaml"
        rule all:
            input: expand("out/{i}.json", i=range(40))
        rule infer:
            output: "out/{i}.json"
            resources: sticky="engine"
            script: "scripts/poison.py"
    """


POISON_CONFIG = """
        import os, time
        poisoned_by = ["CorruptedModel"]

        class CorruptedModel(RuntimeError):
            pass

        def setup():
            generation = len(open("builds.txt").read().split()) + 1 if os.path.exists("builds.txt") else 1
            open("builds.txt", "a").write(f"{generation}\\n")
            return {"alive": True, "generation": generation, "error": CorruptedModel}

        def teardown(state):
            state["alive"] = False
            open("teardowns.txt", "a").write(f"{state['generation']} {time.time()}\\n")
    """


POISON_TEMPLATE = """
        import json, os, time
        from snakemake_executor_plugin_sticky import sticky_state

        state = sticky_state(snakemake)
        began, seen = time.time(), []
        for _ in range(10):  # 0.3 s of work that looks at the state all along
            seen.append(state["alive"])
            time.sleep(0.03)
        if snakemake.wildcards.i == "13" and not os.path.exists("poisoned"):
            open("poisoned", "w").close()
            raise state["error"]("the model is corrupted")
        with open(snakemake.output[0], "w") as f:
            json.dump({"generation": state["generation"], "seen": seen, "began": began, "ended": time.time()}, f)
    """


POISON_SCRIPT = "sticky:\n  engine:\n    setup: templates/model.py\n    slots: 4\n"


def test_rebuild_with_four_slots_waits_for_the_invocations_holding_the_poisoned_state(workflow: Workflow):
    workflow.write("Snakefile", POISON_SNAKEFILE)
    workflow.write("config.yaml", POISON_SCRIPT)
    workflow.write("templates/model.py", POISON_CONFIG)
    workflow.write("scripts/poison.py", POISON_TEMPLATE)
    run = workflow.run("--sticky-workers", "1", "--retries", "1", cores=8)
    assert run.returncode == 0, run.output
    assert "poisoned its state" in run.output
    assert workflow.lines("builds.txt") == ["1", "2"], "rebuilt once"
    done = engine_results(workflow)
    assert len(done) == 40
    assert all(all(r["seen"]) for r in done), "no invocation ever saw a torn-down state"
    torn = dict(line.split() for line in workflow.read("teardowns.txt").splitlines())
    first_torn = float(torn["1"])
    assert all(r["ended"] <= first_torn for r in done if r["generation"] == 1), "teardown waited for them"
    assert all(r["began"] >= first_torn for r in done if r["generation"] == 2)
    assert workflow.leftover_processes() == []


def test_children_inherit_their_workers_gpus(workflow: Workflow):
    engine_workflow(workflow, extra="gpus: 2")
    # four GPU ids on a machine with no GPU: only their hand-out is checked
    run = workflow.run(
        "--sticky-workers", "2", *GRACE, "--config", "count=6", cores=2, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    )
    assert run.returncode == 0, run.output
    by_worker = {}
    for result in engine_results(workflow):
        by_worker.setdefault(result["worker"], set()).update(r["gpus"] for r in result["pool"])
    assert sorted(gpus for seen in by_worker.values() for gpus in seen) == ["0,1", "2,3"]
    assert all(len(seen) == 1 for seen in by_worker.values())
    assert workflow.leftover_processes() == []


def test_forkserver_reaper_is_not_installed_outside_the_forkserver():
    import os as os_module

    from snakemake_executor_plugin_sticky.worker import forkserver_reaper

    assert forkserver_reaper.reaper is None
    assert os_module.fork is not forkserver_reaper.fork and os_module.waitpid is not forkserver_reaper.waitpid


def test_supervisor_ends_what_its_worker_leaves_and_exits_with_its_status(tmp_path: Path):
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.5)'], start_new_session=True)\n"
        f"open({str(tmp_path / 'pids')!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(600)\n"
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "snakemake_executor_plugin_sticky.worker.supervisor", sys.executable, str(script)]
    )
    wait_for(lambda: (tmp_path / "pids").exists() and len((tmp_path / "pids").read_text().split()) == 2, 60)
    worker, child = map(int, (tmp_path / "pids").read_text().split())
    os.kill(worker, signal.SIGKILL)
    assert supervisor.wait(timeout=60) == 128 + signal.SIGKILL, "a killed worker's status is passed on"
    assert running([child]) == []
    plain = subprocess.run(
        [sys.executable, "-m", "snakemake_executor_plugin_sticky.worker.supervisor", "-m", "json.tool", "--help"],
        capture_output=True,
    )
    assert plain.returncode == 0
    missing = subprocess.run(
        [sys.executable, "-m", "snakemake_executor_plugin_sticky.worker.supervisor", "no-such-command"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "command not found: no-such-command" in missing.stderr


def test_a_signal_at_any_moment_of_the_supervisors_start_leaves_no_worker_behind(tmp_path: Path):
    """SIGTERM while the supervisor starts its worker: either the supervisor dies before there is a
    worker, or the worker gets the signal too; never a worker without its supervisor."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    for attempt in range(30):
        pid_file = tmp_path / f"pid-{attempt}"
        supervisor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snakemake_executor_plugin_sticky.worker.supervisor",
                sys.executable,
                str(script),
                pid_file,
            ]
        )
        time.sleep(attempt * 0.005)  # from before the supervisor's imports to after its worker is up
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)
        time.sleep(0.3)  # a worker spawned just before the supervisor died has written its pid by now
        if pid_file.exists():
            assert running([int(pid_file.read_text())]) == [], f"attempt {attempt}: the worker outlived its supervisor"


def test_a_template_may_install_signal_handlers_from_its_setup_thread(workflow: Workflow):
    """Engines install handlers as they start (SGLang's Engine does), though setup runs in a thread."""
    workflow.write("Snakefile", ENGINE_SNAKEFILE.replace("scripts/use.py", "scripts/signal.py"))
    workflow.write("config.yaml", "sticky:\n  engine:\n    setup: templates/handler.py\n")
    workflow.write(
        "templates/handler.py",
        """
        import os, signal, threading

        def setup():
            caught = []
            signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(threading.current_thread().name))
            return {"caught": caught, "setup_thread": threading.current_thread().name}
    """,
    )
    workflow.write(
        "scripts/signal.py",
        """
        import json, os, signal, time
        from snakemake_executor_plugin_sticky import sticky_state

        state = sticky_state(snakemake)
        before = len(state["caught"])
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if len(state["caught"]) > before:
                break
            time.sleep(0.05)
        with open(snakemake.output[0], "w") as f:
            json.dump({"caught": state["caught"][before:], "setup_thread": state["setup_thread"]}, f)
    """,
    )
    run = workflow.run("--sticky-workers", "1", "--config", "count=2", cores=2)
    assert run.returncode == 0, run.output
    for result in engine_results(workflow):
        assert result["caught"] == ["MainThread"] and result["setup_thread"] == "sticky-setup"


def test_the_supervisor_forwards_nothing_once_its_worker_is_collected(tmp_path: Path):
    """After the worker's status is collected its pid may belong to another process: a signal
    the batch system sends meanwhile (the supervisor still ends what the worker left) goes nowhere."""
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(
        "from snakemake_executor_plugin_sticky.worker import supervisor\n"
        "made = []\n"
        "class Spy(supervisor.Forwarder):\n"
        "    def __init__(self, pid):\n"
        "        super().__init__(pid)\n"
        "        made.append(self)\n"
        "supervisor.Forwarder = Spy\n"
        "status = supervisor.keep(['sh', '-c', 'exit 3'])\n"
        "print(status, made[0].pid)\n"
    )
    done = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["3", "None"], done.stdout + done.stderr
    from snakemake_executor_plugin_sticky.worker.supervisor import Forwarder

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        forward = Forwarder(sleeper.pid)
        forward.stop()
        forward(signal.SIGTERM)
        time.sleep(0.2)
        assert sleeper.poll() is None, "a stopped forwarder sends nothing"
        Forwarder(sleeper.pid)(signal.SIGTERM)
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()
