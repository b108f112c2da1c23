"""Local workers in a template's own software environment (environments.py): each a command,
`<environment's python> -m keeper -m distributed.cli.dask_worker ...`, started by the Snakemake
process and supervised as a Nanny supervises its worker: started again when it dies, closed with
its pool.

The forkserver's workers are forks of Snakemake's own Python; a worker in another interpreter
cannot be, so it starts as a batch job's worker does, under the keeper (keeper.py): nothing the
worker starts outlives it, and the keeper ends the worker when the Snakemake process is gone.
It reads the run's credentials from files only this user can read (security.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..forkserver import pre_spawn_environ
from ..keeper import PARENT_ENV
from ..templates import TemplateSpec

KEEPER = "snakemake_executor_plugin_sticky.keeper"
# A worker that cannot reach the scheduler this long exits (and is started again while the pool lives).
DEATH_TIMEOUT_S = 60
# A worker that dies sooner than this after its start again and again waits before the next
# start: none the first time (as a Nanny), then 1, 2, 4 ... 30 s.
SHORT_LIFE_S = 10.0
MAX_RESTART_DELAY_S = 30.0
POLL_S = 0.05


def exitcode_of(returncode: int) -> int:
    """The keeper's exit status (128 + signal for a killed worker) as a Nanny reports it (-signal)."""
    return -(returncode - 128) if returncode > 128 else returncode


class EnvWorker:
    """One worker process of a template in its own environment. `connected(name)` gives the
    address and process id under which the scheduler knows a worker of that name (or None);
    `on_exit(address, exitcode)` is told when a joined worker's process ends."""

    def __init__(
        self,
        template: TemplateSpec,
        index: int,
        gpus: list[str],
        scheduler: str,
        credentials: Path,
        connected: Callable[[str], Optional[tuple[str, int]]],
        on_exit: Callable[[str, int], None],
        log: Any,
    ):
        self.template = template
        self.name = f"{template.name}-{index}"
        self.gpus = gpus
        self.scheduler = scheduler
        self.credentials = credentials
        self.connected = connected
        self.on_exit = on_exit
        self.log = log
        self.process: Optional[asyncio.subprocess.Process] = None
        self.address: Optional[str] = None
        self.worker_pid = 0
        self._closing = False
        self._watcher: Optional[asyncio.Future] = None
        self.started = 0.0

    def command(self) -> list[str]:
        cert, key = str(self.credentials / "cert.pem"), str(self.credentials / "key.pem")
        slots = str(self.template.slots)
        return [
            *self.template.launch,
            "-m",
            KEEPER,
            "-m",
            "distributed.cli.dask_worker",
            self.scheduler,
            "--name",
            self.name,
            "--no-nanny",
            "--nthreads",
            slots,
            "--resources",
            f"{self.template.tag}={slots}",
            "--memory-limit",
            "0",  # a resident model is meant to stay: no pausing, spilling or killing
            "--no-dashboard",
            "--host",
            "127.0.0.1",
            "--death-timeout",
            str(DEATH_TIMEOUT_S),
            "--tls-ca-file",
            cert,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]

    def environ(self) -> dict[str, str]:
        """This process's environment, with what a Nanny's worker gets: Dask's pre-spawn settings
        (one BLAS thread, malloc trimming), the GPU ids pinned before anything is imported, quiet
        logs, and this process named as the keeper's parent."""
        return {
            **os.environ,
            **{k: str(v) for k, v in pre_spawn_environ().items()},
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
            "DASK_LOGGING__DISTRIBUTED": "warning",
            PARENT_ENV: str(os.getpid()),
        }

    def __await__(self) -> Any:
        return self.start().__await__()

    async def start(self) -> None:
        """Start the process and wait until its worker has joined the scheduler; RuntimeError if
        the process ends before."""
        if not await self._launch():
            raise RuntimeError(self._ended_early())
        self._watcher = asyncio.ensure_future(self._watch())

    def _ended_early(self) -> str:
        assert self.process is not None
        return (
            f"its process ({' '.join(self.template.launch)} -m {KEEPER} ...) exited with status "
            f"{self.process.returncode} before the worker joined; its output is above"
        )

    async def _launch(self) -> bool:
        """Start the process; whether its worker joined before the process ended."""
        self.address = None
        self.started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), env=self.environ(), stdin=asyncio.subprocess.DEVNULL
        )
        while self.process.returncode is None:
            joined = self.connected(self.name)
            if joined is not None:
                self.address, self.worker_pid = joined
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def _watch(self) -> None:
        """When the process ends unasked, say so and start it again (as a Nanny does), after a
        pause that grows while it keeps dying young."""
        delay = 0.0
        while True:
            assert self.process is not None
            returncode = await self.process.wait()
            if self._closing:
                return
            if self.address:
                self.on_exit(self.address, exitcode_of(returncode))
            if time.monotonic() - self.started > SHORT_LIFE_S:
                delay = 0.0
            else:
                await asyncio.sleep(delay)
                delay = min(max(2 * delay, 1.0), MAX_RESTART_DELAY_S)
            if self._closing:
                return
            if not await self._launch():
                self.log.warning(f"Sticky template '{self.template.name}': worker {self.name}: {self._ended_early()}.")

    def kill_worker(self) -> None:
        """SIGKILL to the worker under the keeper: the keeper then ends what the worker started,
        and exits with the worker's status (the keeper itself is never killed, or the worker
        would outlive it). A worker that has not joined yet gets SIGTERM through the keeper."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            if self.address is not None and self.worker_pid:
                os.kill(self.worker_pid, signal.SIGKILL)
            else:
                self.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    async def close(self, timeout: float, ask: Callable[[str], Any]) -> None:
        """Ask the worker to close (it runs the template's teardown), kill it after `timeout`,
        and wait for the keeper to end the rest."""
        self._closing = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        if self.address is not None:
            ask(self.address)
        else:
            self.kill_worker()  # not joined yet
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            self.kill_worker()
            await process.wait()
