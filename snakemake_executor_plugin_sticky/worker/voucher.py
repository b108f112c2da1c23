"""Runs in the supervisor (supervisor.py), a process beside its worker: vouches to the scheduler,
once a second, that the worker's process is alive and not stopped.

A worker says it is alive with heartbeats from its event loop. A step that holds Python's
interpreter lock (a C call that never releases it) stops them, and the run would take a busy
worker for a lost one after --sticky-node-timeout. The supervisor's word keeps it (the scheduler
plugin's VOUCH_HANDLER). A node cut off, frozen or crashed vouches for nothing: its worker is
still given up in time.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Optional

from ..wire import VOUCH_HANDLER

VOUCH_S = 1.0  # how often the supervisor vouches for its worker


FLAGS = ("--name", "--scheduler-file", "--tls-ca-file", "--tls-cert", "--tls-key")


def worker_options(argv: list[str]) -> Optional[dict[str, str]]:
    """The scheduler, name and credentials in a `dask worker` command line (flags as FLAGS
    without their dashes, and `scheduler`); None without a scheduler to reach."""
    options: dict[str, str] = {}
    words = iter(argv)
    for word in words:
        flag, _, value = word.partition("=")
        if flag in FLAGS:
            options[flag[2:]] = value or next(words, "")
        elif "://" in word and "scheduler" not in options:
            options["scheduler"] = word
    if "scheduler-file" in options and "scheduler" not in options:
        try:
            with open(options["scheduler-file"]) as f:
                options["scheduler"] = json.load(f)["address"]
        except (OSError, ValueError, KeyError):
            return None
    return options if "scheduler" in options else None


def alive(pid: int) -> bool:
    """Whether the process runs (or waits, or is busy), and is neither stopped nor a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("T", "t", "Z", "X", "x")


def start_vouching(pid: int, argv: list[str]) -> None:
    """Vouch for the worker process `pid`, started with `argv`, in a thread of its own; nothing
    where the command line names no scheduler or no name for the worker."""
    options = worker_options(argv)
    if options is None or not options.get("name"):
        return
    threading.Thread(target=asyncio.run, args=(vouch(pid, options),), name="sticky-vouch", daemon=True).start()


async def vouch(pid: int, options: dict[str, str]) -> None:
    """Once a second while the worker lives: the scheduler hears that it does. A scheduler out
    of reach (a node cut off) is asked again a second later."""
    from distributed.core import rpc

    scheduler = rpc(options["scheduler"], connection_args=connection_args(options))
    try:
        while alive(pid):
            try:
                await getattr(scheduler, VOUCH_HANDLER)(name=options["name"])
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(VOUCH_S)
    finally:
        await scheduler.close_rpc()


def connection_args(options: dict[str, str]) -> dict[str, Any]:
    """The worker's credentials, presented as a client's."""
    from distributed.security import Security

    if not options.get("tls-ca-file"):
        return {}
    security = Security(
        tls_ca_file=options["tls-ca-file"],
        tls_client_cert=options.get("tls-cert"),
        tls_client_key=options.get("tls-key"),
        require_encryption=True,
    )
    return security.get_connection_args("client")
