"""Scale-out: workers as Slurm jobs on a real one-node Slurm (`.ci/slurm-up`), TLS of the
network scheduler, and attach mode with hand-started Dask workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from distributed import Client
from distributed.security import Security
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_sticky.head.engines.jobqueue import BatchBackend
from snakemake_executor_plugin_sticky.head.process_changes import ProcessChanges
from snakemake_executor_plugin_sticky.settings import ExecutorSettings

from conftest import Workflow, snakemake_env
from helpers import (
    COUNTING_TEMPLATE,
    HOLDS_THE_LOCK,
    LLM_TEMPLATE,
    ONE_TEMPLATE_SNAKEFILE,
    all_helpers,
    ask_identity,
    clear_fidelity_results,
    engine_results,
    engine_workflow,
    fidelity_results,
    fidelity_workflow,
    hang_among_400,
    helper_pids,
    running,
    start_kept_worker,
    start_scheduler,
    sticky_workflow,
    stop_groups,
    wait_for,
    wait_until_gone,
)

JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")


def write_sleeper(wf: Workflow, count: int = 12, extra_rules: str = "", inputs: str = "") -> None:
    wf.write(
        "config.yaml",
        """
        sticky:
          sleeper:
            setup: template.py
            kwargs: {delay: 1}
    """,
    )
    wf.write(
        "template.py",
        """
        import os, time

        def setup(delay):
            time.sleep(delay)
            return {"pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", "none")}
    """,
    )
    wf.write(
        "scripts/work.py",
        """
        import time
        from snakemake_executor_plugin_sticky import sticky_state

        state = sticky_state(snakemake)
        began = time.time()
        time.sleep(1)
        with open(snakemake.output[0], "w") as f:
            f.write(f"{state['pid']} {state['job']} {began} {time.time()}\\n")
    """,
    )
    wf.write(
        "Snakefile",
        f"""
        configfile: "config.yaml"

        rule all:
            input: expand("out/{{i}}.txt", i=range({count})){inputs}

        rule work:
            output: "out/{{i}}.txt"
            resources: sticky="sleeper"
            script: "scripts/work.py"
        {extra_rules}
    """,
    )


def invocations(wf: Workflow, folder: str = "out") -> list[tuple[str, str, float, float]]:
    rows = []
    for path in sorted((wf.root / folder).glob("*.txt")):
        pid, job, began, ended = path.read_text().split()
        rows.append((pid, job, float(began), float(ended)))
    return rows


def most_at_once(rows: list[tuple[str, str, float, float]]) -> int:
    edges = sorted([(b, 1) for *_, b, _ in rows] + [(e, -1) for *_, e in rows])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def submitted_jobs(output: str) -> list[str]:
    """The Slurm jobs the run says it submitted, in order."""
    return re.findall(r"submitted slurm job (\d+)", output)


def slurm_jobs_in_queue(job_ids: set[str], wait_s: float = 15.0) -> list[str]:
    """Those of the jobs that Slurm still lists after `wait_s`: a job cancelled a moment ago may
    show as COMPLETING while slurmd cleans up after it."""
    deadline = time.monotonic() + wait_s
    while True:
        listing = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
        left = [line for line in listing.splitlines() if line.split()[0] in job_ids]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def recorded_by_slurm(job_id: str) -> str:
    """Slurm's own record of the job: scontrol while it is known, else the jobcomp log."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    if f"JobId={job_id} " in shown:
        return shown
    records = JOBCOMP_LOG.read_text() if JOBCOMP_LOG.exists() else ""
    return next((line for line in records.splitlines() if line.startswith(f"JobId={job_id} ")), "")


