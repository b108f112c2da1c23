"""What a run with batch-job workers keeps on disk, and what the next run does with what a dead
run left.

A run has an id; its worker jobs are named `sticky-<template>-<run id>`, and its folder
`.snakemake/sticky/runs/<run id>/` holds who owns it (host, pid), the ids of the jobs it submitted
and the run's TLS credentials. A run that ends in order cancels its jobs and removes the folder.
One that dies (SIGKILL, a lost login node) cannot: its queued jobs would wait in the queue and
start workers that find no scheduler. The next run in the working directory (Snakemake's lock
keeps two from running there at once) cancels those jobs and removes the folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

COMMAND_TIMEOUT_S = 60


def process_start(pid: int) -> Optional[str]:
    """The start time of a process of this host (to tell it from a later one with its pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class RunFolder:
    """This run's folder: who owns it, the jobs it submitted, its credentials."""

    path: Path
    run_id: str

    @classmethod
    def create(cls, runs: Path, system: str, cancel_command: str) -> "RunFolder":
        """A new run id and its folder, readable by the user alone."""
        run_id = secrets.token_hex(4)
        path = runs / run_id
        path.mkdir(parents=True, mode=0o700)
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": process_start(os.getpid()),
            "system": system,
            "cancel": cancel_command,
        }
        (path / "owner.json").write_text(json.dumps(owner) + "\n")
        return cls(path, run_id)

    @property
    def credentials(self) -> Path:
        """The folder of the run's TLS credentials."""
        return self.path / "tls"

    def job_submitted(self, job_id: str) -> None:
        """Note a job id, for the next run to cancel should this one die."""
        with open(self.path / "jobs", "a") as f:
            f.write(f"{job_id}\n")

    def remove(self) -> None:
        """The run ended in order: its folder goes."""
        shutil.rmtree(self.path, ignore_errors=True)


def not_ours(folder: Path) -> Optional[str]:
    """Why a run's folder may not be trusted (its owner.json names a command to run), or None:
    the folder and what it holds must belong to this user, and nobody else may write there."""
    for path in (folder, folder / "owner.json", folder / "jobs"):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if info.st_uid != os.getuid():
            return f"{path.name} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})"
        if info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
            return f"{path.name} is a link or writable by others"
    return None


def clean_stale_runs(runs: Path, log: Any) -> None:
    """Cancel the jobs of runs that died here and remove their folders (credentials included)."""
    if not runs.is_dir():
        return
    for folder in sorted(runs.iterdir()):
        stranger = not_ours(folder)
        if stranger is not None:  # its cancel command is not ours to run, nor its folder to remove
            log.warning(f"Sticky: {folder} is left as it is: {stranger}.")
            continue
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # a run that died as it began
            continue
        here = owner.get("host") == socket.gethostname()
        if here and owner.get("started") is not None and process_start(owner["pid"]) == owner["started"]:
            continue  # still running (with --nolock): not ours to clean
        jobs = (folder / "jobs").read_text().split() if (folder / "jobs").exists() else []
        if jobs:
            command = shlex.split(owner.get("cancel", "")) + jobs
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
                outcome = (
                    "" if done.returncode == 0 else f" ({' '.join(command[:1])} said: {done.stderr.strip()[:200]})"
                )
            except (OSError, subprocess.SubprocessError) as e:
                outcome = f" ({e})"
            log.info(
                f"Sticky: run {folder.name} (pid {owner.get('pid')} on {owner.get('host')}) ended without "
                f"cleaning up; cancelled its {len(jobs)} {owner.get('system')} job(s) {', '.join(jobs)}{outcome}."
            )
        shutil.rmtree(folder, ignore_errors=True)
