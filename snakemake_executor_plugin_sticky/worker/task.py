"""One invocation in a resident worker: the Dask task that runs the script with the template's
state at hand (or a `shell:` job's command as a child of the worker), in a view of the process of
its own (isolation/), and reports what happened."""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from distributed import get_worker

from ..api import batcher, resident
from ..wire import RUNNING_TOPIC, Invocation, InvocationResult, Lost, Packed, attempt_path
from .isolation import InvocationExit, current
from .isolation.modules import PARSING
from .isolation.process import job_variables
from .resident import ResidentState, ResidentWorker, TemplateSetupError
from .shared_task import SharedTask, watchdog


def run_invocations(invocations: Packed) -> list[InvocationResult]:
    """The Dask task of one or more invocations of a template, run one after another: short
    invocations travel together, so that Dask's cost per task is shared (head/chunking.py). One
    that runs long hands the rest of its task back (shared_task.py): the task's results are
    those it did not hand back."""
    if invocations.count == 1:
        return [run_invocation(invocation) for invocation in invocations.unpack()]
    worker = get_worker()
    shared = SharedTask(str(worker.get_current_task()), invocations.unpack())
    watch = watchdog(worker)
    watch.add(shared)
    try:
        while (invocation := shared.next()) is not None:
            shared.done(run_invocation(invocation))
    finally:
        watch.remove(shared)
    return shared.results()


def lost(address: str) -> Lost:
    """What a task of invocations becomes when its worker was lost while it ran one of them."""
    return Lost(address)


def run_invocation(invocation: Invocation) -> InvocationResult:
    """One invocation: run the script with the resident state at hand, in a view of the process
    of its own (see isolation/)."""
    started = time.time()
    worker = get_worker()
    result = InvocationResult(
        key=invocation.key,
        worker=str(worker.name),
        address=worker.address,
        pid=os.getpid(),
        started=started,
        finished=started,
    )
    this = resident.current()
    if not isinstance(this, ResidentWorker) or this.spec.identity != invocation.identity:
        result.error = (
            f"This worker does not hold sticky template '{invocation.template}' ({invocation.identity[:12]})."
        )
        return result
    invocation, attempt = fenced(invocation)
    if attempt is not None:
        result.extra["attempt"] = attempt
    context = None
    this.holder.wait_built()  # the template's setup sets the process up first, untouched by isolation
    try:
        with this.isolation.invocation(invocation) as context:
            run_with_state(invocation, this.holder, worker, result)
            this.deliver()  # the worker's setup is known before this result (ready by now)
    except BaseException:
        if result.error is None:  # the isolation itself failed, before or after the script
            what = "undo what the script changed in it" if context is not None else "give the script its own view of it"
            result.error = f"The worker could not {what}:\n{traceback.format_exc()}"
    if context is not None:
        result.stdout, result.stderr = context.output()
    result.finished = time.time()
    calls = batcher.drain_calls()
    if calls:
        result.extra["model_calls"] = calls
    return result


def fenced(invocation: Invocation) -> tuple[Invocation, Optional[str]]:
    """Where the run fences its workers (batch jobs: a node may be cut off or frozen, and its
    writes still reach the shared file system), the script writes its outputs and logs in a
    folder of this attempt's own, at their paths below it (wire.attempt_path); the head moves
    them into place when it accepts this result, never once it has given this worker up. Returns
    the invocation the script sees and the folder."""
    if invocation.attempts is None:
        return invocation, None
    from snakemake.iocontainers import Namedlist

    attempt = os.path.join(invocation.attempts, f"{invocation.key}.{uuid.uuid4().hex[:8]}")
    os.makedirs(attempt)  # the head finds the invocation's attempts by their folders
    device = os.stat(invocation.attempts).st_dev
    seen = copy.copy(invocation.snakemake)
    for kind in ("output", "log"):
        paths = [attempt_path(attempt, str(p), beside=device_of(str(p)) != device) for p in getattr(seen, kind)]
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        moved = iter(paths)
        setattr(seen, kind, Namedlist(toclone=getattr(seen, kind), custom_map=lambda _: next(moved)))
    return dataclasses.replace(invocation, snakemake=seen), attempt


def device_of(path: str) -> int:
    """The file system of the folder that `path` goes in (its nearest folder that exists)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.stat(folder).st_dev


def run_with_state(invocation: Invocation, holder: ResidentState, worker: Any, result: InvocationResult) -> None:
    """Run the script with the state held; its failure becomes the result's error."""
    watchdog = None
    generation = None
    try:
        with holder.use() as generation, running_on(worker, invocation.key):
            result.started = time.time()  # the invocation proper, after any wait for the state
            result.extra["setup_s"] = holder.setup_s
            if invocation.timeout_s is not None and invocation.shell is None:  # a command is killed instead
                watchdog = threading.Timer(invocation.timeout_s, holder.announce_timeout, (invocation,))
                watchdog.daemon = True
                watchdog.start()
            clear_outputs(invocation.snakemake.output)
            if invocation.shell is not None:
                run_shell(invocation)
            else:
                run_script(invocation)
    except (TemplateSetupError, ShellFailed) as e:
        result.error = str(e)
    except SystemExit as e:
        if e.code not in (None, 0):
            result.error = f"Script {invocation.script} exited with status {e.code}."
    except InvocationExit as e:
        if e.status != 0:
            result.error = f"Script {invocation.script} ended its process with {e.how}."
    except BaseException as e:
        result.error = format_script_error(e)
        to_redirected_stderr(result.error)
        if generation is not None and holder.poisons(e):
            result.extra["poisoned"] = True
            holder.rebuild(f"{type(e).__name__} in rule {invocation.rule}", generation)
    finally:
        if watchdog is not None:
            watchdog.cancel()


