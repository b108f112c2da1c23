"""Collect all verdicts: counts per label, accuracy against gold labels, confusion matrix; and the
answer the model gave through its endpoint (the `ask` step)."""

import json

from claimio import LABELS


def asked_answer(path):
    """The endpoint's answer to the `ask` step's question, or why there is none."""
    with open(path, encoding="utf-8") as f:
        asked = json.load(f)
    return asked["choices"][0]["message"]["content"] if "choices" in asked else asked.get("skipped")


verdicts = []
for path in snakemake.input.verdicts:
    with open(path, encoding="utf-8") as f:
        verdicts.extend(json.loads(line) for line in f if line.strip())

labelled = [v for v in verdicts if v.get("label") in LABELS]
confusion = {gold: {pred: 0 for pred in LABELS} for gold in LABELS}
for v in labelled:
    confusion[v["label"]][v["predicted"]] += 1
correct = sum(confusion[label][label] for label in LABELS)
note = (
    "The model has random weights (built locally with a fixed seed): these numbers show the "
    "pipeline works, not that claims were verified. Point config `model` at a real model."
    if snakemake.params.random_weights
    else "Verdicts of the model named above."
)
summary = {
    "claims": len(verdicts),
    "labelled": len(labelled),
    "model": snakemake.params.model,
    "predicted": {label: sum(v["predicted"] == label for v in verdicts) for label in LABELS},
    "gold": {label: sum(v.get("label") == label for v in verdicts) for label in LABELS},
    "accuracy": round(correct / len(labelled), 4) if labelled else None,
    "confusion": confusion,
    "note": note,
    "asked": asked_answer(snakemake.input.asked),
}
with open(snakemake.output.json, "w") as f:
    json.dump(summary, f, indent=2)

lines = [
    "# Claim verification summary",
    "",
    f"- claims: {summary['claims']} ({summary['labelled']} with gold labels)",
    f"- model: `{summary['model']}`",
    f"- accuracy: {summary['accuracy']}",
    f"- asked through the endpoint (`ask`): {summary['asked']}",
    "",
    f"> {note}",
    "",
    "| gold \\ predicted | " + " | ".join(LABELS) + " |",
    "|---|" + "---|" * len(LABELS),
]
lines += [f"| {gold} | " + " | ".join(str(confusion[gold][p]) for p in LABELS) + " |" for gold in LABELS]
with open(snakemake.output.md, "w") as f:
    f.write("\n".join(lines) + "\n")
