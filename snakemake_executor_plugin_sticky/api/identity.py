"""A template's results identity, for a Snakefile's `params:` (runs in the Snakemake process).

Snakemake reruns an output when its code, params, input or software environment change, but a
template's model is none of those: replace the weights in `model_dir` and every verdict made with
the old ones still counts as up to date. `sticky_identity("llm", config)` in a rule's `params:`
puts a short hash of what decides the template's results there, so Snakemake's own params rerun
trigger reruns the template's outputs when it changes:

- the setup file's content and the kwargs;
- the template's software environment (its spec, as its worker identity hashes it);
- the content of the files and folders its kwargs name (a model folder, a GGUF file), and of
  those its workers copied with `stage()` in the latest run (the history): what it stages is
  what the model is. A kwarg naming a folder the workflow writes into (its outputs, its logs)
  would make every run look new: name the model's files. Files are hashed once per version: a cache under
  `.snakemake/sticky/identity-cache.json` keeps each file's hash by path, size and modification
  time, so a workflow whose model did not change pays a `stat` per file;
- the versions of the packages that decide what a model computes (torch, transformers,
  tokenizers, vLLM, SGLang, llama-cpp-python, accelerate, gguf) in Snakemake's Python, for a
  template that runs there.

`gpus`, `slots` and `workers` are not in it: they change how the results are made, not what they
are.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..templates import parse_template
from ..wire import read_history, write_atomically

CACHE = Path(".snakemake") / "sticky" / "identity-cache.json"
PACKAGES = ("torch", "transformers", "tokenizers", "vllm", "sglang", "llama-cpp-python", "accelerate", "gguf")
SHORT = 16  # hex digits: a short, stable hash
CHUNK = 1 << 20


def sticky_identity(template: str, config: Mapping[str, Any]) -> Callable[..., str]:
    """For `params:` of a sticky rule: a function Snakemake calls for each job, which gives the
    template's results identity from the config as the workflow left it."""

    known: dict[str, str] = {}  # by the template's entry: Snakemake asks once per job

    def identity(wildcards: Any = None) -> str:
        entry = json.dumps((config.get("sticky") or {}).get(template), sort_keys=True, default=repr)
        if entry not in known:
            known[entry] = results_identity(template, config, Path.cwd())
        return known[entry]

    identity.__name__ = f"sticky_identity_{template}"
    return identity


def results_identity(name: str, config: Mapping[str, Any], workdir: Path) -> str:
    """The results identity of template `name` of the config's `sticky:` section."""
    spec = parse_template(name, (config.get("sticky") or {}).get(name), workdir)
    cache = FileHashes(workdir / CACHE)
    paths = set(named_paths(spec.kwargs, workdir).values()) | staged_before(name, workdir)
    files = {str(path): cache.content(path) for path in sorted(paths) if path.exists()}
    cache.save()
    described = {
        "setup": hashlib.sha256(spec.setup.read_bytes()).hexdigest(),
        "kwargs": spec.kwargs,
        "environment": spec.environment.digest if spec.environment else None,
        "files": files,
        "packages": {} if spec.environment else package_versions(),
    }
    canonical = json.dumps(described, sort_keys=True, default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:SHORT]


def named_paths(kwargs: Mapping[str, Any], workdir: Path) -> dict[str, Path]:
    """The kwargs (at any depth) whose value is the path of an existing file or folder."""
    found: dict[str, Path] = {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, str) and value and len(value) < 4096:
            path = (Path(value) if os.path.isabs(value) else workdir / value).resolve()
            if path.exists() and path not in (workdir.resolve(), *workdir.resolve().parents):
                found[key] = path
        elif isinstance(value, Mapping):
            for inner, item in value.items():
                visit(f"{key}.{inner}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{key}[{index}]", item)

    for key, value in kwargs.items():
        visit(str(key), value)
    return found


def staged_before(name: str, workdir: Path) -> set[Path]:
    """What the template's workers copied with stage() in the latest run that recorded it
    (.snakemake/sticky/history.jsonl): what its setup reads, though no kwarg names it."""
    for run in reversed(read_history(workdir)):
        staged = run.get("templates", {}).get(name, {}).get("staged")
        if staged:
            return {Path(source) for source in staged}
    return set()


def package_versions() -> dict[str, str]:
    """The installed versions of the packages that decide what a model computes."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class FileHashes:
    """Each file's SHA-256 by path, size and modification time, kept between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.known = {}
        self.changed = False

    def content(self, path: Path) -> str:
        """A hash of a file's content, or of a folder's files (their relative paths and contents)."""
        if path.is_file():
            return self.of_file(path)
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0" + self.of_file(file).encode())
        return digest.hexdigest()

    def of_file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        version = [stat.st_size, stat.st_mtime_ns]
        known = self.known.get(key)
        if known is not None and known[:2] == version:
            return known[2]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        self.known[key] = [*version, digest.hexdigest()]
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        """Write the cache atomically (runs side by side each write a whole one)."""
        if not self.changed:
            return
        write_atomically(self.path, json.dumps(self.known))
        self.changed = False
