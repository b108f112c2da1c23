"""Helpers the test modules share (instead of importing each other): workflows and templates
that several use, waiting for processes and files, and the api's resident worker in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
from distributed.comm import connect

from snakemake_executor_plugin_sticky.api import resident, stage
from snakemake_executor_plugin_sticky.api.resident import StageSettings

from conftest import Workflow, snakemake_env


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


LLM_TEMPLATE = """
sticky:
  llm:
    setup: templates/counting.py
    kwargs: {name: llm, delay: 1.0}
"""


ONE_TEMPLATE_SNAKEFILE = """
configfile: "config.yaml"
N = int(config.get("count", 12))
rule all:
    input: expand("out/{i}.json", i=range(N))
rule infer:
    output: "out/{i}.json"
    params: sleep=config.get("sleep", 0)
    resources: sticky="llm"
    script: "scripts/record.py"
"""


RECORD_SCRIPT = """
import json, os, sys, threading, time
from snakemake_executor_plugin_sticky import sticky_state

started = time.time()
state = sticky_state(snakemake)
state["calls"] += 1
time.sleep(float(snakemake.params.get("sleep", 0)))
if snakemake.log:
    with open(snakemake.log[0], "w") as f:
        f.write(f"log of {snakemake.rule} {dict(snakemake.wildcards)}\\n")
print(f"stdout of {snakemake.output[0]}")
print(f"stderr of {snakemake.output[0]}", file=sys.stderr)
with open(snakemake.output[0], "w") as f:
    json.dump({
        "template": state["name"], "state_pid": state["pid"], "pid": os.getpid(),
        "calls": state["calls"], "rule": snakemake.rule, "wildcards": dict(snakemake.wildcards),
        "params": {k: v for k, v in snakemake.params.items()}, "threads": snakemake.threads,
        "resources_sticky": snakemake.resources["sticky"], "started": started, "finished": time.time(),
        "scriptdir": snakemake.scriptdir,
    }, f)
"""


COUNTING_TEMPLATE = """
import os, time

