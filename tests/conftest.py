"""Helpers for end-to-end tests: a workflow in a temporary folder, run by the real `snakemake` CLI."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
import pytest

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
RUN_TIMEOUT_S = 240

# A shell starts background jobs (`make test &`) with SIGINT ignored, and every process started
# from them inherits that: the Ctrl-C tests could not interrupt snakemake. A handler of our own is
# reset to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float


class Background(subprocess.Popen):
    """A snakemake run in the background whose output goes to a file. A pipe that the test does
    not read while it waits would fill up and block snakemake, and every thread of it that logs.

    With `pipe=True` the output goes through a pipe that a thread copies to the file, as in
    `snakemake ... | tee run.log`: `communicate` then also waits for the pipe's end, which a
    process that outlived snakemake would hold open."""

    def __init__(self, command: list[str], log: Path, pipe: bool = False, **kwargs: Any):
        self.log = log
        self._copier: Optional[threading.Thread] = None
        if not pipe:
            with open(log, "w") as sink:
                super().__init__(command, stdout=sink, stderr=subprocess.STDOUT, **kwargs)
            return
        super().__init__(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        assert self.stdout is not None
        with open(self.log, "wb", buffering=0) as sink:
            for chunk in iter(lambda: self.stdout.read1(65536), b""):
                sink.write(chunk)

    def communicate(self, input: Any = None, timeout: Optional[float] = None) -> tuple[str, None]:
        started = time.monotonic()
        self.wait(timeout)
        if self._copier is not None:
            left = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            self._copier.join(left)
            assert not self._copier.is_alive(), (
                "snakemake has exited but its output pipe is still open: a process it started outlived it"
            )
        return self.log.read_text(), None

    def follow(self) -> Iterator[str]:
        """The output's lines as they are written, until the process ends."""
        pending = ""
        with open(self.log) as f:
            while True:
                chunk = f.readline()
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
                elif not chunk and self.poll() is not None:
                    if pending:
                        yield pending
                    return
                elif not chunk:
                    time.sleep(0.05)


