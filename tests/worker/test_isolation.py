"""Scripts written for a fresh process: each invocation in a resident worker sees the process a
fresh job would see, one after another (slots 1) and side by side (slots 2).

One workflow holds a rule per idiom, each with two jobs. Its outputs and logs under the local
executor (a process per job) are the reference; the same workflow runs on one sticky worker with
slots 1 (job 1 after job 0, on the same worker) and with slots 2 (jobs 0 and 1 side by side: each
pair meets, job 0 makes its change and holds it while job 1 looks and makes its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import Run, Workflow, made_once, snakemake_env

IDIOMS = [
    "streams",
    "redirect",
    "logs",
    "helpers",
    "chdir",
    "environ",
    "warn",
    "plot",
    "pool",
    "omp",
    "preamble",
    "globals",
    "argv",
    "hooks",
    "rand",
    "started",
    "fds",
    "context",
    "settings",
]
# what only the process can hold: with slots 2 a script may not change it (it fails, neighbour or
# not); and settings that neighbours side by side share until both have ended
PROCESS_WIDE = ("chdir", "fds")
SHARED_SIDE_BY_SIDE = ("settings",)

RULE = """
rule {idiom}:
    input: after("{idiom}")
    output: "out/{idiom}-{{i}}.txt"
    log: "logs/{idiom}-{{i}}.log"
    priority: {priority}
    threads: {threads}
    resources: sticky="t"
    script: "{script}"
"""

SNAKEFILE = (
    """
configfile: "config.yaml"
MEET = bool(config.get("meet"))

def after(rule):
    # one after another: job 1 follows job 0 of its rule on the worker
    return lambda w: [] if MEET or w.i == "0" else [f"out/{rule}-0.txt"]

rule all:
    input: expand("out/{idiom}-{i}.txt", idiom=%r, i=(0, 1))
"""
    % IDIOMS
    + "".join(
        RULE.format(
            idiom=idiom,
            priority=len(IDIOMS) - n,  # pairs run in turn, each side by side when they meet
            threads=2 if idiom == "omp" else 1,
            script="scripts/side{wildcards.i}/use.py" if idiom == "helpers" else f"scripts/{idiom}.py",
        )
        for n, idiom in enumerate(IDIOMS)
    )
)

CONFIG = """
sticky:
  t:
    setup: templates/t.py
    slots: {slots}
"""

TEMPLATE = """
import os

def setup():
    return {"pid": os.getpid()}

def teardown(state):
    with open(f"teardowns/{state['pid']}", "w") as f:
        f.write("ran\\n")
"""

# Jobs 0 and 1 of a rule as a pair: in meet mode (side by side), job 0 changes something and holds
# the change until job 1 has looked; alone, they do nothing.
PAIRS = """
import os, time
ROOT = os.getcwd()

def _marker(snakemake, what):
    folder = os.path.join(ROOT, "meet", snakemake.rule)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, what)

def _wait(path):
    deadline = time.time() + 120
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"{path} never came: the pair did not run side by side")
        time.sleep(0.02)

def meet(snakemake):
    return bool(snakemake.config.get("meet"))

def changed(snakemake):
    # job 0: its change is made; wait until job 1 has looked
    if meet(snakemake):
        open(_marker(snakemake, "changed"), "w").close()
        _wait(_marker(snakemake, "looked"))

def ready(snakemake):
    # job 0, before a change of the whole process: job 1 runs beside it
    if meet(snakemake):
        _wait(_marker(snakemake, "arrived"))

def look(snakemake):
    # job 1: wait until job 0 holds its change
    if meet(snakemake):
        open(_marker(snakemake, "arrived"), "w").close()
        _wait(_marker(snakemake, "changed"))

def looked(snakemake):
    if meet(snakemake):
        open(_marker(snakemake, "looked"), "w").close()

def first(snakemake):
    return snakemake.wildcards.i == "0"