def setup(name, delay=0.0, fail=False):
    with open(f"setups-{name}.txt", "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(delay)
    if fail:
        raise RuntimeError(f"cannot load model for {name}")
    return {"name": name, "pid": os.getpid(), "calls": 0}

def teardown(state):
    with open(f"teardowns-{state['name']}.txt", "a") as f:
        f.write(f"{state['pid']}\\n")
"""


# Invocation `victim` writes half its output, says where it runs, then sleeps: the test kills or
# preempts that worker mid-invocation. Any other attempt writes the whole output at once.
CAREFUL = """
import os, time
from snakemake_executor_plugin_sticky import sticky_state
state = sticky_state(snakemake)
i = int(snakemake.wildcards.i)
victim = int(snakemake.config.get("victim", -1))
with open(snakemake.output[0], "w") as out:
    out.write(f"begin {i}\\n")
    out.flush()
    if i == victim and not os.path.exists(f"victim-ran-{i}"):
        open(f"victim-ran-{i}", "w").write(str(os.getpid()))
        time.sleep(float(snakemake.config.get("victim_sleep", 60)))
        open(f"victim-ending-{i}", "w").close()
    time.sleep(float(snakemake.params.get("sleep", 0)))
    out.write(f"end {i} {state['pid']}\\n")
"""


ENGINE_SNAKEFILE = """
configfile: "config.yaml"
rule all:
    input: expand("out/{i}.json", i=range(int(config.get("count", 8))))
rule infer:
    output: "out/{i}.json"
    resources: sticky="engine"
    script: "scripts/use.py"
"""


ENGINE_SCRIPT = """
import json, os, time
from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
i = int(snakemake.wildcards.i)
engine_results = state["pool"].map(state["work"], range(4))
if i == int(snakemake.config.get("victim", -1)) and not os.path.exists("victim-ran"):
    open("victim-ran", "w").write(str(os.getpid()))
    time.sleep(600)
time.sleep(float(snakemake.config.get("sleep", 0)))
with open(snakemake.output[0], "w") as f:
    json.dump({"worker": os.getpid(), "pool": engine_results, "server": state["server"].pid}, f)
"""


# A template that owns what an engine owns: a spawned process pool, a server started in a
# session of its own that does not watch its parent, a daemon that double-forks (its parent
# ends at once, so it is adopted), and optionally a thread that never ends and a server that
# ignores SIGTERM. Each helper's pid goes to helper_pids/<worker pid>.txt. A setup also notes any
# helper of an ended worker that still runs: a replacement must start after the old tree is gone.
ENGINE_TEMPLATE = '''
import glob, multiprocessing, os, signal, subprocess, sys, threading, time

SERVER = """
import signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(0.5)
"""

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1], "a").write(f"daemon {os.getpid()}\\\\n")
        while True:
            time.sleep(0.5)
    os._exit(0)
"""


def work(x):
    return {"pid": os.getpid(), "ppid": os.getppid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "x": x * x}


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def setup(stubborn=False, endless_thread=False):
    os.makedirs("helpers", exist_ok=True)
    for path in glob.glob("helpers/*.txt"):
        if not running(int(os.path.basename(path)[:-4])):
            left = [int(line.split()[1]) for line in open(path) if running(int(line.split()[1]))]
            open("seen-alive-at-setup.txt", "a").write("".join(f"{pid}\\n" for pid in left))
    record = f"helpers/{os.getpid()}.txt"
    pool = multiprocessing.get_context("spawn").Pool(2)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, "stubborn" if stubborn else "plain"], start_new_session=True
    )
    subprocess.run([sys.executable, "-c", DAEMON, record], check=True)
    deadline = time.monotonic() + 30  # the daemon's grandchild notes itself after its parent ended
    while "daemon" not in (open(record).read() if os.path.exists(record) else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(record, "a") as f:
        f.write("".join(f"pool {p.pid}\\n" for p in pool._pool) + f"server {server.pid}\\n")
    if endless_thread:
        threading.Thread(target=lambda: [time.sleep(0.2) for _ in iter(int, 1)], daemon=False).start()
    return {"pool": pool, "server": server, "work": work}


def teardown(state):
    state["pool"].terminate()
'''


GRACE = ("--sticky-teardown-grace", "2")


GONE_S = 15.0


def outputs(workflow: Workflow, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(workflow.root.glob(pattern))]


def sticky_workflow(workflow: Workflow, snakefile: str, templates: str) -> Workflow:
    workflow.write("Snakefile", snakefile)
    workflow.write("config.yaml", templates)
    workflow.write("templates/counting.py", COUNTING_TEMPLATE)
    workflow.write("scripts/record.py", RECORD_SCRIPT)
    return workflow


def report_of(workflow: Workflow) -> dict:
    return json.loads(workflow.read(".snakemake/sticky/report.json"))["templates"]["llm"]


def complete_output(workflow: Workflow, i: int) -> bool:
    path = workflow.root / f"out/{i}.json"
    return path.exists() and path.read_text().startswith(f"begin {i}\nend {i} ")


def complete_outputs(workflow: Workflow, count: int) -> bool:
    return all(complete_output(workflow, i) for i in range(count))


def strike(workflow: Workflow, victim: int, sig: int) -> int:
    """Wait until invocation `victim` is running, send its worker `sig`; return the worker's pid."""
    wait_for(lambda: (workflow.root / f"victim-ran-{victim}").exists())
    pid = int(workflow.read(f"victim-ran-{victim}"))
    os.kill(pid, sig)
    return pid


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def start_scheduler(workflow: Workflow) -> tuple[subprocess.Popen, Path]:
    scheduler_file = workflow.root / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler = subprocess.Popen(
        [
            dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            "--no-dashboard",
        ],
        cwd=workflow.root,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return scheduler, scheduler_file


def start_kept_worker(workflow: Workflow, scheduler_file: Path, resources: str, threads: int = 1) -> subprocess.Popen:
    """A hand-started Dask worker with a Nanny under the supervisor, offering `resources`."""
    dask = str(Path(sys.executable).with_name("dask"))
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake_executor_plugin_sticky.worker.supervisor", dask, "worker"]
        + ["--scheduler-file", str(scheduler_file), "--resources", resources, "--nthreads", str(threads)]
        + ["--memory-limit", "0", "--no-dashboard"],
        cwd=workflow.root,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_groups(*processes: Optional[subprocess.Popen]) -> None:
    """End hand-started processes (a scheduler, workers) and their process groups."""
    for process in processes:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def ask_identity(address: str, connection_args: dict) -> dict:
    """One request on a fresh connection. (Not a failing `Client`: its garbage collection in
    another client's loop thread deadlocks Dask's loop runner.)"""

    async def ask() -> dict:
        comm = await connect(address, timeout="5s", **connection_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    return asyncio.run(ask())


def all_helpers(workflow: Workflow) -> list[int]:
    return [pid for pids in helper_pids(workflow).values() for pid in pids]


def engine_results(workflow: Workflow) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workflow.root / "out").glob("*.json"))]


def wait_until_gone(pids: list[int], within: float = GONE_S) -> list[int]:
    deadline = time.monotonic() + within
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running(pids)


def running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def helper_pids(workflow: Workflow) -> dict[int, list[int]]:
    """Helper pids by worker pid, as the setups recorded them."""
    found = {}
    for path in (workflow.root / "helpers").glob("*.txt"):
        found[int(path.stem)] = [int(line.split()[1]) for line in path.read_text().splitlines()]
    return found


def engine_workflow(workflow: Workflow, kwargs: str = "{}", extra: str = "") -> Workflow:
    workflow.write("Snakefile", ENGINE_SNAKEFILE)
    workflow.write("templates/engine.py", ENGINE_TEMPLATE)
    workflow.write("scripts/use.py", ENGINE_SCRIPT)
    workflow.write(
        "config.yaml",
        f"""
        sticky:
          engine:
            setup: templates/engine.py
            kwargs: {kwargs}
            {extra}
    """,
    )
    return workflow


SIZE_MB = 8  # four files of 8 MB: a 32 MB model folder


def make_model(folder: Path, files: int = 4, size_mb: int = SIZE_MB, seed: int = 0) -> Path:
    """A model folder of `files` shards of made-up bytes (fixed by the seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"shard-{i}.bin").write_bytes(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size_mb * 2**15))
    return folder


def digest_of(folder: Path) -> str:
    """The digest of a folder's files' bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# A template's audit hook that writes every open of a file under its SOURCE to opens.txt: how the
# stage() tests count reads of the shared source (no braces: it goes into templates that are formatted).
COUNT_OPENS = """
def count_opens(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(SOURCE + os.sep):
            with open("opens.txt", "a") as f:
                f.write(path + "\\n")
"""


def noise(output: str) -> list[str]:
    """The lines of a run's output that a user reads as trouble: a warning, an error, a traceback."""
    return [line for line in output.splitlines() if re.search(r"warn|error|traceback|exception", line, re.IGNORECASE)]


# Idioms of scripts that name things after their outputs, write beside them, link between them,
# and die after writing their log: the same results under every executor (see fidelity_results).
FIDELITY_SNAKEFILE = """
configfile: "config.yaml"
S = ["s1", "s2"]
rule all:
    input:
        expand("ref/{s}/genome.fa.fai", s=S),
        expand("names/{s}/s.json", s=S),
        expand("links/{s}/latest.txt", s=S),
        expand("crash/{s}.txt", s=S),
rule index:
    output: multiext("ref/{s}/genome", ".fa", ".fa.fai")
    resources: sticky="llm"
    script: "scripts/index.py"
rule name:
    output: "names/{s}/s.json"
    resources: sticky="llm"
    script: "scripts/name.py"
rule link:
    output: "links/{s}/data.txt", "links/{s}/latest.txt"
    resources: sticky="llm"
    script: "scripts/link.py"
rule crash:  # last: the workers it kills hold no other invocation waiting
    input: "ref/{s}/genome.fa.fai", "names/{s}/s.json", "links/{s}/latest.txt"
    output: "crash/{s}.txt"
    log: "logs/crash/{s}.log"
    resources: sticky="llm"
    script: "scripts/crash.py"
"""

FIDELITY_SCRIPTS = {
    "scripts/index.py": """
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
fasta = snakemake.output[0]
with open(fasta, "w") as f:
    f.write(">" + snakemake.wildcards.s + "\\nACGT\\n")
with open(fasta + ".fai", "w") as f:  # as samtools faidx: the index beside, by a derived path
    f.write(snakemake.wildcards.s + "\\t4\\n")
with open(fasta + ".md5", "w") as f:  # beside it, not declared
    f.write("checksum\\n")
""",
    "scripts/name.py": """
import json
from pathlib import Path
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
out = Path(snakemake.output[0])
out.write_text(json.dumps({"parent": out.parent.name, "grandparent": out.parent.parent.name, "name": out.name}))
""",
    "scripts/link.py": """
import os
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
with open(snakemake.output[0], "w") as f:
    f.write("data of " + snakemake.wildcards.s + "\\n")
os.symlink(os.path.basename(snakemake.output[0]), snakemake.output[1])
""",
    "scripts/crash.py": """
import os, signal
from snakemake_executor_plugin_sticky import sticky_state
sticky_state(snakemake)
with open(snakemake.log[0], "w") as f:
    f.write("loaded, then died\\n")
os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer
""",
}


def fidelity_workflow(workflow: Workflow) -> None:
    workflow.write("Snakefile", FIDELITY_SNAKEFILE)
    workflow.write("config.yaml", LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("templates/counting.py", COUNTING_TEMPLATE)
    for path, text in FIDELITY_SCRIPTS.items():
        workflow.write(path, text)


def fidelity_results(workflow: Workflow) -> dict[str, str]:
    """What the fidelity workflow left: every file below its folders (a link as `-> target`)."""
    found = {}
    for top in ("ref", "names", "links", "crash", "logs"):
        for path in sorted((workflow.root / top).rglob("*")):
            if path.is_symlink():
                found[str(path.relative_to(workflow.root))] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path.relative_to(workflow.root))] = path.read_text()
    return found


def clear_fidelity_results(workflow: Workflow) -> None:
    """Remove what the fidelity workflow made, for a run under another executor."""
    for top in ("ref", "names", "links", "crash", "logs"):
        shutil.rmtree(workflow.root / top, ignore_errors=True)


# An invocation that holds the interpreter lock for `hold` seconds, as a C call that never
# releases it does: its worker's event loop, and so its heartbeats, stop meanwhile.
HOLDS_THE_LOCK = """
import ctypes, os
from snakemake_executor_plugin_sticky import sticky_state
state = sticky_state(snakemake)
ctypes.PyDLL(None).sleep(int(snakemake.config["hold"]))
with open(snakemake.output[0], "w") as f:
    f.write(f"{os.getpid()}\\n")
"""


def hang_among_400(workflow: Workflow, *args: str, cores: int, timeout: float) -> Any:
    """400 short invocations on two workers, number 200 of them hung, with --keep-going and a 30 s
    invocation timeout (`args` say where the workers run). Only the hung one fails, by its
    timeout, and none of the others waits for it (they share Dask tasks with it: its worker hands
    them back). Returns the run."""
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/record.py", CAREFUL)
    hang = ["--sticky-invocation-timeout", "30", "--keep-going"]
    config = ["--config", "count=400", "victim=200", "victim_sleep=600"]
    run = workflow.run(*args, *hang, *config, cores=cores, timeout=timeout)
    assert run.returncode != 0
    assert run.output.count("Error in rule infer") == 1, run.output
    assert "Invocation of rule 'infer' timed out after 30 s" in run.output
    done = [i for i in range(400) if complete_output(workflow, i)]
    assert len(done) == 399 and 200 not in done
    timed_out = (workflow.root / "victim-ran-200").stat().st_mtime + 30
    late = [i for i in done if (workflow.root / f"out/{i}.json").stat().st_mtime >= timed_out]
    assert late == [], "no invocation waited for the hung one's timeout"
    return run