@contextmanager
def running_on(worker: Any, key: str) -> Iterator[None]:
    """Tell the scheduler that the invocation `key` of this task runs with its state now, and
    when it stops: should the worker die meanwhile, it was running there (see
    WorkerRemovalPlugin)."""
    message = {"worker": worker.address, "task": worker.get_current_task(), "key": key, "running": True}
    worker.log_event(RUNNING_TOPIC, message)
    try:
        yield
    finally:
        worker.log_event(RUNNING_TOPIC, {**message, "running": False})


def clear_outputs(paths: Any) -> None:
    """Remove what an earlier attempt on a lost worker may have half written."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


_code_cache: dict[str, tuple[tuple[float, int], Any]] = {}


def compiled_script(path: str) -> Any:
    """The script's code object, compiled once per version of the file."""
    stat = os.stat(path)
    version = (stat.st_mtime, stat.st_size)
    cached = _code_cache.get(path)
    if cached is None or cached[0] != version:
        with PARSING:  # one parse at a time (see modules.PARSING)
            cached = _code_cache.get(path)
            if cached is None or cached[0] != version:
                with open(path, "rb") as f:
                    cached = (version, compile(f.read(), path, "exec"))
                _code_cache[path] = cached
    return cached[1]


def run_script(invocation: Invocation) -> None:
    """Run the invocation's script as Snakemake's `script:` would, as the `__main__` of the
    calling thread's invocation (its globals are Snakemake's preamble's, see isolation), in a
    context of its own: context variables it sets (numpy's print options, decimal's context) end
    with it, although the worker's task thread runs the next script."""
    context = current()
    assert context is not None, "run_script runs inside an invocation's isolation"
    contextvars.Context().run(exec, compiled_script(invocation.script), context.main.__dict__)


class ShellFailed(RuntimeError):
    """A `shell:` job's command ended with a status other than 0, or ran past its limit."""


def run_shell(invocation: Invocation) -> None:
    """A `shell:` job's command, as Snakemake's `shell()` runs it, as a child of this worker (in
    a process group of its own, ended whole at the job's limit): with the invocation's
    environment (its threads, its tmpdir, the endpoint's address and key), its output the job's."""
    context = current()
    assert invocation.shell is not None and context is not None, "run_shell runs inside an invocation's isolation"
    command = invocation.shell.resolve(invocation.snakemake)
    environment = {**os.environ, **job_variables(context.threads, context.tmpdir)}
    with command_file(command, invocation.shell.executable) as argv:
        child = subprocess.Popen(
            argv or command,
            shell=argv is None,
            executable=invocation.shell.executable if argv is None else None,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = child.communicate(timeout=invocation.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_group(child)
            out, err = child.communicate()
        except BaseException:
            end_group(child)
            raise
        finally:
            child.stdout and child.stdout.close()
            child.stderr and child.stderr.close()
    sys.stdout.write(out.decode(errors="backslashreplace"))
    sys.stderr.write(err.decode(errors="backslashreplace"))
    if timed_out:
        raise ShellFailed(
            f"Shell command of rule {invocation.rule} ran past its limit of {invocation.timeout_s:g} s and was "
            f"ended (with the processes it started):\n{command}"
        )
    if child.returncode != 0:
        raise ShellFailed(f"Command '{command}' returned non-zero exit status {child.returncode}.")


# The longest command a shell takes as its argument (as Snakemake's shell() counts it: within
# Linux's limit on one argument); a longer one runs from a file, as there.
MAX_ARGUMENT = 16 * 4096 - 1


@contextmanager
def command_file(command: str, executable: Optional[str]) -> Iterator[Optional[list[str]]]:
    """None for a command that fits an argument; else the arguments that run it from a file
    under .snakemake/, removed afterwards."""
    if len(command.replace("'", r"'\''")) + 2 <= MAX_ARGUMENT:
        yield None
        return
    os.makedirs(".snakemake", exist_ok=True)
    folder = tempfile.mkdtemp(dir=".snakemake", prefix="shell_tmp.")
    script = os.path.join(os.path.abspath(folder), "script.sh")
    with open(script, "w") as f:
        print(command, file=f)
    try:
        yield [executable or "/bin/sh", script]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def end_group(child: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a command and every process of its group: SIGTERM, and SIGKILL after the grace for
    whatever is left (the command, or what it started)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait_s or None)
        except subprocess.TimeoutExpired:
            pass


def to_redirected_stderr(text: str) -> None:
    """A script that raises has its traceback printed on its `sys.stderr`, as Python prints it:
    where the script pointed it at a file (its log), there too. (Its own stream is the job's
    output, which Snakemake's error message shows with the traceback already.)"""
    context = current()
    stream = context.overrides.get("stderr") if context is not None else None
    if stream is None or getattr(stream, "closed", False):
        return
    stream.write(text)
    stream.flush()


def format_script_error(error: BaseException) -> str:
    """The traceback from the script's frames on, as Python would print it for the script."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))