def test_slurm_workers_run_invocations_two_at_a_time_and_leave_no_job(workflow: Workflow, slurm: None):
    write_sleeper(workflow)
    # the command line of the issue, with the batch system's default memory
    run = workflow.run(
        "--sticky-cluster", "slurm", "--sticky-interface", "lo", "--sticky-max-workers", "2", "--jobs", "2", cores=1
    )
    assert run.returncode == 0, run.output
    rows = invocations(workflow)
    assert len(rows) == 12
    job_ids = {job for _, job, _, _ in rows}
    assert len(job_ids) == 2 and "none" not in job_ids, rows  # two workers, each a Slurm job
    assert len({pid for pid, *_ in rows}) == 2  # each built its state once and kept it
    assert most_at_once(rows) == 2
    for job_id in job_ids:
        record = recorded_by_slurm(job_id)
        assert "Name=sticky-sleeper" in record, record
    assert re.search(r"submitted slurm job \d+ \(worker sleeper-1-\d\, pool 1\)", run.output)
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []
    assert not workflow.leftover_processes()
    # the credentials of the run are gone with it
    assert not list((workflow.root / ".snakemake" / "sticky").glob("tls-*"))


def test_a_slurm_worker_job_that_can_never_start_fails_its_template_saying_why(workflow: Workflow, slurm: None):
    write_sleeper(workflow)
    # more cores than the node has: Slurm holds the job pending (PartitionConfig) for ever
    run = workflow.run(
        "--sticky-cluster", "slurm", "--sticky-interface", "lo", "--sticky-job-cores", "64", "--jobs", "2", cores=1
    )
    assert run.returncode != 0
    assert "Sticky template 'sleeper': slurm job" in run.output, run.output
    assert "will never start: Slurm holds it (PartitionConfig)" in run.output, run.output
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []  # cancelled, not left waiting
    assert not workflow.leftover_processes()


def test_slurm_pool_retires_idle_workers_and_grows_again(workflow: Workflow, slurm: None):
    # Phase 1: 4 invocations; then a 6 s job that is not sticky, while the workers sit idle;
    # then 4 more invocations, which need new workers.
    write_sleeper(
        workflow,
        count=4,
        inputs=', expand("late/{i}.txt", i=range(4))',
        extra_rules="""
        rule pause:
            input: expand("out/{i}.txt", i=range(4))
            output: "paused.txt"
            shell: "sleep 6; touch {output}"

        rule late:
            input: "paused.txt"
            output: "late/{i}.txt"
            resources: sticky="sleeper"
            script: "scripts/work.py"
        """,
    )
    run = workflow.run(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-max-workers",
        "2",
        "--sticky-memory",
        "1GB",
        "--sticky-idle-timeout",
        "2",
        "--jobs",
        "3",
        cores=1,
    )
    assert run.returncode == 0, run.output
    early = {job for _, job, _, _ in invocations(workflow, "out")}
    late = {job for _, job, _, _ in invocations(workflow, "late")}
    assert len(invocations(workflow, "late")) == 4
    assert run.output.count("with nothing waiting: retiring it") >= 2, run.output
    assert early.isdisjoint(late), (early, late)  # the idle jobs ended; new ones served phase 2
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []


