"""Reading and writing claims in FEVER's JSONL shape: one object per line with `id`, `claim`,
`evidence` and (when known) `label` in SUPPORTS / REFUTES / NOT ENOUGH INFO."""

from __future__ import annotations

import json
from typing import Any, Iterable

LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


class ClaimsError(ValueError):
    """A claims file line that is not a valid claim; the message names the file and line."""


def read_claims(path: str) -> list[dict[str, Any]]:
    claims = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                claims.append(parse_claim(line, path, lineno))
    return claims


def parse_claim(line: str, path: str, lineno: int) -> dict[str, Any]:
    where = f"{path}, line {lineno}"
    try:
        claim = json.loads(line)
    except json.JSONDecodeError as e:
        raise ClaimsError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(claim, dict):
        raise ClaimsError(f"{where}: expected a JSON object, got {type(claim).__name__}.")
    for key in ("id", "claim"):
        if key not in claim:
            raise ClaimsError(f"{where}: missing '{key}'.")
    if not isinstance(claim["claim"], str) or not claim["claim"].strip():
        raise ClaimsError(f"{where}: 'claim' must be non-empty text.")
    if claim.get("label") not in (None, *LABELS):
        raise ClaimsError(f"{where}: 'label' must be one of {', '.join(LABELS)}, got {claim['label']!r}.")
    return claim


def evidence_text(evidence: Any) -> str:
    """Evidence as prompt text: sentences as given; FEVER's own evidence sets, which hold
    Wikipedia page ids rather than sentences, become their page titles."""
    sentences: list[str] = []

    def collect(item: Any) -> None:
        if isinstance(item, str):
            sentences.append(item.replace("_", " ").replace("-LRB-", "(").replace("-RRB-", ")"))
        elif isinstance(item, (list, tuple)):
            for part in item:
                collect(part)

    collect(evidence)
    return " ".join(dict.fromkeys(sentences)) or "(no evidence)"


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# What an instruct model's answer says, by the words in it: the phrase that comes first decides
# ("does not support" before "support", "incorrect" before "correct").
VERDICT_PHRASES = {
    "NOT ENOUGH INFO": ("not enough", "insufficient", "cannot be determined", "can't be determined", "unknown"),
    "REFUTES": ("refute", "not support", "n't support", "false", "incorrect", "contradict"),
    "SUPPORTS": ("support", "true", "correct", "confirm"),
}


def verdict_of(answer: str) -> tuple[str, bool]:
    """The verdict an answer gives and whether it gave one: the label whose phrase comes first in
    it (case aside); an answer with none of them is NOT ENOUGH INFO, not parsed."""
    text = answer.lower()
    found = [(text.find(p), label) for label, phrases in VERDICT_PHRASES.items() for p in phrases if p in text]
    if not found:
        return "NOT ENOUGH INFO", False
    return min(found)[1], True
