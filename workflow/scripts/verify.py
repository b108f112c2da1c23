"""Verify one shard of claims: score the three label options by the model's log-likelihood after
a prompt that shows evidence and claim; one forward pass per micro-batch, no sampling."""

import json
import os
import time

import torch

from claimio import LABELS, evidence_text, read_claims
from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
tokenizer, model, device = state["tokenizer"], state["model"], state["device"]
torch.set_num_threads(max(1, int(snakemake.threads)))  # the same arithmetic under any executor


def prompt(claim: dict) -> str:
    return f"Evidence: {evidence_text(claim.get('evidence'))}\nClaim: {claim['claim']}\nVerdict:"


OPTIONS = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in LABELS]
MAX_LEN = int(getattr(model.config, "max_position_embeddings", 512) or 512)
PAD = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.inference_mode()
def score(batch: list[dict]) -> list[list[float]]:
    """Log-likelihood of each label option for each claim of the batch, in one forward pass."""
    sequences, spans = [], []
    for claim in batch:
        prompt_ids = tokenizer(prompt(claim))["input_ids"]
        for option in OPTIONS:
            kept = prompt_ids[-(MAX_LEN - len(option)) :]  # keep the claim end if evidence is long
            sequences.append(kept + option)
            spans.append((len(kept), len(kept) + len(option)))
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    wanted = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for row, (sequence, (start, end)) in enumerate(zip(sequences, spans)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        wanted[row, start - 1 : end - 1] = True  # logits at t predict token t + 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    wanted = wanted.to(device)
    picked = torch.log_softmax(logits[wanted].float(), dim=-1)
    targets = ids[:, 1:].to(device)[wanted]
    token_scores = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(len(sequences), device=device).unsqueeze(1).expand_as(wanted)[wanted]
    totals = torch.zeros(len(sequences), device=device).index_add_(0, rows, token_scores)
    return totals.view(len(batch), len(LABELS)).cpu().tolist()


started = time.perf_counter()
claims = read_claims(snakemake.input.claims)
batch_size = int(snakemake.params.batch_size)
with open(snakemake.output[0], "w", encoding="utf-8") as out:
    for first in range(0, len(claims), batch_size):
        batch = claims[first : first + batch_size]
        for claim, scores in zip(batch, score(batch)):
            predicted = LABELS[max(range(len(LABELS)), key=scores.__getitem__)]
            out.write(json.dumps({
                "id": claim["id"],
                "label": claim.get("label"),
                "predicted": predicted,
                "scores": {label: round(s, 4) for label, s in zip(LABELS, scores)},
            }) + "\n")

with open(snakemake.log[0], "w") as log:
    print(
        f"verified {len(claims)} claims in {time.perf_counter() - started:.3f} s in pid {os.getpid()}; "
        f"model {state['name']} on {device} ({state['dtype']}) was loaded in {state['load_s']:.2f} s "
        f"by pid {state['pid']}",
        file=log,
    )
