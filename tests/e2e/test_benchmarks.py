"""The GPU benchmark's steps, checked on the CPU: it has to work the first time a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_its_steps_on_the_cpu_with_a_tiny_model(tmp_path: Path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_gpu.py"),
        "--smoke",
        "--invocations",
        "2",
        "--claims-per-invocation",
        "4",
        "--repeats",
        "1",
        "--batching-sizes",
        "2",
        "--batching-claims",
        "8",
        "--results",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=conftest.snakemake_env())
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("*-gpu-smoke.json")
    report = json.loads(result.read_text())
    (pair,) = report["pairs"]
    assert pair["sticky_s"] > 0 and pair["local_s"] > 0
    assert report["setup_split"]["disk_to_cpu_s"]["median"] > 0
    assert report["invocation_s"]["median"] > 0
    table = (tmp_path / result.name.replace(".json", ".md")).read_text()
    assert "| disk → CPU | CPU → GPU |" in table and "| claims per invocation | Batcher |" in table
    with_batcher, without = report["batching"]
    assert with_batcher["batcher"] and not without["batcher"]
    assert with_batcher["claims_per_s"]["median"] > 0 and without["claims_per_s"]["median"] > 0
