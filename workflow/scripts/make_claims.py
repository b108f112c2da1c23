"""Generate FEVER-shaped claims with gold labels from a small fact table, deterministically."""

import random

from claimio import write_jsonl

# relation -> (evidence sentence, claim phrasings, facts as (subject, object))
FACTS = {
    "capital": (
        "The capital of {s} is {o}.",
        ["{o} is the capital of {s}.", "The capital city of {s} is {o}.", "{s} has {o} as its capital."],
        [
            ("France", "Paris"),
            ("Germany", "Berlin"),
            ("Italy", "Rome"),
            ("Spain", "Madrid"),
            ("Japan", "Tokyo"),
            ("Canada", "Ottawa"),
            ("Australia", "Canberra"),
            ("Brazil", "Brasilia"),
            ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"),
            ("India", "New Delhi"),
            ("Peru", "Lima"),
        ],
    ),
    "author": (
        "{s} was written by {o}.",
        ["{o} wrote {s}.", "{s} is a work by {o}.", "The author of {s} is {o}."],
        [
            ("Pride and Prejudice", "Jane Austen"),
            ("Nineteen Eighty-Four", "George Orwell"),
            ("Hamlet", "William Shakespeare"),
            ("War and Peace", "Leo Tolstoy"),
            ("The Odyssey", "Homer"),
            ("Don Quixote", "Miguel de Cervantes"),
            ("Moby-Dick", "Herman Melville"),
            ("Frankenstein", "Mary Shelley"),
        ],
    ),
    "symbol": (
        "The chemical symbol of {s} is {o}.",
        ["{o} is the chemical symbol for {s}.", "{s} is written {o} in chemistry."],
        [
            ("gold", "Au"),
            ("iron", "Fe"),
            ("sodium", "Na"),
            ("silver", "Ag"),
            ("lead", "Pb"),
            ("potassium", "K"),
            ("tin", "Sn"),
            ("copper", "Cu"),
        ],
    ),
    "born": (
        "{s} was born in {o}.",
        ["{s} was born in the year {o}.", "The birth year of {s} is {o}."],
        [
            ("Marie Curie", "1867"),
            ("Albert Einstein", "1879"),
            ("Ada Lovelace", "1815"),
            ("Isaac Newton", "1643"),
            ("Charles Darwin", "1809"),
            ("Rosalind Franklin", "1920"),
        ],
    ),
    "river": (
        "The {s} flows through {o}.",
        ["The {s} runs through {o}.", "{o} is crossed by the {s}."],
        [
            ("Nile", "Egypt"),
            ("Danube", "Austria"),
            ("Amazon", "Brazil"),
            ("Thames", "England"),
            ("Ganges", "India"),
            ("Mississippi", "the United States"),
        ],
    ),
}


def make_claim(rng: random.Random, claim_id: int) -> dict:
    relation = rng.choice(sorted(FACTS))
    evidence_form, phrasings, facts = FACTS[relation]
    subject, obj = rng.choice(facts)
    phrase = rng.choice(phrasings)
    label = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")[claim_id % 3]
    if label == "SUPPORTS":
        claim, evidence = phrase.format(s=subject, o=obj), evidence_form.format(s=subject, o=obj)
    elif label == "REFUTES":
        wrong = rng.choice([o for s, o in facts if o != obj])
        claim, evidence = phrase.format(s=subject, o=wrong), evidence_form.format(s=subject, o=obj)
    else:
        other_relation = rng.choice([r for r in sorted(FACTS) if r != relation])
        other_form, _, other_facts = FACTS[other_relation]
        claim = phrase.format(s=subject, o=obj)
        evidence = other_form.format(s=(pick := rng.choice(other_facts))[0], o=pick[1])
    verifiable = "NOT VERIFIABLE" if label == "NOT ENOUGH INFO" else "VERIFIABLE"
    return {"id": claim_id, "verifiable": verifiable, "label": label, "claim": claim, "evidence": [evidence]}


rng = random.Random(snakemake.params.seed)
write_jsonl(snakemake.output[0], (make_claim(rng, i) for i in range(1, snakemake.params.how_many + 1)))
