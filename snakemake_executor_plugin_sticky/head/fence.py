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
        """Move the attempt's logs (and, when it succeeded, everything it wrote) into place, and
        remove the invocation's attempt folders. Returns the outcome Snakemake hears: a failure in
        place of a result from a worker given up, or of one whose files could not be moved. A
        failure without a result (a crash, a timeout) keeps the logs of its latest attempt."""
        attempt = outcome.extra.get("attempt") if isinstance(outcome, InvocationResult) else None
        attempts = glob.glob(os.path.join(glob.escape(str(self.folder)), f"{invocation.key}.*"))
        try:
            if attempt is None:
                if attempts and not isinstance(outcome, InvocationResult):
                    self._keep_logs(invocation, last_logged(invocation, attempts))
                return outcome
            if (outcome.address, invocation.key) in self.given_up:
                return dataclasses.replace(
                    outcome,
                    error=f"The result came from worker {outcome.worker} ({outcome.address}), which the run "
                    "had given up (unheard for longer than --sticky-node-timeout); it is discarded.",
                )
            try:
                if outcome.ok:
                    self._move_into_place(invocation, attempt)
                else:
                    self._keep_logs(invocation, attempt)
            except OSError as e:
                return dataclasses.replace(
                    outcome, error=f"The outputs of the invocation could not be moved into place: {e}"
                )
            return outcome
        finally:
            for folder in attempts:
                for beside in beside_folders(invocation, folder):
                    shutil.rmtree(beside, ignore_errors=True)
                shutil.rmtree(folder, ignore_errors=True)

    def _keep_logs(self, invocation: Invocation, attempt: str) -> None:
        """The attempt's logs go into place (a failed job's outputs do not)."""
        for path in invocation.snakemake.log:
            for written in (attempt_path(attempt, str(path)), attempt_path(attempt, str(path), beside=True)):
                if os.path.lexists(written):
                    move(written, str(path))

    def _move_into_place(self, invocation: Invocation, attempt: str) -> None:
        """Everything the attempt wrote goes to the same path in place: its outputs and logs, and
        what the script wrote beside them."""
        declared = [str(p) for p in invocation.snakemake.output]
        whole = {os.path.normpath(p) for p in declared} | {os.path.abspath(p) for p in declared}
        move_tree(attempt, os.curdir, whole, skip={".absolute"})
        move_tree(os.path.join(attempt, ".absolute"), os.sep, whole)
        for beside in beside_folders(invocation, attempt):
            move_tree(beside, os.path.dirname(beside), whole)


def last_logged(invocation: Invocation, attempts: list[str]) -> str:
    """The attempt whose log is the one to keep after a crash: the one that wrote into its log
    last. A later attempt that only opened its log (a run again that was cut off before it wrote)
    tells less; without any log written, the attempt begun last."""

    def written(attempt: str) -> float:
        paths = [attempt_path(attempt, str(p), beside=b) for p in invocation.snakemake.log for b in (False, True)]
        return max((os.path.getmtime(p) for p in paths if os.path.isfile(p) and os.path.getsize(p)), default=0.0)

    return max(attempts, key=lambda attempt: (written(attempt), os.path.getmtime(attempt)))


def beside_folders(invocation: Invocation, attempt: str) -> set[str]:
    """The attempt's folders next to its outputs and logs on other file systems that exist."""
    kinds = [*invocation.snakemake.output, *invocation.snakemake.log]
    folders = {os.path.dirname(attempt_path(attempt, str(p), beside=True)) for p in kinds}
    return {folder for folder in folders if os.path.isdir(folder)}


def move_tree(source: str, target: str, whole: set[str], skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Move every file and link below `source` to the same place below `target`; a folder in
    `whole` (a folder output) moves as one. Top-level entries named in `skip` stay."""
    for folder, folders, files in os.walk(source):
        here = os.path.normpath(os.path.join(target, os.path.relpath(folder, source)))
        if folder == source:
            folders[:] = [f for f in folders if f not in skip]
        for name in list(folders):
            path, destination = os.path.join(folder, name), os.path.join(here, name)
            if os.path.islink(path) or os.path.normpath(destination) in whole:
                move(path, destination)
                folders.remove(name)
        for name in files:
            move(os.path.join(folder, name), os.path.join(here, name))


def move(source: str, target: str) -> None:
    """A rename: the attempt wrote on the target's own file system (wire.attempt_path). Should
    the system refuse it all the same (two mounts of one file system), a copy."""
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