class Workflow:
    """A workflow folder: files are written dedented; `run` calls the snakemake CLI in it."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, relpath: str, text: str) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def read(self, relpath: str) -> str:
        return (self.root / relpath).read_text()

    def lines(self, relpath: str) -> list[str]:
        path = self.root / relpath
        return path.read_text().split() if path.exists() else []

    def command(
        self, *args: str, executor: Optional[str] = "sticky", cores: Optional[int] = 4, python: Optional[Path] = None
    ) -> list[str]:
        """The snakemake CLI; with `python`, run by that interpreter (`python -m snakemake`); with
        `cores=None` and `executor=None`, as the arguments (or a profile) say."""
        cmd = [*([str(python), "-m", "snakemake"] if python else [SNAKEMAKE]), "--nocolor"]
        if cores is not None:
            cmd += ["--cores", str(cores)]
        if executor:
            cmd += ["--executor", executor]
        return cmd + list(args)

    def run(
        self,
        *args: str,
        executor: Optional[str] = "sticky",
        cores: Optional[int] = 4,
        timeout: float = RUN_TIMEOUT_S,
        env: Optional[dict[str, str]] = None,
        unset: tuple[str, ...] = (),
        python: Optional[Path] = None,
    ) -> Run:
        started = time.monotonic()
        environment = {k: v for k, v in {**snakemake_env(), **(env or {})}.items() if k not in unset}
        try:
            proc = subprocess.run(
                self.command(*args, executor=executor, cores=cores, python=python),
                cwd=self.root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                env=environment,
            )
        except subprocess.TimeoutExpired as e:
            output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else str(e.output or "")
            raise AssertionError(f"snakemake ran longer than {timeout:g} s; its output ended:\n{output[-6000:]}") from e
        return Run(proc.returncode, proc.stdout, time.monotonic() - started)

    def popen(
        self,
        *args: str,
        executor: Optional[str] = "sticky",
        cores: int = 4,
        pipe: bool = False,
        env: Optional[dict[str, str]] = None,
    ) -> Background:
        """Start snakemake in its own process group, as a terminal would run it."""
        return Background(
            self.command(*args, executor=executor, cores=cores),
            log=self.root / "snakemake.log",
            pipe=pipe,
            cwd=self.root,
            env={**snakemake_env(), **(env or {})},
            start_new_session=True,
        )

    def leftover_processes(self, wait_s: float = 10.0) -> list[psutil.Process]:
        """Processes still running in this folder (resident workers run there) after `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            left = [p for p in psutil.process_iter() if p.pid != os.getpid() and cwd_of(p) == str(self.root)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def cwd_of(process: psutil.Process) -> Optional[str]:
    try:
        return process.cwd()
    except (psutil.Error, OSError):
        return None


def snakemake_env() -> dict[str, str]:
    """The environment of a Snakemake the tests start: no user profile, no GPU, unbuffered output."""
    env = dict(os.environ)
    env.pop("SNAKEMAKE_PROFILE", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tests describe CPU workers, whatever the machine
    env["PYTHONUNBUFFERED"] = "1"
    return env


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


@pytest.fixture
def workflow(tmp_path: Path) -> Workflow:
    wf = Workflow(tmp_path)
    yield wf
    for process in wf.leftover_processes(wait_s=0):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass  # it ended between the listing and the kill


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return any(s in ("idle", "mixed", "allocated") for s in states)


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The one-node Slurm cluster, for one test at a time even when tests run side by side
    (pytest-xdist): it has the machine's two cores, and jobs of two tests would queue."""
    if not slurm_up():
        message = "no Slurm cluster here: start one with `sudo .ci/slurm-up`"
        if os.environ.get("STICKY_REQUIRE_SLURM"):  # CI starts one: its absence is a failure there
            pytest.fail(message)
        pytest.skip(message)
    with one_at_a_time(tmp_path_factory, "slurm"):
        yield


NETCLUSTER = Path(__file__).resolve().parents[1] / ".ci" / "netcluster"
NETCLUSTER_CONF = "/etc/slurm-netcluster/slurm.conf"


def netcluster_nodes() -> list[tuple[str, str, str]]:
    """The compute nodes of the multi-node cluster (.ci/netcluster): name, address, netns."""
    if not NETCLUSTER.exists() or not Path(NETCLUSTER_CONF).exists() or os.geteuid() != 0:
        return []
    listed = subprocess.run([str(NETCLUSTER), "nodes"], capture_output=True, text=True).stdout
    return [tuple(line.split()) for line in listed.splitlines() if len(line.split()) == 3]


@pytest.fixture
def netcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, str, str]]]:
    """The multi-node Slurm cluster of three compute nodes or more, for one test at a time."""
    nodes = netcluster_nodes()
    if len(nodes) < 3:
        message = "no multi-node cluster here: start one with `sudo .ci/netcluster up 3`"
        if os.environ.get("STICKY_REQUIRE_NETCLUSTER"):  # CI starts one: its absence is a failure there
            pytest.fail(message)
        pytest.skip(message)
    with one_at_a_time(tmp_path_factory, "netcluster"):
        # every node up and idle (a node an earlier test cut off or crashed comes back first)
        subprocess.run([str(NETCLUSTER), "up", str(len(nodes))], capture_output=True, check=True, timeout=300)
        yield nodes


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of the whole test run: the common parent of every test process's own
    when tests run side by side."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def one_at_a_time(factory: pytest.TempPathFactory, name: str) -> Iterator[None]:
    """Across the test processes of a run, one holder of `name` at a time."""
    with open(shared_root(factory) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Any:
    """What `make` makes in a folder of its own (a JSON value), made once for the whole test run
    even when tests run in several processes: the first to ask makes it, the others wait for it."""
    folder = shared_root(factory) / name
    with one_at_a_time(factory, name):
        made, failed = folder / "made.json", folder / "failed.txt"
        if made.exists():
            return json.loads(made.read_text())
        if failed.exists():  # one cause, reported once, not a cascade of errors of other tests
            pytest.fail(f"{name} failed in an earlier test: {failed.read_text()}", pytrace=False)
        folder.mkdir(exist_ok=True)
        try:
            value = make(folder)
        except BaseException as e:
            failed.write_text(f"{type(e).__name__}: {e}")
            raise
        made.write_text(json.dumps(value))
        return value
