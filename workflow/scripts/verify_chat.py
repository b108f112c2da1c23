"""Verify one shard of claims with an instruct model that answers in words (templates/chat.py):
each claim is asked with its evidence, and the verdict is read from the answer (claimio.verdict_of:
the first of SUPPORTS, REFUTES or NOT ENOUGH INFO named in it; an answer that names none counts
as NOT ENOUGH INFO and as not parsed)."""

import json
import os
import time

from claimio import evidence_text, read_claims, verdict_of

from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
started = time.perf_counter()
claims = read_claims(snakemake.input.claims)
ASK = "Does the evidence support or refute the claim? Answer SUPPORTS, REFUTES or NOT ENOUGH INFO."
questions = [f"Evidence: {evidence_text(c.get('evidence'))}\nClaim: {c['claim']}\n{ASK}" for c in claims]
answers = state["answer"](questions)
seconds = time.perf_counter() - started
with open(snakemake.output[0], "w", encoding="utf-8") as out:
    for claim, (text, tokens) in zip(claims, answers):
        predicted, parsed = verdict_of(text)
        row = {"id": claim["id"], "label": claim.get("label"), "predicted": predicted, "parsed": parsed}
        out.write(json.dumps({**row, "answer": text, "tokens": tokens}) + "\n")

with open(snakemake.log[0], "w") as log:
    print(
        f"verified {len(claims)} claims in {seconds:.3f} s ({sum(t for _, t in answers)} tokens generated) "
        f"in pid {os.getpid()}; model {state['name']} on {state['device']} ({state['dtype']}) was loaded in "
        f"{state['load_s']:.2f} s by pid {state['pid']}",
        file=log,
    )