"""

SCRIPTS = {
    # Snakemake's own idiom for a script's log
    "streams": """
        import sys, pairs
        print("job", snakemake.wildcards.i, "starts")
        if not pairs.first(snakemake):
            pairs.look(snakemake)
            print("printed while job 0 writes into its log")
        with open(snakemake.log[0], "w") as f:
            sys.stderr = sys.stdout = f
            print("log of job", snakemake.wildcards.i)
            if pairs.first(snakemake):
                pairs.changed(snakemake)
            print("stderr too", file=sys.stderr)
        if not pairs.first(snakemake):
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write("ok\\n")
    """,
    "redirect": """
        import contextlib, sys, pairs
        print("job", snakemake.wildcards.i, "starts")
        with open(snakemake.log[0], "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print("log of job", snakemake.wildcards.i)
            if pairs.first(snakemake):
                pairs.changed(snakemake)
            else:
                pairs.look(snakemake)
                pairs.looked(snakemake)
            print("to stderr", file=sys.stderr)
        print("after the redirect")
        open(snakemake.output[0], "w").write("ok\\n")
    """,
    "logs": """
        import logging, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        handlers = len(logging.getLogger().handlers)
        level = logging.getLogger().level
        logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        logging.info("job %s", snakemake.wildcards.i)
        mine = logging.getLogger("mine")
        mine_level = mine.level
        mine.setLevel(logging.DEBUG)
        mine.debug("debug of job %s", snakemake.wildcards.i)
        logging.getLogger("quiet").debug("hidden")
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        logging.warning("last line of job %s", snakemake.wildcards.i)
        open(snakemake.output[0], "w").write(f"{handlers} {level} {mine_level}\\n")
    """,
    "chdir": """
        import os, pairs
        out = os.path.abspath(snakemake.output[0])
        start = os.getcwd()
        if pairs.first(snakemake):
            os.makedirs("elsewhere", exist_ok=True)
            pairs.ready(snakemake)
            try:
                os.chdir("elsewhere")
            finally:
                pairs.changed(snakemake)
            open("moved.txt", "w").write("here\\n")
            result = os.path.relpath(start, os.getcwd())
        else:
            pairs.look(snakemake)
            open("stayed.txt", "w").write("here\\n")
            result = f"{os.getcwd() == os.path.dirname(os.path.dirname(out))} {os.path.exists('stayed.txt')}"
            pairs.looked(snakemake)
        open(out, "w").write(result + "\\n")
    """,
    "environ": """
        import os, subprocess, pairs
        if pairs.first(snakemake):
            pairs.ready(snakemake)
            try:
                os.environ["STICKY_PROBE"] = "job 0"
                os.environ.pop("HOME", None)
            finally:
                pairs.changed(snakemake)
            seen = subprocess.run(["sh", "-c", "echo $STICKY_PROBE"], capture_output=True, text=True).stdout.strip()
        else:
            pairs.look(snakemake)
            seen = f"{os.environ.get('STICKY_PROBE', 'unset')} {'HOME' in os.environ}"
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write(seen + "\\n")
    """,
    "warn": """
        import warnings, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        try:
            warnings.warn("harmless", UserWarning)
            result = "warned"
        except UserWarning:
            result = "raised"
        warnings.simplefilter("error")
        try:
            warnings.warn("now an error", UserWarning)
        except UserWarning:
            result += " then raised"
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write(result + "\\n")
    """,
    "plot": """
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        plt.plot([1, 2, 3])
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        plt.title(f"job {snakemake.wildcards.i}")
        open(snakemake.output[0], "w").write(f"{len(plt.gca().lines)} {plt.get_fignums()} {plt.gca().get_title()}\\n")
    """,
    "pool": """
        import multiprocessing, pairs

        class Square:
            def __call__(self, x):
                return x * x

        def cube(x):
            return x ** 3

        def handlers(_):
            import signal
            return [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]

        if __name__ == "__main__":
            if not pairs.first(snakemake):
                pairs.look(snakemake)
            with multiprocessing.Pool(2) as pool:
                squares = pool.map(Square(), range(4))
                signals = pool.map(handlers, range(2))  # a fresh Python's, not the worker's
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                cubes = pool.map(cube, range(3))
            if pairs.first(snakemake):
                pairs.changed(snakemake)
            else:
                pairs.looked(snakemake)
            open(snakemake.output[0], "w").write(f"{squares} {cubes} {signals}\\n")
    """,
    "omp": """
        import os
        names = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"]
        open(snakemake.output[0], "w").write(" ".join(os.environ.get(n, "unset") for n in names) + f" {snakemake.threads}\\n")
    """,
    "preamble": """
        import pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
            pairs.looked(snakemake)
        else:
            pairs.changed(snakemake)
        logger.info("the preamble's logger")
        names = sorted(n for n in ("snakemake", "logger", "Snakemake", "sys", "pickle", "__real_file__", "__file__") if n in globals())
        open(snakemake.output[0], "w").write(f"{names} {type(logger).__name__} {logger.name} {__name__} {__file__ == __import__('os').path.realpath(snakemake.scriptdir + '/preamble.py')}\\n")
    """,
    "globals": """
        import json, os, re, sys
        here = os.getcwd() + os.sep
        seen = {
            "name": __name__,
            "file": __file__ == os.path.realpath(os.path.join(snakemake.scriptdir, "globals.py")),
            "real file": re.sub(r"tmp\\w+\\.", "tmpX.", __real_file__.replace(here, "")),
            "copy exists": os.path.exists(__real_file__),
            "copy ends with the script": open(__real_file__).read().endswith(open(__file__).read()),
            "cached": __cached__, "package": __package__, "spec": __spec__, "doc": __doc__,
            "loader": type(globals().get("__loader__")).__name__,
            "snakemake": type(snakemake).__module__ + "." + type(snakemake).__name__,
            "Snakemake": Snakemake.__module__, "logger": type(logger).__module__,
            "modules": [sys.__name__, pickle.__name__],
            "workflow's path": [p.replace(here, "") for p in sys.path if p.startswith(here)],
            "output": [type(snakemake.output).__name__, list(snakemake.output)],
            "scriptdir": snakemake.scriptdir.replace(here, ""),
        }
        open(snakemake.output[0], "w").write(json.dumps(seen, indent=1) + "\\n")
    """,
    "argv": """
        import sys, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        seen = f"{len(sys.argv)} {'/nonexistent' in sys.path} {sys.path.count(snakemake.scriptdir)}"
        sys.argv.append("more")
        sys.path.append("/nonexistent")
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write(seen + "\\n")
    """,
    "hooks": """
        import atexit, pairs
        out = snakemake.output[0]

        @atexit.register
        def write():
            open(out, "w").write(f"written at exit of job {snakemake.wildcards.i}\\n")

        def never():
            open(out + ".never", "w").close()

        atexit.register(never)
        atexit.unregister(never)
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.look(snakemake)
            pairs.looked(snakemake)
    """,
    "rand": """
        import random, numpy, torch, pairs
        if pairs.first(snakemake):
            random.seed(0)
            numpy.random.seed(0)
            torch.manual_seed(0)
            pairs.changed(snakemake)
        else:
            pairs.look(snakemake)
            random.seed(1)
            numpy.random.seed(1)
            torch.manual_seed(1)
            pairs.looked(snakemake)
        draws = [random.random(), random.randint(0, 100), float(numpy.random.rand()), int(numpy.random.randint(100))]
        draws.append(float(numpy.random.mtrand._rand.random_sample()))  # as scikit-learn draws (random_state=None)
        weights = torch.empty(2, 2)
        torch.nn.init.normal_(weights)
        draws += [torch.rand(2).tolist(), torch.randint(0, 100, (2,)).tolist(), torch.multinomial(torch.ones(9), 3).tolist()]
        draws += [weights.tolist(), torch.empty(2).uniform_().tolist(), torch.initial_seed()]
        open(snakemake.output[0], "w").write(f"{draws}\\n")
    """,
    # the standard descriptors pointed at the log, as C code and subprocesses write to them
    "fds": """
        import os, subprocess, pairs
        if pairs.first(snakemake):
            log = os.open(snakemake.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            pairs.ready(snakemake)
            try:
                os.dup2(log, 1)
            finally:
                pairs.changed(snakemake)
            subprocess.run(["echo", "a subprocess of job 0"], check=True)
            os.write(1, b"C-level write of job 0\\n")
        else:
            pairs.look(snakemake)
            subprocess.run(["sh", "-c", "echo a subprocess of job 1 > " + snakemake.log[0]], check=True)
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write("ok\\n")
    """,
    # what belongs to the script's thread or context: torch's grad mode, numpy's print options, decimal
    "context": """
        import decimal, numpy, torch, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        seen = f"{torch.is_grad_enabled()} {numpy.get_printoptions()['precision']} {decimal.getcontext().prec}"
        torch.set_grad_enabled(False)
        numpy.set_printoptions(precision=2)
        decimal.getcontext().prec = 5
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write(f"{seen} {numpy.array([1/3])} {decimal.Decimal(1) / 3}\\n")
    """,
    # what the process holds: signal handlers, the umask, torch's threads and random generator
    "settings": """
        import os, signal, torch, pairs
        if not pairs.first(snakemake):
            pairs.look(snakemake)
        mask = os.umask(0o077)
        os.umask(mask)
        seven = torch.Generator().manual_seed(7)
        after_seed_7 = [torch.rand(1, generator=seven).item() for _ in range(2)]
        # unseeded, torch's draws differ between fresh processes: the draw must only not follow seed 7
        unseeded = torch.rand(1).item() not in after_seed_7
        seen = f"{signal.getsignal(signal.SIGUSR1)} {oct(mask)} {torch.get_num_threads()} {unseeded}"
        signal.signal(signal.SIGUSR1, lambda *_: None)
        os.umask(0o077)
        torch.set_num_threads(3)
        torch.manual_seed(7)
        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.looked(snakemake)
        open(snakemake.output[0], "w").write(f"{seen} {torch.rand(1).item():.6f}\\n")
    """,
    # threads the script starts: not daemons, joined at its end, their logs and output the job's
    "started": """
        import logging, threading, time, pairs
        from concurrent.futures import ThreadPoolExecutor
        logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(threadName)s %(message)s")

        def late():
            time.sleep(0.3)
            logging.info("from a thread of job %s", snakemake.wildcards.i)
            open(snakemake.output[0], "w").write("written by a thread\\n")

        if pairs.first(snakemake):
            pairs.changed(snakemake)
        else:
            pairs.look(snakemake)
            pairs.looked(snakemake)
        ThreadPoolExecutor(2, thread_name_prefix="pool").submit(logging.info, "from an executor left open")
        threading.Thread(target=late, name="late").start()
    """,
}

HELPER = """
COUNT = 0

def bump():
    global COUNT
    COUNT += 1
    return f"{SIDE} {COUNT}"
"""

USE = """
import importlib, os, sys
sys.path.insert(0, os.path.dirname(snakemake.scriptdir))
import pairs
import helper
from pkg import VALUE
if not pairs.first(snakemake):
    pairs.look(snakemake)
first = helper.bump()
again = importlib.import_module("helper").bump()
if pairs.first(snakemake):
    pairs.changed(snakemake)
else:
    pairs.looked(snakemake)
open(snakemake.output[0], "w").write(f"{first} {again} {VALUE} {helper.bump()}\\n")
"""


def isolation_workflow(root: Path) -> Workflow:
    root.mkdir(parents=True, exist_ok=True)
    wf = Workflow(root)
    wf.write("Snakefile", SNAKEFILE)
    wf.write("templates/t.py", TEMPLATE)
    wf.write("scripts/pairs.py", PAIRS)
    for name, text in SCRIPTS.items():
        wf.write(f"scripts/{name}.py", text)
    for side in ("0", "1"):
        wf.write(f"scripts/side{side}/use.py", USE)
        wf.write(f"scripts/side{side}/helper.py", f"SIDE = 'side {side}'\n" + textwrap.dedent(HELPER))
        wf.write(f"scripts/side{side}/pkg/__init__.py", "from .inner import VALUE\n")
        wf.write(f"scripts/side{side}/pkg/inner.py", f"VALUE = 'package of side {side}'\n")
    (root / "teardowns").mkdir()
    return wf


def results(wf: Workflow) -> dict[str, str]:
    """Every output and log of the run, by path."""
    found = {}
    for folder in ("out", "logs"):
        for path in sorted((wf.root / folder).glob("*")):
            found[f"{folder}/{path.name}"] = path.read_text()
    return found


def three_runs(folder: Path) -> dict[str, dict]:
    """The reference run (local executor), then the sticky runs with slots 1 and 2."""
    done = {}
    for mode, slots, meet, executor in (
        ("local", 1, True, None),
        ("slots1", 1, False, "sticky"),
        ("slots2", 2, True, "sticky"),
    ):
        wf = isolation_workflow(folder / mode)
        wf.write("config.yaml", CONFIG.format(slots=slots))
        args = ["--config", f"meet={meet}", "--keep-going"]
        if executor:
            args += ["--sticky-workers", "1"]
        run = wf.run(*args, executor=executor, cores=2)
        done[mode] = {"root": str(wf.root), "returncode": run.returncode, "output": run.output}
    return done


@pytest.fixture
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Workflow, Run]]:
    """The three runs, made once for every test of this module (in whichever test process)."""
    made = made_once(tmp_path_factory, "isolation-runs", three_runs)
    return {mode: (Workflow(Path(m["root"])), Run(m["returncode"], m["output"], 0.0)) for mode, m in made.items()}


@pytest.mark.parametrize("mode", ["slots1", "slots2"])
@pytest.mark.parametrize("idiom", IDIOMS)
def test_a_script_sees_what_a_fresh_job_sees(runs: dict, idiom: str, mode: str):
    reference, local = runs["local"]
    wf, run = runs[mode]
    assert local.returncode == 0, local.output
    expected = {k: v for k, v in results(reference).items() if k.split("/")[1].startswith(f"{idiom}-")}
    got = {k: v for k, v in results(wf).items() if k.split("/")[1].startswith(f"{idiom}-")}
    if mode == "slots2" and idiom in SHARED_SIDE_BY_SIDE:
        # neighbours side by side share it (docs/further.md): the first sees a fresh process, the
        # second the first's changes
        first, second = f"out/{idiom}-0.txt", f"out/{idiom}-1.txt"
        seen = {path: text.rsplit(" ", 1)[0] for path, text in got.items()}  # without the shared RNG's draw
        assert seen[first] == expected[first].rsplit(" ", 1)[0], run.output
        assert " 0o77 " in seen[second] and seen[second] != expected[second].rsplit(" ", 1)[0], (got, expected)
        return
    if mode == "slots2" and idiom in PROCESS_WIDE:  # job 0 fails, job 1 sees nothing of it
        expected = {k: v for k, v in expected.items() if k.endswith("-1.txt") or k.endswith("-1.log")}
        got = {k: v for k, v in got.items() if not k.endswith("-0.log")}
    assert expected, f"the local run made nothing for {idiom}"
    assert got == expected, run.output


def test_each_invocation_starts_anew_and_the_template_lives_on(runs: dict):
    for mode in ("slots1", "slots2"):
        wf, run = runs[mode]
        # one worker ran every invocation, its template was built once and torn down once
        assert len(list((wf.root / "teardowns").iterdir())) == 1, run.output
        assert ("moved.txt" in os.listdir(wf.root / "elsewhere")) == (mode == "slots1")
        assert not (wf.root / "out" / "hooks-0.txt.never").exists()
        assert not list((wf.root / ".snakemake" / "scripts").glob("sticky-*")), "the spawn main files are removed"
    wf, run = runs["slots1"]
    assert run.returncode == 0, run.output


def test_a_change_of_the_whole_process_beside_a_neighbour_fails_clearly(runs: dict):
    wf, run = runs["slots2"]
    assert run.returncode != 0
    calls = [("os.chdir('elsewhere')", "working directory"), ("os.dup2(", "standard file descriptors")]
    for call, what in calls:
        assert call in run.output and f"changes the {what} of the whole worker process" in run.output, run.output
    assert "slots: 1" in run.output and "template 't' has slots: 2" in run.output
    assert not (wf.root / "elsewhere" / "moved.txt").exists()  # the change was refused, not made
    failed = {line.split()[-1] for line in run.output.splitlines() if line.startswith("Error in rule")}
    assert failed == {f"{idiom}:" for idiom in PROCESS_WIDE}, run.output


def test_the_preamble_is_snakemakes(tmp_path: Path):
    """The script's globals are those of Snakemake's own preamble (snakemake.script.PythonScript)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import json, os, pickle, sys, types
            from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, ResourceList, Snakemake, Wildcards
            from snakemake.script import PythonScript
            from snakemake.sourcecache import infer_source_file
            from snakemake_executor_plugin_sticky.worker.isolation import preamble

            script = os.path.abspath("script.py")
            open(script, "w").write("")
            args = dict(input_=InputFiles(), output=OutputFiles(), params=Params(), wildcards=Wildcards(), threads=1,
                        resources=ResourceList(), log=Log(), config={}, rulename="r", conda_env=None,
                        container_img=None, singularity_args="", env_modules=None, bench_record=None, jobid=1,
                        bench_iteration=None, cleanup_scripts=True, shadow_dir=None, is_local=True)
            theirs = PythonScript.generate_preamble(infer_source_file(script), None, "", os.getcwd(), **args,
                                                    preamble_addendum="__real_file__ = __file__; __file__ = 'x';")
            namespace = {"__file__": script}
            exec(theirs, namespace)
            class Invocation:
                pass
            invocation = Invocation()
            invocation.script = script
            invocation.snakemake = namespace["snakemake"]
            ours = preamble(invocation, types.ModuleType("builtins"))
            print(json.dumps({"theirs": sorted(namespace), "ours": sorted(ours),
                              "logger": namespace["logger"] is ours["logger"]}))
            """
        )
    )
    found = json.loads(
        subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    )
    assert set(found["theirs"]) <= set(found["ours"]) | {"__builtins__"}, found
    assert found["logger"], "the preamble's logger is Snakemake's"


def test_with_slots_2_a_scripts_environment_is_its_own_and_a_directory_change_is_refused(tmp_path: Path):
    """With slots 2, a script's environment is its own: a neighbour that starts while it runs
    neither waits nor sees it. A change of the working directory is refused even alone: the first
    test run shows it."""
    probe = tmp_path / "probe.py"
    probe.write_text(HOLD_PROBE)
    run = subprocess.run(
        [sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, env=snakemake_env(), timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    events = run.stdout.split()
    assert events == ["mover-refused", "other-starts-clean", "changer-changed", "changer-ends"], run.stdout + run.stderr


HOLD_PROBE = textwrap.dedent(
    """
    import os, threading, types
    from snakemake_executor_plugin_sticky.worker.isolation import Isolation

    os.makedirs("scripts", exist_ok=True)
    open("scripts/mover.py", "w").write(
        "import os\\nos.makedirs('sub', exist_ok=True)\\ntry:\\n    os.chdir('sub')\\n    print('mover-moved')\\n"
        "except Exception as e:\\n    print('mover-refused' if 'slots: 1' in str(e) and os.getcwd() == WORKDIR else e)\\n")
    open("scripts/changer.py", "w").write(
        "import os, time\\nos.environ['STICKY_HOLD'] = '1'\\nprint('changer-changed')\\n"
        "MOVED.set()\\ntime.sleep(1)\\nprint('changer-ends')\\n")
    open("scripts/other.py", "w").write("import os\\nprint('other-starts-clean' if 'STICKY_HOLD' not in os.environ else 'other-sees-it')\\n")
    workdir = os.getcwd()
    isolation = Isolation(workdir, slots=2)
    undo = isolation.install()
    moved = threading.Event()
    printed = []

    def invocation(name):
        snakemake = types.SimpleNamespace(threads=1)
        return types.SimpleNamespace(key=name, rule=name, template="t", script=os.path.join(workdir, "scripts", f"{name}.py"),
                                     snakemake=snakemake, basedir=workdir)

    def run(name):
        with isolation.invocation(invocation(name)) as context:
            context.main.__dict__.update(WORKDIR=workdir, MOVED=moved)
            exec(compile(open(context.script).read(), context.script, "exec"), context.main.__dict__)
        printed.append(context.output()[0])

    run("mover")  # alone
    changer = threading.Thread(target=run, args=("changer",))
    changer.start()
    moved.wait(60)
    other = threading.Thread(target=run, args=("other",))
    other.start()
    changer.join(); other.join()
    undo()
    print("".join(printed), end="")
    """
)


def test_a_failure_as_an_invocation_begins_fails_it_alone_and_leaves_the_process_clean(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(BEGIN_FAILS_PROBE)
    run = subprocess.run(
        [sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, env=snakemake_env(), timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split() == ["failed:", "injected", "running:", "0", "next-moved", "back-in-workdir"], run.stdout


BEGIN_FAILS_PROBE = textwrap.dedent(
    """
    import os, types
    from snakemake_executor_plugin_sticky.worker.isolation import Isolation, libraries

    os.makedirs("scripts", exist_ok=True)
    open("scripts/next.py", "w").write("import os\\nos.makedirs('sub', exist_ok=True)\\nos.chdir('sub')\\nprint('next-moved')\\n")
    open("scripts/first.py", "w").write("print('never')\\n")
    workdir = os.getcwd()
    isolation = Isolation(workdir, slots=1)
    undo = isolation.install()

    def invocation(name):
        snakemake = types.SimpleNamespace(threads=1)
        return types.SimpleNamespace(key=name, rule=name, template="t", script=os.path.join(workdir, "scripts", f"{name}.py"),
                                     snakemake=snakemake, basedir=workdir)

    real = libraries.begin
    libraries.begin = lambda context: (_ for _ in ()).throw(RuntimeError("injected"))
    try:
        with isolation.invocation(invocation("first")):
            print("never")
    except RuntimeError as e:
        print("failed:", e)
    libraries.begin = real
    print("running:", len(isolation.admission.running))
    with isolation.invocation(invocation("next")) as context:
        exec(compile(open(context.script).read(), context.script, "exec"), context.main.__dict__)
    print(context.output()[0].strip())
    print("back-in-workdir" if os.getcwd() == workdir else os.getcwd())
    undo()
    """
)


def test_logging_levels_set_beside_a_script_reach_it_and_forcing_a_config_leaves_the_workers_handlers(
    tmp_path: Path,
):
    """A level the template's thread sets while a script holds logging views reaches the script
    at once (its cache of enabled levels is emptied too); `basicConfig(force=True)` and
    `dictConfig` in scripts configure their own logging and leave the worker's handler open."""
    probe = tmp_path / "probe.py"
    probe.write_text(LOGGING_PROBE)
    run = subprocess.run(
        [sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, env=snakemake_env(), timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split("\n")[:4] == ["script-sees-False-then-True", "worker-handler-open", "['a', 'b', 'c']", ""]
    assert (tmp_path / "force.log").read_text() == "INFO:root:mine\n"
    assert (tmp_path / "dict.log").read_text() == "mine too\n"


LOGGING_PROBE = textwrap.dedent(
    """
    import logging, os, threading, types
    from snakemake_executor_plugin_sticky.worker.isolation import Isolation

    os.makedirs("scripts", exist_ok=True)
    open("scripts/force.py", "w").write(
        "import logging\\nlogging.basicConfig(force=True, filename='force.log', level=logging.INFO)\\nlogging.info('mine')\\n")
    open("scripts/dict.py", "w").write(
        "import logging.config\\nlogging.config.dictConfig({'version': 1, 'handlers': {'f': {'class': "
        "'logging.FileHandler', 'filename': 'dict.log'}}, 'root': {'handlers': ['f'], 'level': 'INFO'}})\\n"
        "logging.info('mine too')\\n")
    open("scripts/cache.py", "w").write(
        "import logging\\nlogging.getLogger().addHandler(logging.FileHandler('cache.log'))\\npkg = logging.getLogger('pkg')\\n"
        "before = pkg.isEnabledFor(logging.INFO)\\nLOUDER.set()\\nDONE.wait(60)\\n"
        "print(f'script-sees-{before}-then-{pkg.isEnabledFor(logging.INFO)}')\\n")
    workdir = os.getcwd()
    worker_handler = logging.FileHandler("worker.log", mode="w")
    logging.getLogger().addHandler(worker_handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("pkg").setLevel(logging.WARNING)
    isolation = Isolation(workdir, slots=1)
    undo = isolation.install()
    louder, done = threading.Event(), threading.Event()

    def template_thread():  # a level the template (not a script) sets while the script runs
        louder.wait(60)
        logging.getLogger("pkg").setLevel(logging.INFO)
        done.set()

    threading.Thread(target=template_thread).start()
    for name, letter in (("cache", "a"), ("force", "b"), ("dict", "c")):
        snakemake = types.SimpleNamespace(threads=1)
        invocation = types.SimpleNamespace(key=name, rule=name, template="t", script=os.path.join(workdir, "scripts", f"{name}.py"),
                                           snakemake=snakemake, basedir=workdir)
        with isolation.invocation(invocation) as context:
            context.main.__dict__.update(LOUDER=louder, DONE=done)
            exec(compile(open(context.script).read(), context.script, "exec"), context.main.__dict__)
        print(context.output()[0].strip()) if name == "cache" else None
        logging.info(letter)
    print("worker-handler-open" if worker_handler.stream and not worker_handler.stream.closed else "worker-handler-closed")
    worker_handler.flush()
    print(open("worker.log").read().split())
    undo()
    """
)
