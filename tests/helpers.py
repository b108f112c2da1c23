"""Helpers the test modules share (instead of importing each other)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from snakemake_executor_plugin_sticky.api import resident, stage
from snakemake_executor_plugin_sticky.api.resident import StageSettings


class TestResident:
    """A resident worker as the api sees it (api/resident.py), in the test's own process: what
    stage() and the Batcher ask of one, and the events it would announce."""

    __test__ = False  # not a test class

    def __init__(self, stage_settings: StageSettings, dask_worker: Any = None, running: int = 0) -> None:
        self.template = "test"
        self.stage_settings = stage_settings
        self.dask_worker = dask_worker
        self.running = running
        self.events: list[tuple[type, dict[str, Any]]] = []

    def state(self) -> Any:
        return None

    def poisons(self, error: BaseException) -> bool:
        return False

    def invocations_running(self) -> int:
        return self.running

    def announce(self, kind: type, **fields: Any) -> None:
        self.events.append((kind, fields))


@contextmanager
def as_resident(
    cache_dir: Optional[str] = None, cache_size: Optional[int] = None, dask_worker: Any = None
) -> Iterator[TestResident]:
    """This process as a resident worker with these stage() settings, for the block."""
    this = TestResident(StageSettings(cache_dir=cache_dir, cache_size=cache_size), dask_worker)
    resident.attach(this)
    try:
        yield this
    finally:
        stage.release_all()
        stage.forget_pool()
        resident.attach(None)
