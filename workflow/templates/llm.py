"""Sticky template: load a causal language model and its tokenizer once per worker.

`model` is a local directory or a hub id; anything `from_pretrained` accepts.
"""

import gc
import os
import sys
import time


def setup(model, dtype="auto", device="auto"):
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model)
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    loaded.to(device).eval()
    load_s = time.perf_counter() - started
    print(
        f"[sticky template llm] loaded {model} on {device} ({torch_dtype}) in {load_s:.2f} s "
        f"(imports {imported - started:.2f} s), pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "tokenizer": tokenizer,
        "model": loaded,
        "device": device,
        "dtype": str(torch_dtype),
        "load_s": load_s,
        "pid": os.getpid(),
        "name": model,
    }


def teardown(state):
    device = state.get("device", "cpu")
    state.clear()
    if str(device).startswith("cuda"):  # give the GPU memory back now (a full collection takes 0.4 s)
        import torch

        gc.collect()
        torch.cuda.empty_cache()
