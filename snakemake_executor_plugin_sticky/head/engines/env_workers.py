"""Local workers in a template's own software environment (environments.py): each a command,
`<environment's python> -m supervisor -m distributed.cli.dask_worker ...`, started by the Snakemake
process and supervised as a Nanny supervises its worker: started again when it dies, closed with
its pool.

The forkserver's workers are forks of Snakemake's own Python; a worker in another interpreter
cannot be, so it starts as a batch job's worker does, under the supervisor (supervisor.py): nothing the
worker starts outlives it, and the supervisor ends the worker when the Snakemake process is gone.
It reads the run's credentials from files only this user can read (security.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ...templates import TemplateSpec
from ...wire import WATCH_FD_ENV, worker_name
from ...worker.processes import descendants, process_table
from ...worker.supervisor import LEFTOVER_GRACE_S
from ..forkserver import pre_spawn_environ

SUPERVISOR = "snakemake_executor_plugin_sticky.worker.supervisor"
# A worker that cannot reach the scheduler this long exits (and is started again while the pool lives).
DEATH_TIMEOUT_S = 60
# A worker that dies sooner than this after its start again and again waits before the next
# start: none the first time (as a Nanny), then 1, 2, 4 ... 30 s.
SHORT_LIFE_S = 10.0
MAX_RESTART_DELAY_S = 30.0
POLL_S = 0.05
CLOSE_GRACE_S = 10.0  # a worker that never joined: SIGTERM, this long, then SIGKILL


def exitcode_of(returncode: int) -> int:
    """The supervisor's exit status (128 + signal for a killed worker) as a Nanny reports it (-signal)."""
    return -(returncode - 128) if returncode > 128 else returncode


class EnvWorker:
    """One worker process of a template in its own environment. `connected(name)` gives the
    address under which the scheduler knows a worker of that name (or None); `on_exit(address,
    exitcode)` is told when a joined worker's process ends. `watch_fd` is the read end of a pipe
    whose write end only the Snakemake process holds: the supervisor ends the worker when it closes."""

    def __init__(
        self,
        template: TemplateSpec,
        index: int,
        gpus: list[str],
        scheduler: str,
        credentials: Path,
        watch_fd: int,
        connected: Callable[[str], Optional[str]],
        on_exit: Callable[[str, int], None],
        log: Any,
    ):
        self.template = template
        self.name = worker_name(template.name, index)
        self.gpus = gpus
        self.scheduler = scheduler
        self.credentials = credentials
        self.watch_fd = watch_fd
        self.connected = connected
        self.on_exit = on_exit
        self.log = log
        self.process: Optional[asyncio.subprocess.Process] = None
        self.address: Optional[str] = None
        self._closing = False
        self._watcher: Optional[asyncio.Future] = None
        self.started = 0.0

    def command(self) -> list[str]:
        """The environment's Python running the worker under the supervisor, as a batch job runs it."""
        cert, key = str(self.credentials / "cert.pem"), str(self.credentials / "key.pem")
        slots = str(self.template.slots)
        return [
            *self.template.launch,
            "-m",
            SUPERVISOR,
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
        logs, and the pipe by which the supervisor learns that this process is gone."""
        return {
            **os.environ,
            **{k: str(v) for k, v in pre_spawn_environ().items()},
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
            "DASK_LOGGING__DISTRIBUTED": "warning",
            WATCH_FD_ENV: str(self.watch_fd),
        }

    def __await__(self) -> Any:
        return self.start().__await__()

    async def start(self) -> None:
        """Start the process and wait until its worker has joined the scheduler; RuntimeError if
        the process ends before, Closed if the worker was closed meanwhile."""
        if not await self._launch():
            raise RuntimeError(self._ended_early())
        self._watcher = asyncio.ensure_future(self._watch())

    def _ended_early(self) -> str:
        assert self.process is not None
        return (
            f"its process ({' '.join(self.template.launch)} -m {SUPERVISOR} ...) exited with status "
            f"{self.process.returncode} before the worker joined; its output is above"
        )

    async def _launch(self) -> bool:
        """Start the process; whether its worker joined before the process ended. A worker of
        this name that the scheduler knows already (one being removed) is not this one."""
        self.address = None
        self.started = time.monotonic()
        before = self.connected(self.name)
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), env=self.environ(), stdin=asyncio.subprocess.DEVNULL, pass_fds=(self.watch_fd,)
        )
        while self.process.returncode is None:
            if self._closing:  # closed while it started: it must not run on unsupervised
                await self._end(self.process, CLOSE_GRACE_S)
                raise Closed(f"worker {self.name} was closed while it started")
            joined = self.connected(self.name)
            if joined is not None and joined != before:
                self.address = joined
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def _watch(self) -> None:
        """When the process ends unasked, say so and start it again (as a Nanny does), after a
        pause that grows while it keeps dying young."""
        delay = 0.0
        while not self._closing:
            try:
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
                    self.log.warning(
                        f"Sticky template '{self.template.name}': worker {self.name}: {self._ended_early()}."
                    )
            except Closed:
                return
            except Exception as e:  # said, and tried again after a pause: never a silent end
                self.log.warning(
                    f"Sticky template '{self.template.name}': worker {self.name} could not start again: "
                    f"{type(e).__name__}: {e}"
                )
                delay = min(max(2 * delay, 1.0), MAX_RESTART_DELAY_S)
                await asyncio.sleep(delay)

    def worker_pids(self) -> list[int]:
        """The worker processes below the supervisor, found in /proc below the process started here
        (apptainer's own processes may stand between, and the pids that the worker reports may
        be those of a container's namespace)."""
        if self.process is None or self.process.returncode is not None:
            return []
        table = process_table()
        below = descendants(self.process.pid, table)
        supervisor = next((p.pid for p in [table.get(self.process.pid), *below] if p and is_supervisor(p.pid)), None)
        return [p.pid for p in below if supervisor is not None and p.ppid == supervisor]

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        """A signal to the worker under the supervisor. After SIGKILL the supervisor ends what the worker
        started and exits with the worker's status (the supervisor itself is never killed, or what
        the worker started would outlive it)."""
        for pid in self.worker_pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def kill(self) -> None:
        """Snakemake exits without having closed the worker: kill it, and start no other."""
        self._closing = True
        self.kill_worker()

    async def close(self, timeout: float, ask: Callable[[str], Any]) -> None:
        """Ask the worker to close (it runs the template's teardown), kill it after `timeout`,
        and wait for the supervisor to end the rest. A worker still starting is ended by its start."""
        self._closing = True
        process = self.process
        if process is None or process.returncode is not None or self.address is None:
            return
        ask(self.address)
        await self._end(process, timeout)

    async def _end(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        if self.address is None:  # not joined: SIGTERM through the supervisor, which passes it on
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
            return
        except asyncio.TimeoutError:
            if self.worker_pids():
                self.kill_worker()
            else:  # the supervisor has no worker yet: nothing of the worker's can outlive it
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        try:
            await asyncio.wait_for(process.wait(), LEFTOVER_GRACE_S + CLOSE_GRACE_S)
        except asyncio.TimeoutError:
            self.log.warning(f"Sticky template '{self.template.name}': worker {self.name}'s supervisor has not ended.")


class Closed(Exception):
    """The worker was closed while it started."""


def is_supervisor(pid: int) -> bool:
    """Whether the process runs the supervisor (its command line names the module)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return SUPERVISOR.encode() in f.read()
    except OSError:
        return False
