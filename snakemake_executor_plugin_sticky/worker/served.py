"""What a template serves through its workers' OpenAI-compatible endpoint: its setup file's
`serve(state)`, read once per state and checked, with every function behind a Batcher.

A template declares it in a few lines:

    def serve(state):
        return {"model": "claim-verifier", "chat": state["answer_chats"]}

`chat`, `completions` and `embeddings` are batch functions: a list of requests (the JSON bodies
of `/v1/chat/completions` or `/v1/completions`, one per answer wanted; for embeddings, the input
strings) to a list of answers, one per request, in order. An answer is a string, or a dict with
`content` and optionally `finish_reason`. Requests of the invocations running side by side meet
in one call: each function runs behind a Batcher (`max_batch`, `max_wait`), or is one already.

An engine that runs its own server (vLLM, SGLang) hands its address on instead:

    def serve(state):
        return {"base_url": state["url"], "api_key": state["key"]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..api.batcher import Batcher

KINDS = ("chat", "completions", "embeddings")
MAX_BATCH = 32
MAX_WAIT_S = 0.05
KEYS = {"model", "base_url", "api_key", "max_batch", "max_wait", *KINDS}


class ServeError(ValueError):
    """A template's serve() returned what the endpoint cannot serve; the message names the template."""


@dataclass
class Served:
    """What one state of the template serves: a model name and its functions, or an address."""

    model: str = ""
    functions: dict[str, Callable[[list[Any]], list[Any]]] = field(default_factory=dict)
    base_url: Optional[str] = None  # an engine's own server: the invocations go there
    api_key: Optional[str] = None


def read_served(template: str, declared: Any) -> Served:
    """The checked declaration of `serve(state)`, each function behind a Batcher."""
    where = f"Sticky template '{template}': serve(state)"
    if not isinstance(declared, dict):
        raise ServeError(f"{where} must return a dict, got {type(declared).__name__}.")
    unknown = sorted(set(declared) - KEYS)
    if unknown:
        raise ServeError(f"{where} returned unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}.")
    if declared.get("base_url") is not None:
        return _address(where, declared)
    model = declared.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError(f"{where} must name its 'model' (a non-empty string) or hand on a 'base_url'.")
    max_batch = declared.get("max_batch", MAX_BATCH)
    max_wait = declared.get("max_wait", MAX_WAIT_S)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ServeError(f"{where}: 'max_batch' must be an integer >= 1, got {max_batch!r}.")
    if not isinstance(max_wait, (int, float)) or isinstance(max_wait, bool) or max_wait < 0:
        raise ServeError(f"{where}: 'max_wait' must be a number of seconds >= 0, got {max_wait!r}.")
    functions = {}
    for kind in KINDS:
        fn = declared.get(kind)
        if fn is None:
            continue
        if not callable(fn):
            raise ServeError(f"{where}: '{kind}' must be a function of a list of requests, got {type(fn).__name__}.")
        functions[kind] = fn if isinstance(fn, Batcher) else Batcher(fn, max_batch=max_batch, max_wait=float(max_wait))
    if not functions:
        raise ServeError(f"{where} serves none of {', '.join(KINDS)}: name at least one function.")
    return Served(model=model, functions=functions)


def _address(where: str, declared: dict[str, Any]) -> Served:
    base_url, api_key = declared["base_url"], declared.get("api_key")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ServeError(f"{where}: 'base_url' must be an http(s) URL, got {base_url!r}.")
    if api_key is not None and not isinstance(api_key, str):
        raise ServeError(f"{where}: 'api_key' must be a string, got {type(api_key).__name__}.")
    others = sorted(k for k in declared if k not in ("base_url", "api_key"))
    if others:
        raise ServeError(f"{where} hands on a 'base_url': its server serves; drop {', '.join(others)}.")
    return Served(base_url=base_url.rstrip("/"), api_key=api_key)
