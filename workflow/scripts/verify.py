"""Verify one shard of claims: score the three label options by the model's log-likelihood after
a prompt that shows evidence and claim. The template's scorer batches the prompts of the
invocations running side by side into shared forward passes (a Batcher); no sampling."""

import json
import os
import time

from claimio import LABELS, evidence_text, read_claims

from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
assert tuple(state["labels"]) == LABELS, "the template scores the labels this script writes"


def prompt(claim: dict) -> str:
    return f"Evidence: {evidence_text(claim.get('evidence'))}\nClaim: {claim['claim']}\nVerdict:"


started = time.perf_counter()
claims = read_claims(snakemake.input.claims)
scores = state["score"]([prompt(claim) for claim in claims])
with open(snakemake.output[0], "w", encoding="utf-8") as out:
    for claim, claim_scores in zip(claims, scores):
        predicted = LABELS[max(range(len(LABELS)), key=claim_scores.__getitem__)]
        out.write(
            json.dumps(
                {
                    "id": claim["id"],
                    "label": claim.get("label"),
                    "predicted": predicted,
                    "scores": {label: round(s, 4) for label, s in zip(LABELS, claim_scores)},
                }
            )
            + "\n"
        )

with open(snakemake.log[0], "w") as log:
    print(
        f"verified {len(claims)} claims in {time.perf_counter() - started:.3f} s in pid {os.getpid()}; "
        f"model {state['name']} on {state['device']} ({state['dtype']}) was loaded in {state['load_s']:.2f} s "
        f"by pid {state['pid']}",
        file=log,
    )