def test_slurm_worker_job_cancelled_mid_run_is_replaced(workflow: Workflow, slurm: None):
    # 20 one-second invocations: the survivor alone would need about 18 s, time enough for
    # the replacement job to start (a few seconds) and take a share, even on a loaded machine
    write_sleeper(workflow, count=20)
    proc = workflow.popen(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-max-workers",
        "2",
        "--sticky-memory",
        "1GB",
        "--jobs",
        "2",
        cores=1,
    )
    deadline = time.monotonic() + 60
    while len(invocations(workflow)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(invocations(workflow)) >= 2, proc.log.read_text()
    victim = invocations(workflow)[0][1]
    subprocess.run(["scancel", victim], check=True)  # as a preempting batch system would
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    rows = invocations(workflow)
    assert len(rows) == 20
    submitted = submitted_jobs(output)
    assert len(submitted) >= 3, output
    # the replacement job served invocations (the victim's results may have been redone)
    assert {job for _, job, _, _ in rows} - set(submitted[:2]), output
    assert slurm_jobs_in_queue(set(submitted)) == []


def test_network_scheduler_refuses_clients_without_the_run_credentials(tmp_path: Path):
    class Log:
        def info(self, msg: str) -> None: ...
        def warning(self, msg: str) -> None: ...

    backend = BatchBackend(
        str(tmp_path), ExecutorSettings(cluster="pbs", interface="lo"), Log(), lambda event: None, ProcessChanges()
    )
    try:
        address = backend.client.scheduler.address
        assert address.startswith("tls://")
        files = sorted(backend.credentials.iterdir())
        assert [f.name for f in files] == ["cert.pem", "key.pem"]
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
        assert backend.credentials.stat().st_mode & 0o777 == 0o700

        anonymous = ssl.create_default_context()  # speaks TLS, trusts anything, has no certificate
        anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
        with pytest.raises(OSError):
            ask_identity(address, {"ssl_context": anonymous})
        with pytest.raises(OSError):  # someone else's certificate
            ask_identity(address, Security.temporary().get_connection_args("client"))
        with pytest.raises(OSError):  # plain TCP is not served
            ask_identity(address.replace("tls://", "tcp://"), {})
        # the run's own credentials work, for a raw connection and for a Dask client
        assert ask_identity(address, backend.security.get_connection_args("client"))["type"] == "Scheduler"
        with Client(address, security=backend.security, timeout="10s", set_as_default=False) as client:
            assert client.scheduler_info()["address"] == address
    finally:
        backend.close()
    assert not backend.credentials.exists()


def test_attach_mode_uses_hand_started_workers_and_leaves_them_running(workflow: Workflow):
    write_sleeper(workflow, count=6)
    workflow.write(
        "template.py",
        """
        import os

        def setup(delay):
            return {"pid": os.getpid(), "job": "attached"}

        def teardown(state):
            with open("torn-down.txt", "a") as f:
                f.write(f"{state['pid']}\\n")
    """,
    )
    env = snakemake_env()
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = subprocess.Popen(
            [
                dask,
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--resources",
                "sticky-sleeper=2",
                "--nthreads",
                "2",
                "--memory-limit",
                "0",
                "--no-nanny",
                "--no-dashboard",
            ],
            cwd=workflow.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        run = workflow.run("--sticky-scheduler", str(scheduler_file), cores=2)
        assert run.returncode == 0, run.output
        assert "dask worker" in run.output and "--resources sticky-sleeper=1" in run.output
        rows = invocations(workflow)
        assert len(rows) == 6 and {pid for pid, *_ in rows} == {str(worker.pid)}
        # the run's end tore the state down, and the user's worker and scheduler still run
        deadline = time.monotonic() + 10
        while not (workflow.root / "torn-down.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workflow.lines("torn-down.txt") == [str(worker.pid)]
        assert worker.poll() is None and scheduler.poll() is None
        assert "no reaper guards this worker" in run.output, "a worker not under the supervisor is named"
    finally:
        stop_groups(worker, scheduler)


def test_attach_mode_worker_under_the_supervisor_takes_a_template_with_processes(workflow: Workflow):
    """A hand-started worker with a Nanny (a daemon process, as Dask starts them) under the supervisor:
    the template's pool runs in it, and the run's end ends the pool but leaves the worker."""
    engine_workflow(workflow)
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = start_kept_worker(workflow, scheduler_file, "sticky-engine=1")
        run = workflow.run("--sticky-scheduler", str(scheduler_file), "--config", "count=4", cores=1)
        assert run.returncode == 0, run.output
        assert "no reaper guards" not in run.output
        (worker_pid,) = helper_pids(workflow)
        assert all(r["worker"] == worker_pid and r["pool"][0]["ppid"] == worker_pid for r in engine_results(workflow))
        assert wait_until_gone(all_helpers(workflow)) == [], "the template's processes ended with the run"
        assert running([worker_pid]) == [worker_pid] and worker.poll() is None, "the user's worker still runs"
    finally:
        stop_groups(worker, scheduler)


def worker_condition(client: Client) -> dict:
    """What a template may change in a worker process, as the worker sees it."""

    def look() -> dict:
        import multiprocessing

        return {
            "cwd": os.getcwd(),
            "stdout": type(sys.stdout).__name__,
            "stderr": type(sys.stderr).__name__,
            "sigterm": repr(signal.getsignal(signal.SIGTERM)),
            "sigint": repr(signal.getsignal(signal.SIGINT)),
            "signal.signal": signal.signal.__name__,
            "start method": multiprocessing.get_start_method(allow_none=True),
            "daemon": multiprocessing.current_process().daemon,
        }

    (condition,) = client.run(look).values()
    return condition


def test_attach_mode_leaves_the_users_worker_and_scheduler_as_they_were(workflow: Workflow):
    """A hung invocation fails and names the worker, which is neither restarted nor closed;
    what the template changed in the worker is put back, and the scheduler plugin removed."""
    write_sleeper(workflow, count=3)
    workflow.write(
        "scripts/work.py",
        """
        import time
        from snakemake_executor_plugin_sticky import sticky_state

        state = sticky_state(snakemake)
        if snakemake.wildcards.i == "1":
            time.sleep(600)
        open(snakemake.output[0], "w").write(f"{state['pid']} {state['job']} 0 0\\n")
    """,
    )
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dask")),
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--resources",
                "sticky-sleeper=2",
                "--nthreads",
                "2",
                "--memory-limit",
                "0",
                "--no-dashboard",
            ],
            cwd="/",
            env=snakemake_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with Client(scheduler_file=str(scheduler_file), timeout="30s", set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            (worker_pid,) = client.run(os.getpid).values()
            before = worker_condition(client)
            run = workflow.run(
                "--sticky-scheduler", str(scheduler_file), "--sticky-invocation-timeout", "4", "--keep-going", cores=2
            )
            assert run.returncode != 0
            assert "timed out after 4 s" in run.output and "is yours (attach mode) and is left as it is" in run.output
            assert f"pid {worker_pid}" in run.output, "the message names the hung worker"
            assert sorted(p.name for p in (workflow.root / "out").iterdir()) == ["0.txt", "2.txt"]
            assert worker.poll() is None and list(client.run(os.getpid).values()) == [worker_pid], "not restarted"
            assert worker_condition(client) == before, "the worker got back what the template changed"
            plugins = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.plugins))
            assert not [p for p in plugins if p.startswith("sticky")], plugins
    finally:
        for process in (worker, scheduler):
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_attach_mode_refuses_a_plain_tcp_scheduler_beyond_loopback(workflow: Workflow):
    write_sleeper(workflow, count=1)
    run = workflow.run("--sticky-scheduler", "tcp://10.11.12.13:8786")
    assert run.returncode != 0
    assert "a tcp:// scheduler without TLS beyond this machine is refused" in run.output
    assert "tls://10.11.12.13:8786" in run.output, "the message shows the TLS form"


@pytest.mark.parametrize("address", ["ws://10.11.12.13:8786", "ucx://10.11.12.13:8786", "10.11.12.13:8786"])
def test_attach_mode_refuses_every_scheme_without_tls_beyond_loopback(address: str):
    from snakemake_executor_plugin_sticky.head.engines.attach import refuse_plaintext

    with pytest.raises(WorkflowError, match="without TLS beyond this machine is refused"):
        refuse_plaintext(address, None)


@pytest.mark.parametrize("address", ["tls://10.11.12.13:8786", "wss://10.11.12.13:8786", "ws://127.0.0.1:8786"])
def test_attach_mode_takes_tls_anywhere_and_warns_of_plaintext_on_loopback(address: str):
    from snakemake_executor_plugin_sticky.head.engines.attach import refuse_plaintext

    warned = []
    refuse_plaintext(address, SimpleNamespace(warning=warned.append))
    assert bool(warned) == address.startswith("ws://"), warned


def test_attach_mode_names_the_package_whose_versions_differ(workflow: Workflow):
    from snakemake_executor_plugin_sticky.head.engines.attach import version_problems

    scheduler, scheduler_file = start_scheduler(workflow)
    try:
        with Client(scheduler_file=str(scheduler_file), timeout="30s", set_as_default=False) as client:
            versions = client.get_versions(check=False, packages=["snakemake-executor-plugin-sticky"])
        address = versions["scheduler"]["host"].get("address", "tcp://x")
        assert version_problems(versions, address) == []
        versions["scheduler"]["packages"]["snakemake-executor-plugin-sticky"] = "0.0.1"
        versions["scheduler"]["packages"]["distributed"] = None
        (first, second) = version_problems(versions, "tcp://s:1")
        mine = versions["client"]["packages"]
        assert (
            first
            == f"snakemake-executor-plugin-sticky {mine['snakemake-executor-plugin-sticky']} here, 0.0.1 on the scheduler (tcp://s:1)"
        )
        assert second == f"distributed {mine['distributed']} here, not installed on the scheduler (tcp://s:1)"
    finally:
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait(timeout=30)


def test_attach_mode_worker_offering_two_templates_holds_one(workflow: Workflow):
    """Batchers, stage() copies and the process tree are a process's: a hand-started worker that
    offers two templates' tags holds the template that reached it first and refuses the other,
    saying so; the other template's invocations run on a worker of its own."""
    write_sleeper(
        workflow,
        count=4,
        inputs=' + expand("other/{i}.txt", i=range(4))',
        extra_rules="""
        rule other:
            output: "other/{i}.txt"
            resources: sticky="other"
            script: "scripts/work.py"
        """,
    )
    workflow.write(
        "config.yaml",
        """
        sticky:
          sleeper:
            setup: template.py
            kwargs: {delay: 1}
          other:
            setup: template.py
            kwargs: {delay: 0}
    """,
    )
    scheduler, scheduler_file = start_scheduler(workflow)
    dask = str(Path(sys.executable).with_name("dask"))
    workers = []
    try:
        for resources in ("sticky-sleeper=1,sticky-other=1", "sticky-sleeper=1", "sticky-other=1"):
            workers.append(
                subprocess.Popen(
                    [dask, "worker", "--scheduler-file", str(scheduler_file), "--resources", resources]
                    + ["--nthreads", "1", "--memory-limit", "0", "--no-nanny", "--no-dashboard"],
                    cwd=workflow.root,
                    env=snakemake_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        run = workflow.run("--sticky-scheduler", str(scheduler_file), cores=3)
        assert run.returncode == 0, run.output
        sleeper = {pid for pid, *_ in invocations(workflow)}
        other = {pid for pid, *_ in invocations(workflow, "other")}
        assert sleeper and other and not sleeper & other, "no worker process ran both templates"
        assert str(workers[0].pid) in sleeper | other
        assert "a worker holds one template" in run.output and "Start one worker per template" in run.output
    finally:
        stop_groups(*workers, scheduler)


def test_slurm_worker_killed_takes_its_helpers_along_and_its_job_fails(workflow: Workflow, slurm: None):
    engine_workflow(workflow)
    proc = workflow.popen(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-max-workers",
        "2",
        "--sticky-memory",
        "1GB",
        "--jobs",
        "2",
        "--sticky-teardown-grace",
        "2",
        "--config",
        "count=8",
        "victim=2",
        cores=1,
        pipe=True,
    )
    wait_for(lambda: (workflow.root / "victim-ran").exists())
    victim = int(workflow.read("victim-ran"))
    theirs = helper_pids(workflow)[victim]
    job = subprocess.run(["cat", f"/proc/{victim}/environ"], capture_output=True).stdout.split(b"\0")
    job_id = next(v.split(b"=", 1)[1].decode() for v in job if v.startswith(b"SLURM_JOB_ID="))
    os.kill(victim, signal.SIGKILL)
    assert wait_until_gone(theirs) == [], "the supervisor ended the killed worker's pool, server and daemon"
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert len(engine_results(workflow)) == 8
    record = recorded_by_slurm(job_id)
    assert "JobState=FAILED" in record and "ExitCode=137" in record, record
    assert wait_until_gone(all_helpers(workflow)) == []
    assert slurm_jobs_in_queue(set(submitted_jobs(output))) == []
    assert not workflow.leftover_processes()


OTHER_EXECUTOR_RULES = """
        localrules: on_the_head_node
        rule plain:
            output: "plain.txt"
            shell: "echo ${{SLURM_JOB_ID:-none}} > {output}"
        rule on_the_head_node:
            output: "local.txt"
            shell: "echo ${{SLURM_JOB_ID:-none}} > {output}"
"""


@pytest.mark.parametrize("other", ["cluster-generic", "slurm"])
def test_other_executor_runs_the_jobs_that_are_not_sticky_as_slurm_jobs(workflow: Workflow, slurm: None, other: str):
    write_sleeper(workflow, count=3, inputs=', "plain.txt", "local.txt"', extra_rules=OTHER_EXECUTOR_RULES)
    flags = {
        "cluster-generic": ["--cluster-generic-submit-cmd", "sbatch --parsable -c 1 --mem 1G"],
        # CI's Slurm keeps no accounting (sacct); squeue remembers finished jobs for MinJobAge
        "slurm": ["--slurm-status-command", "squeue", "--default-resources", "mem_mb=1000"],
    }[other]
    run = workflow.run(
        "--sticky-other-executor",
        other,
        *flags,
        "--seconds-between-status-checks",
        "1",
        "--jobs",
        "4",
        cores=2,
    )
    assert run.returncode == 0, run.output
    job_id = workflow.read("plain.txt").strip()
    assert job_id.isdigit() and "plain" in recorded_by_slurm(job_id), job_id
    assert workflow.read("local.txt").strip() == "none", "localrules ran on the head node"
    assert len(invocations(workflow)) == 3  # sticky jobs still ran on the resident worker


def test_other_executor_from_python_takes_its_settings_from_other_executor_args(workflow: Workflow, slurm: None):
    """Driven through Snakemake's API there is no command line to read the other executor's flags from."""
    write_sleeper(workflow, count=2, inputs=', "plain.txt", "local.txt"', extra_rules=OTHER_EXECUTOR_RULES)
    workflow.write(
        "drive.py",
        """
        import sys
        from pathlib import Path
        from snakemake.api import SnakemakeApi
        from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
        from snakemake_executor_plugin_sticky import ExecutorSettings

        if __name__ == "__main__":  # worker processes start from this file's folder as any multiprocessing child
            settings = ExecutorSettings(
                other_executor="cluster-generic",
                other_executor_args="--cluster-generic-submit-cmd 'sbatch --parsable -c 1 --mem 1G'",
            )
            with SnakemakeApi(OutputSettings()) as api:
                workflow = api.workflow(
                    resource_settings=ResourceSettings(cores=2, nodes=4),
                    config_settings=ConfigSettings(configfiles=[Path("config.yaml")]),
                    snakefile=Path("Snakefile"),
                )
                workflow.dag().execute_workflow(executor="sticky", executor_settings=settings)
    """,
    )
    run = subprocess.run(
        [sys.executable, "drive.py", "--unrelated", "flags", "of", "the", "host", "program"],
        cwd=workflow.root,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert workflow.read("plain.txt").strip().isdigit(), "the plain job ran as a Slurm job"
    assert workflow.read("local.txt").strip() == "none"
    assert len(invocations(workflow)) == 2


def test_unknown_other_executor_is_named(workflow: Workflow):
    write_sleeper(workflow, count=1)
    run = workflow.run("--sticky-other-executor", "no-such-thing")
    assert run.returncode != 0
    assert "--sticky-other-executor no-such-thing: no such executor plugin is installed" in run.output


def test_slurm_workers_near_their_walltime_retire_and_are_replaced(workflow: Workflow, slurm: None):
    # walltime 10 s: each worker leaves in good order after 9 s, long before Slurm
    # would kill it (Slurm counts whole minutes), and new jobs take over the remaining invocations
    write_sleeper(workflow, count=24)
    run = workflow.run(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-max-workers",
        "2",
        "--sticky-walltime",
        "00:00:10",
        "--jobs",
        "2",
        cores=1,
    )
    assert run.returncode == 0, run.output
    assert len(invocations(workflow)) == 24
    submitted = submitted_jobs(run.output)
    assert len(submitted) >= 3, run.output
    assert "was lost" not in run.output  # retiring is orderly: no invocation was lost
    assert slurm_jobs_in_queue(set(submitted)) == []


POOL_TEMPLATE = """
import multiprocessing, os

KEPT = []  # a reference the template module keeps (a cache of loaders, say): teardown frees nothing

def setup(method):
    if method == "default":  # the worker's own start method made forkserver, as on Python 3.14
        multiprocessing.set_start_method("forkserver", force=True)
        pool = multiprocessing.Pool(2)
    else:
        pool = multiprocessing.get_context(method).Pool(2)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    open(f"pool-{os.getpid()}.txt", "w").write(" ".join(str(p.pid) for p in pool._pool))
    KEPT.append(pool)
    return {"pid": os.getpid(), "job": "none"}  # no teardown: the worker ends the pool's processes
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver", "default"])
def test_attach_mode_ends_a_template_pool_of_every_start_method(workflow: Workflow, method: str):
    """A pool the template started ends with the run, whatever its start method, though the user's
    worker stays: a forkserver pool's processes are children of the forkserver helper."""
    write_sleeper(workflow, count=2)
    workflow.write("templates/sleepy.py", POOL_TEMPLATE)
    workflow.write(
        "config.yaml", f"sticky:\n  sleeper:\n    setup: templates/sleepy.py\n    kwargs: {{method: {method}}}\n"
    )
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = start_kept_worker(workflow, scheduler_file, "sticky-sleeper=1")
        run = workflow.run("--sticky-scheduler", str(scheduler_file), "--sticky-teardown-grace", "1", cores=1)
        assert run.returncode == 0, run.output
        (record,) = workflow.root.glob("pool-*.txt")
        pool = [int(pid) for pid in record.read_text().split()]
        worker_pid = int(record.stem.split("-")[1])
        assert len(pool) == 2
        assert wait_until_gone(pool) == [], f"the {method} pool's processes ended with the run"
        assert running([worker_pid]) == [worker_pid], "the user's worker still runs"
    finally:
        stop_groups(worker, scheduler)


def test_scripts_see_their_outputs_on_slurm_as_under_the_local_executor(workflow: Workflow, slurm: None):
    """Folder names, an index beside its file, a file beside an output, a relative link between
    outputs, and the log of a job killed after writing it: as under the local executor."""
    fidelity_workflow(workflow)
    local = workflow.run("--keep-going", executor="local", cores=2)
    assert local.returncode != 0 and local.output.count("Error in rule crash") == 2, local.output
    expected = fidelity_results(workflow)
    assert expected["logs/crash/s1.log"] == "loaded, then died\n" and "ref/s1/genome.fa.md5" in expected
    assert json.loads(expected["names/s2/s.json"]) == {"parent": "s2", "grandparent": "names", "name": "s.json"}
    clear_fidelity_results(workflow)
    run = workflow.run(
        "--keep-going",
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-invocation-crashes",
        "1",
        "--jobs",
        "4",
        cores=1,
    )
    assert run.returncode != 0 and run.output.count("Error in rule crash") == 2, run.output
    assert fidelity_results(workflow) == expected
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []
    assert not workflow.leftover_processes()


def test_slurm_worker_holding_the_interpreter_lock_for_twice_the_node_timeout_is_not_given_up(
    workflow: Workflow, slurm: None
):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/record.py", HOLDS_THE_LOCK)
    run = workflow.run(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-node-timeout",
        "10",
        "--jobs",
        "1",
        "--config",
        "count=2",
        "hold=20",
        cores=1,
    )
    assert run.returncode == 0, run.output
    assert "left the run without retiring" not in run.output and "was lost" not in run.output, run.output
    assert len(set(workflow.lines("setups-llm.txt"))) == 1, "one worker job, never given up"
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []
    assert not workflow.leftover_processes()


def test_attach_mode_is_fenced_and_scripts_see_their_outputs_as_in_place(workflow: Workflow):
    """Attached workers may be on other hosts and given up while they write: their scripts write
    in attempt folders of the run, moved into place when the run accepts them."""
    fidelity_workflow(workflow)
    workflow.write(
        "scripts/name.py",
        workflow.read("scripts/name.py") + "open('seen-' + out.parent.name, 'w').write(os.path.realpath(out))\n",
    )
    workflow.write("scripts/name.py", "import os\n" + workflow.read("scripts/name.py"))
    targets = ["ref/s1/genome.fa.fai", "names/s1/s.json", "links/s1/latest.txt"]
    local = workflow.run(*targets, executor="local", cores=1)
    assert local.returncode == 0, local.output
    expected = fidelity_results(workflow)
    clear_fidelity_results(workflow)
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = start_kept_worker(workflow, scheduler_file, "sticky-llm=1")
        run = workflow.run(*targets, "--sticky-scheduler", str(scheduler_file), cores=1)
        assert run.returncode == 0, run.output
        assert fidelity_results(workflow) == expected
        written = workflow.read("seen-s1")
        assert "/.snakemake/sticky/runs/" in written and "/attempts/" in written, written
        assert not list((workflow.root / ".snakemake" / "sticky" / "runs").glob("*")), "the run's folder is gone"
    finally:
        stop_groups(worker, scheduler)


BIG_AND_SMALL = """
configfile: "config.yaml"
rule all:
    input: "scratch/big.bin", expand("out/{i}.txt", i=range(20))
rule big:
    output: "scratch/big.bin"
    resources: sticky="llm"
    script: "scripts/big.py"
rule small:
    output: "out/{i}.txt"
    resources: sticky="llm"
    script: "scripts/small.py"
"""


def test_a_large_output_on_another_file_system_is_renamed_into_place_on_slurm(workflow: Workflow, slurm: None):
    """The output's folder is a tmpfs (through a link in the working directory): the attempt
    writes it there, and accepting it is a rename, while short invocations complete."""
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(scratch).st_dev != os.stat(workflow.root).st_dev
        os.symlink(scratch, workflow.root / "scratch")
        workflow.write("Snakefile", BIG_AND_SMALL)
        workflow.write("config.yaml", LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
        workflow.write("templates/counting.py", COUNTING_TEMPLATE)
        workflow.write(
            "scripts/big.py",
            """
            import os
            from snakemake_executor_plugin_sticky import sticky_state
            sticky_state(snakemake)
            with open(snakemake.output[0], "wb") as f:
                for _ in range(200):
                    f.write(os.urandom(2**20))
            os.makedirs("inodes", exist_ok=True)
            open("inodes/big", "w").write(str(os.stat(snakemake.output[0]).st_ino))
            """,
        )
        workflow.write("scripts/small.py", "open(snakemake.output[0], 'w').write('small')\n")
        run = workflow.run(
            "--sticky-cluster", "slurm", "--sticky-interface", "lo", "--jobs", "4", "--sticky-max-workers", "2", cores=1
        )
        assert run.returncode == 0, run.output
        big = scratch / "big.bin"
        assert big.stat().st_size == 200 * 2**20
        assert str(big.stat().st_ino) == workflow.read("inodes/big"), "accepted with a rename, not a copy"
        assert sorted(os.listdir(scratch)) == ["big.bin"], "no attempt folder is left beside it"
        assert len(list((workflow.root / "out").glob("*.txt"))) == 20
        assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []
    finally:
        shutil.rmtree(scratch)


def test_a_hung_invocation_among_400_short_ones_on_slurm_holds_up_only_itself(workflow: Workflow, slurm: None):
    on_slurm = ["--sticky-cluster", "slurm", "--sticky-interface", "lo", "--sticky-max-workers", "2", "--jobs", "64"]
    run = hang_among_400(workflow, *on_slurm, cores=1, timeout=400)
    assert slurm_jobs_in_queue(set(submitted_jobs(run.output))) == []
    assert not workflow.leftover_processes()
