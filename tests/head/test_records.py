"""The run's records, fed typed events and outcomes: no Snakemake, no Dask, no process."""

from __future__ import annotations

from pathlib import Path

from snakemake_executor_plugin_sticky.head.report.records import RunRecords
from snakemake_executor_plugin_sticky.templates import parse_template
from snakemake_executor_plugin_sticky.wire import (
    Invocation,
    InvocationResult,
    Poisoned,
    Ready,
    Removed,
    SetupStarted,
    Staged,
    WorkerExited,
    WorkerWarning,
)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))


def records(tmp_path: Path) -> tuple[RunRecords, Log]:
    (tmp_path / "t.py").write_text("def setup():\n    return 1\n")
    log = Log()
    spec = parse_template("llm", {"setup": "t.py", "slots": 2}, tmp_path)
    return RunRecords({"llm": spec}, log), log


def worker(n: int) -> dict:
    return dict(template="llm", name=f"llm-{n}", address=f"tls://w{n}", host="h", pid=100 + n, gpus=(), time=10.0)


def invocation(key: str) -> Invocation:
    return Invocation(key, "llm", "id", "sticky-llm", "verify", 1, "/s.py", None)


def test_a_worker_is_recorded_from_its_events_and_its_invocations(tmp_path: Path):
    run, log = records(tmp_path)
    run.workers_requested(run.templates["llm"], 1)
    run.record(SetupStarted(**worker(0)))
    run.record(
        Staged(
            **worker(0),
            source="/m",
            origin="shared",
            bytes=2_000_000,
            seconds=0.5,
            copy_seconds=0.4,
            stage_started=10.1,
        )
    )
    run.record(Ready(**{**worker(0), "time": 12.0}, setup_s=2.0, setup_started=10.0))
    run.invocation_submitted(invocation("k1"))
    run.invocation_finished(invocation("k1"), InvocationResult("k1", "llm-0", "tls://w0", 100, 12.0, 12.5))
    (record,) = run.workers.values()
    assert record.id == "llm-0#1" and record.setup_s == 2.0 and record.invocations == 1 and record.busy_s == 0.5
    assert record.stagings[0]["from"] == "shared"
    assert [text for _, text in log.lines] == [
        "Sticky worker llm-0#1 (template 'llm', pid 100) is building its state.",
        "Sticky worker llm-0#1 staged /m (2.0 MB) from shared in 0.50 s (the copy 0.40 s).",
        "Sticky worker llm-0#1 is ready (setup 2.00 s).",
    ]
    assert "llm: workers 0 starting / 1 ready, invocations 0 running / 0 waiting / 1 done" in run.status_line()


def test_a_removal_is_a_loss_unless_the_worker_retired_or_was_preempted(tmp_path: Path):
    run, log = records(tmp_path)
    run.record(SetupStarted(**worker(0)))
    run.record(SetupStarted(**worker(1)))
    lost = run.record(Removed(address="tls://w0", graceful=False, running=("k1",), time=20.0))
    assert lost is not None and lost.lost and lost.gone_at == 20.0
    assert (
        "warning",
        "Sticky worker llm-0#1 (template 'llm') was lost; its running invocations go to another worker.",
    ) in log.lines
    run.retiring("llm")
    assert run.record(Removed(address="tls://w1", graceful=False, running=(), time=21.0)) is None
    assert run.workers["tls://w1"].retired and not run.workers["tls://w1"].lost
    run.record(WorkerExited(address="tls://w0", exitcode=-11))
    assert run.workers["tls://w0"].exit == "killed by signal 11 (SIGSEGV)"
    run.record(SetupStarted(**{**worker(0), "address": "tls://w0b"}))
    assert run.workers["tls://w0b"].id == "llm-0#2", "a replacement is the next incarnation"


def test_a_worker_that_dies_before_its_first_event_is_a_loss_all_the_same(tmp_path: Path):
    """Killed as its setup began, before its first event left it: the scheduler's removal is all
    the run hears. It is counted (the template's loss budget depends on it) and named."""
    run, log = records(tmp_path)
    lost = run.record(Removed(address="tls://w1", graceful=False, running=(), time=20.0, name="llm-1"))
    assert lost is not None and lost.lost and lost.template == "llm" and lost.id == "llm-1#1"
    assert (
        "warning",
        "Sticky worker llm-1#1 (template 'llm') was lost; its running invocations go to another worker.",
    ) in log.lines
    assert run.describe_worker("tls://w1") == "worker llm-1#1"
    run.record(SetupStarted(**{**worker(1), "address": "tls://w1b"}))
    assert run.workers["tls://w1b"].id == "llm-1#2" and "replaces a lost one" in log.lines[-1][1]
    # a worker that is not the run's (attach mode), or one that left on purpose, is not counted
    assert run.record(Removed(address="tls://x", graceful=False, running=(), time=21.0, name="theirs-0")) is None
    assert run.record(Removed(address="tls://w2", graceful=True, running=(), time=21.0, name="llm-2")) is None
    assert set(run.workers) == {"tls://w1", "tls://w1b"}


def test_a_rebuild_keeps_the_first_setup_and_counts(tmp_path: Path):
    run, log = records(tmp_path)
    run.record(Ready(**worker(0), setup_s=2.0, setup_started=8.0))
    run.record(Poisoned(**worker(0), cause="OutOfMemoryError in rule verify"))
    run.record(Ready(**worker(0), setup_s=3.0, setup_started=15.0))
    record = run.workers["tls://w0"]
    assert record.setup_s == 2.0 and record.rebuilds == 1
    assert log.lines[-1] == ("info", "Sticky worker llm-0#1 rebuilt its state (3.00 s).")
    run.record(WorkerWarning(**worker(0), text="no reaper guards this worker"))
    assert log.lines[-1] == ("warning", "Sticky worker llm-0#1 (pid 100): no reaper guards this worker")


def test_workers_alive_at_the_end_count_as_retired_in_the_snapshot(tmp_path: Path):
    run, _ = records(tmp_path)
    run.record(Ready(**worker(0), setup_s=1.0, setup_started=9.0))
    run.closing = True
    assert run.workers_alive() == {"llm": 1}
    workers, invocations = run.snapshot(closing_at=30.0)
    assert workers[0].gone_at == 30.0 and workers[0].retired and invocations == []
