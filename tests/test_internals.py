"""The internals of Dask, dask-jobqueue, Snakemake and Python's standard library that the plugin
relies on are still there, in the shape it uses. A failure here names the internal: the plugin
must follow it before the dependency's new version is admitted in pyproject.toml."""

from __future__ import annotations

import inspect
import multiprocessing.forkserver
import multiprocessing.resource_tracker

import dask
import pytest


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_distributed_internals():
    import distributed
    from distributed import Nanny, Scheduler, Worker
    from distributed.diagnostics.plugin import SchedulerPlugin
    from distributed.nanny import WorkerProcess
    from distributed.utils import get_ip_interface  # noqa: F401  (--sticky-interface)

    assert inspect.iscoroutinefunction(Nanny._on_worker_exit), "Nanny._on_worker_exit (a worker's exit status)"
    assert "exitcode" in parameters(Nanny._on_worker_exit)
    assert "self.worker_address" in inspect.getsource(WorkerProcess), "WorkerProcess.worker_address"
    assert hasattr(Nanny, "pre_spawn_env") or "pre_spawn_env" in inspect.getsource(Nanny.__init__), (
        "Nanny.pre_spawn_env"
    )
    assert "log_event" in vars(SchedulerPlugin), "SchedulerPlugin.log_event (invocations running on a worker)"
    assert "remove_worker" in vars(SchedulerPlugin) and "stimulus_id" in parameters(SchedulerPlugin.remove_worker)
    for name in ("get_current_task", "log_event", "set_resources", "close"):
        assert hasattr(Worker, name), f"Worker.{name}"
    assert "executing_count" in inspect.getsource(distributed.worker_state_machine.WorkerState), (
        "WorkerState.executing_count"
    )
    for name in ("retire_workers", "close_worker", "log_event"):
        assert hasattr(Scheduler, name), f"Scheduler.{name}"
    assert "http_server" in inspect.getsource(distributed.node.ServerNode.start_http_server), "ServerNode.http_server"
    assert "connect" in vars(pytest.importorskip("distributed.dashboard.scheduler")), "the dashboard's connect()"
    broker = inspect.getsource(distributed.broker.Broker.__init__)
    assert "self._topics" in broker and "subscribers" in inspect.getsource(distributed.broker.Topic), (
        "Scheduler._broker._topics[topic].subscribers (scheduler_plugin.subscribed)"
    )
    for key in (
        "distributed.scheduler.allowed-failures",
        "distributed.worker.multiprocessing-method",
        "distributed.nanny.pre-spawn-environ",
    ):
        assert dask.config.get(key, default=None) is not None, key


def test_dask_jobqueue_internals():
    from dask_jobqueue.core import Job
    from dask_jobqueue.slurm import SLURMJob

    assert "worker_command" in parameters(Job.__init__), "Job(worker_command=...): the supervisor runs the worker"
    assert hasattr(Job, "job_file") and hasattr(Job, "_job_id_from_submit_output")
    assert SLURMJob.submit_command == "sbatch" and SLURMJob.cancel_command == "scancel"


