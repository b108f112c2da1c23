"""The embedded Dask engine on its own (real scheduler, real Nanny workers, no Snakemake run)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil

from snakemake_executor_plugin_sticky import ExecutorSettings
from snakemake_executor_plugin_sticky.head.engines.local import EmbeddedBackend
from snakemake_executor_plugin_sticky.head.process_changes import ProcessChanges
from snakemake_executor_plugin_sticky.templates import parse_templates
from snakemake_executor_plugin_sticky.wire import Invocation

SLOW_SETUP = """
import os, time
def setup(seconds):
    began = time.monotonic()
    while not os.path.exists("release") or time.monotonic() - began < seconds:  # a long model load
        time.sleep(0.05)
    return {"pid": os.getpid()}
def teardown(state):
    open("teardown.txt", "w").write(str(state["pid"]))
"""

SCRIPT = """
from snakemake_executor_plugin_sticky import sticky_state
open(snakemake.output[0], "w").write(str(sticky_state(snakemake)["pid"]))
"""


class Log:
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def error(self, msg: str) -> None: ...


def test_worker_stays_responsive_while_building_state_and_tears_down(tmp_path: Path):
    (tmp_path / "slow.py").write_text(SLOW_SETUP)
    (tmp_path / "script.py").write_text(SCRIPT)
    spec = parse_templates({"sticky": {"slow": {"setup": "slow.py", "kwargs": {"seconds": 8}}}}, tmp_path)["slow"]
    settings = ExecutorSettings(workers=1, setup_attempts=1, setup_retry_delay=0.0)
    backend = EmbeddedBackend(str(tmp_path), settings, Log(), lambda event: None, ProcessChanges())
    try:
        backend.start_pool(spec)
        backend.client.wait_for_workers(1, timeout=60)
        # while setup is busy in its thread (until the test releases it), the worker's event loop answers
        (pid,) = backend.client.run(os.getpid).values()
        (tmp_path / "release").touch()
        done = threading.Event()
        outcomes = []
        snakemake = SimpleNamespace(
            output=[str(tmp_path / "out.txt")], resources={"sticky": "slow"}, config={}, rule="r", threads=1
        )
        invocation = Invocation("k1", "slow", spec.identity, spec.tag, "r", 1, str(tmp_path / "script.py"), snakemake)
        backend.submit([[(invocation, lambda inv, outcome: (outcomes.append(outcome), done.set()))]])
        assert done.wait(60)
        (outcome,) = outcomes
        assert outcome.ok, outcome.error
        assert outcome.pid == pid and (tmp_path / "out.txt").read_text() == str(pid)
        assert outcome.extra["setup_s"] >= 8
    finally:
        backend.close()
    assert (tmp_path / "teardown.txt").read_text() == str(pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
