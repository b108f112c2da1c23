"""The fence around workers the run may give up: a batch-job worker whose node is cut off the
network or frozen still runs, and its writes may still reach the shared file system after its
invocations ran again elsewhere. Its scripts write in folders of their own attempt
(worker/task.py, `fenced`); an attempt's outputs and logs move into place only when the run
accepts its result, and never come from a worker the run has given up."""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ..wire import Invocation, InvocationResult, attempt_path


class Fence:
    """The attempt folders of one run, and the workers it has given up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.left: dict[str, float] = {}  # name -> when: workers that left without retiring
        self.given_up: set[tuple[str, str]] = set()  # (worker, invocation) that runs again elsewhere

    def worker_left(self, address: str, name: str, running: Sequence[str]) -> None:
        """A worker left without retiring (lost, preempted, unheard), with these invocations
        running: they run again on other workers, and nothing of them is accepted from this one
        from now on. A worker that finished its invocations before it left loses nothing."""
        self.left.setdefault(name or address, time.monotonic())
        self.given_up.update((address, key) for key in running)

    def accept(self, invocation: Invocation, outcome: Any) -> Any:
        """Move the attempt's logs (and, when it succeeded, its outputs) into place, and remove
        the invocation's attempt folders. Returns the outcome Snakemake hears: a failure in
        place of a result from a worker given up, or of one whose files could not be moved."""
        attempt = outcome.extra.get("attempt") if isinstance(outcome, InvocationResult) else None
        try:
            if attempt is None:
                return outcome
            if (outcome.address, invocation.key) in self.given_up:
                return dataclasses.replace(
                    outcome,
                    error=f"The result came from worker {outcome.worker} ({outcome.address}), which the run "
                    "had given up (unheard for longer than --sticky-node-timeout); it is discarded.",
                )
            try:
                self._move_into_place(invocation, attempt, outputs=outcome.ok)
            except OSError as e:
                return dataclasses.replace(
                    outcome, error=f"The outputs of the invocation could not be moved into place: {e}"
                )
            return outcome
        finally:
            for folder in glob.glob(os.path.join(glob.escape(str(self.folder)), f"{invocation.key}.*")):
                shutil.rmtree(folder, ignore_errors=True)

    def _move_into_place(self, invocation: Invocation, attempt: str, outputs: bool) -> None:
        kinds = ("log", "output") if outputs else ("log",)
        for kind in kinds:
            for index, path in enumerate(getattr(invocation.snakemake, kind)):
                written = attempt_path(attempt, kind, index, str(path))
                if os.path.lexists(written):
                    move(written, str(path))


def move(source: str, target: str) -> None:
    """A rename where both are on one file system (atomic), a copy across file systems."""
    if os.path.dirname(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)  # Snakemake removed its outputs before the job: a leftover
    elif os.path.lexists(target):
        os.remove(target)
    try:
        os.replace(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(source, target)
