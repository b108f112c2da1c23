"""The resident worker this process is, as the api sees it: one accessor, `current()`, None in
any process that is not a sticky worker (a job under another executor, a test).

The api's functions run in a worker or anywhere else, and must not depend on the worker's code.
A worker, as it becomes resident, attaches an object that answers the questions below (it is
worker/resident.py's ResidentWorker); the api asks it, and does without it elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass(frozen=True)
class StageSettings:
    """How stage() caches in this worker (from the run's --sticky-cache-* settings)."""

    cache_dir: Optional[str] = None
    cache_size: Optional[int] = None  # bytes
    readers: int = 1  # nodes of the pool that read a source from the shared file system at once


class Resident(Protocol):
    """What the api may ask of the resident worker it runs in."""

    template: str  # the name of the template this worker holds
    stage_settings: StageSettings
    dask_worker: Any  # the Dask worker, for stage()'s peers and the pool's semaphores (None in tests)

    def state(self) -> Any:
        """The template's state, waiting for it to be built (sticky_state)."""

    def poisons(self, error: BaseException) -> bool:
        """Whether the template declares this exception as one that leaves its state unusable."""

    def invocations_running(self) -> int:
        """Invocations running in this process now (a Batcher waits only for their items)."""

    def announce(self, kind: type, **fields: Any) -> None:
        """Tell the run something of this worker: an event record of wire.py (Staged, WorkerWarning)."""


_resident: Optional[Resident] = None


def current() -> Optional[Resident]:
    """The resident worker this process is, or None where it is none."""
    return _resident


def attach(resident: Optional[Resident]) -> None:
    """Called by a worker as it becomes resident (None: as it leaves)."""
    global _resident
    _resident = resident