def test_snakemake_internals():
    import snakemake.api  # noqa: F401  (imports Snakemake's modules in the order they need)
    from snakemake.executors.local import Executor as LocalExecutor  # noqa: F401
    from snakemake.iocontainers import Snakemake
    from snakemake.jobs import Job
    from snakemake.workflow import Workflow

    assert parameters(Snakemake.__init__)[1:] == [
        "input_",
        "output",
        "params",
        "wildcards",
        "threads",
        "resources",
        "log",
        "config",
        "rulename",
        "bench_iteration",
        "scriptdir",
    ], "snakemake.iocontainers.Snakemake (the script's `snakemake` object)"
    assert inspect.iscoroutinefunction(Job.prepare), "Job.prepare"
    assert hasattr(Job, "_path_to_source_file"), "Job._path_to_source_file (the script's path)"
    assert "_localrules" in inspect.getsource(Workflow.is_local), "Workflow._localrules (localrules stay local)"
    assert hasattr(Workflow, "async_run")
    scheduling = pytest.importorskip("snakemake.scheduling.job_scheduler")
    source = inspect.getsource(scheduling)
    assert "self._schedule_reevalutation(self.job_rate_limiter.timespan)" in source, (
        "the job rate limiter's Timer, a method of the scheduler (coalesce_wakeups, cancel_pending_reevaluations)"
    )
    init, finish = inspect.getsource(scheduling.JobScheduler.__init__), inspect.getsource(scheduling.JobScheduler)
    assert "self.finish_callback = self._proceed" in init and "self._open_jobs = threading.Semaphore(0)" in init, (
        "JobScheduler.finish_callback and its semaphore (ProcessChanges.coalesce_wakeups)"
    )
    walk = inspect.getsource(Job.is_pipe_or_service_input)
    assert "self.dag.dependencies[self]" in walk and "pipe_or_service_output" in walk, (
        "Job.is_pipe_or_service_input walks the dependencies (ProcessChanges.skip_pipe_lookups)"
    )
    flags = inspect.getsource(Job.__init__)
    assert 'is_flagged(f_, "pipe") or is_flagged(f_, "service")' in flags, "a job's pipe outputs are its rule's"
    assert "self._tofinish.clear()" in finish and "self._finish_jobs()" in finish, (
        "a pass of the scheduler's loop finishes every job in _tofinish (coalesce_wakeups)"
    )


def test_multiprocessing_internals():
    source = inspect.getsource(multiprocessing.forkserver.main)
    assert "os.fork()" in source and "os.waitpid(-1, os.WNOHANG)" in source, (
        "the forkserver loop forks with os.fork and collects with os.waitpid (forkserver_reaper.py)"
    )
    assert "from multiprocessing.forkserver import main" in inspect.getsource(multiprocessing.forkserver)
    assert hasattr(multiprocessing.resource_tracker._resource_tracker, "_pid")
    assert hasattr(multiprocessing.forkserver._forkserver, "_forkserver_pid")


def test_standard_library_internals_of_isolation():
    """worker/isolation routes what a script changes through these."""
    import importlib._bootstrap
    import logging
    import random
    import sys
    import warnings

    assert "_new_module" in importlib._bootstrap.module_from_spec.__code__.co_names, (
        "importlib._bootstrap._new_module makes the modules of module_from_spec (system.py)"
    )
    assert callable(logging._checkLevel), "logging._checkLevel (logs.py: Manager.disable)"
    disable = logging.Manager.__dict__.get("disable")
    assert disable is None or isinstance(disable, property), "logging.Manager.disable (logs.py)"
    assert "_cache" in vars(logging.getLogger("sticky-internals")), "Logger._cache (logs.py)"
    assert isinstance(random._inst, random.Random), "random._inst (libraries.py)"
    assert callable(warnings._filters_mutated) and isinstance(warnings.filters, list), "warnings (libraries.py)"
    assert {"stdout", "stderr"} <= set(vars(sys)), "sys's own streams in its module dict (context.py)"
    assert sys._getframe(0).f_code.co_name == "test_standard_library_internals_of_isolation", (
        "sys._getframe (context.py)"
    )
    assert type(sys) is type(warnings), "modules are plain module objects (system.py, libraries.py)"


def test_optional_library_internals_of_isolation():
    """Routed only where the script's process has them loaded."""
    numpy_random = pytest.importorskip("numpy.random")
    assert isinstance(numpy_random.mtrand._rand, numpy_random.RandomState), "numpy.random.mtrand._rand"
    helpers = pytest.importorskip("matplotlib._pylab_helpers")
    assert isinstance(helpers.Gcf.figs, dict), "matplotlib._pylab_helpers.Gcf.figs (pyplot's figures)"
