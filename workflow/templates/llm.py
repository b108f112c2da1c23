"""Sticky template: load a causal language model and its tokenizer once per worker, and score
prompts with it through a Batcher, so that invocations running side by side share forward passes.

`model` is a local directory (staged to node-local storage first) or a hub id; anything
`from_pretrained` accepts.
"""

import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from snakemake_executor_plugin_sticky import Batcher, stage

LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def dtype_for(torch, dtype, device):
    """bfloat16 where the GPU has it, float32 elsewhere, unless the template names one."""
    if dtype != "auto":
        return getattr(torch, dtype)
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if use_bf16 else torch.float32


def setup(
    model,
    dtype="auto",
    device="auto",
    batch_size=8,
    batcher=True,
    batch_wait=0.0,
    stage_model=True,
    labels=LABELS,
    cpu_threads=1,
):
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    name, local = model, model
    if stage_model and os.path.isdir(model):  # a node-local copy, made once per node, not the shared file system
        local = str(stage(model))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = 1
    if device == "cpu":
        # A CPU is its cores: one thread per forward pass, and forward passes side by side. A
        # worker's slots run theirs side by side; a Batcher's one call at a time stands for
        # several slots, and splits its batch over cpu_threads passes at once.
        torch.set_num_threads(1)
        parts = max(1, min(int(cpu_threads), len(os.sched_getaffinity(0))))
    torch_dtype = dtype_for(torch, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(local)
    loaded = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype)
    loaded.to(device).eval()
    load_s = time.perf_counter() - started
    print(
        f"[sticky template llm] loaded {name} ({local}) on {device} ({torch_dtype}) in {load_s:.2f} s "
        f"(imports {imported - started:.2f} s), pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    forward = partial(score_prompts, tokenizer, loaded, device, tuple(labels))
    cores = ThreadPoolExecutor(parts, thread_name_prefix="llm-forward") if parts > 1 else None
    if cores is not None:
        forward = partial(side_by_side, cores, parts, forward)
    return {
        # prompts -> one log-likelihood per label each; batched across the invocations running
        # side by side (batch_size prompts per forward pass at most), or per invocation
        "score": Batcher(forward, max_batch=batch_size, max_wait=batch_wait)
        if batcher
        else partial(in_batches, forward, batch_size),
        "labels": tuple(labels),
        "device": device,
        "dtype": str(torch_dtype),
        "load_s": load_s,
        "pid": os.getpid(),
        "name": name,
        "cores": cores,
    }


def serve(state):
    """What the workers' OpenAI-compatible endpoint serves (shell rules reach it with curl, code
    with the openai client): chat and text completions whose answer is the label the model
    scores highest after the last message or the prompt, as the verify script picks it."""
    verdicts = partial(best_labels, state["score"], state["labels"])
    return {
        "model": "claim-verifier",
        "chat": lambda requests: verdicts([text_of(r["messages"][-1]["content"]) for r in requests]),
        "completions": lambda requests: verdicts([r["prompt"] for r in requests]),
    }


def best_labels(score, labels, prompts):
    """The label each prompt scores highest; the score's Batcher merges them with other calls."""
    return [labels[max(range(len(labels)), key=s.__getitem__)] for s in score(prompts)]


def text_of(content):
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def teardown(state):
    device = state.get("device", "cpu")
    score = state.get("score")
    if isinstance(score, Batcher):
        score.close("the template is torn down")
    if state.get("cores") is not None:
        state["cores"].shutdown(wait=True)
    state.clear()
    if str(device).startswith("cuda"):  # give the GPU memory back now (a full collection takes 0.4 s)
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def side_by_side(cores, parts, forward, prompts):
    """One call's prompts in `parts` forward passes at once, one per core."""
    size = -(-len(prompts) // parts)
    chunks = [prompts[first : first + size] for first in range(0, len(prompts), size)]
    return [scores for chunk in cores.map(forward, chunks) for scores in chunk]


def in_batches(forward, batch_size, prompts):
    """Without a Batcher: the invocation's own prompts, batch_size per forward pass."""
    scores = []
    for first in range(0, len(prompts), batch_size):
        scores += forward(prompts[first : first + batch_size])
    return scores


def score_prompts(tokenizer, model, device, labels, prompts):
    """Log-likelihood of each label after each prompt, in one forward pass for all of them."""
    import torch

    options = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    max_len = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sequences, spans = [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        for option in options:
            kept = prompt_ids[-(max_len - len(option)) :]  # keep the claim's end if the evidence is long
            sequences.append(kept + option)
            spans.append((len(kept), len(kept) + len(option)))
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    wanted = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for row, (sequence, (start, end)) in enumerate(zip(sequences, spans)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        wanted[row, start - 1 : end - 1] = True  # logits at t predict token t + 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
        wanted = wanted.to(device)
        picked = torch.log_softmax(logits[wanted].float(), dim=-1)
        targets = ids[:, 1:].to(device)[wanted]
        token_scores = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rows = torch.arange(len(sequences), device=device).unsqueeze(1).expand_as(wanted)[wanted]
        totals = torch.zeros(len(sequences), device=device).index_add_(0, rows, token_scores)
    return totals.view(len(prompts), len(labels)).cpu().tolist()
