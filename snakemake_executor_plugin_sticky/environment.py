"""A template's own software environment as its config entry names it (`python:`, `conda:`,
`container:`): which one, and what its identity covers. Both sides use it: the template's
identity includes it. Making, probing and launching the environment is the head's
(head/environments.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from snakemake_interface_common.exceptions import WorkflowError

ENVIRONMENT_KEYS = ("python", "conda", "container")


@dataclass(frozen=True)
class Environment:
    """A template's software environment as declared: which kind, the value as written (resolved
    to a path for files), where it was named (for messages), and what its identity covers."""

    kind: str  # "python", "conda" or "container"
    value: str
    origin: str
    digest: str

    def describe(self) -> str:
        """How messages name it: kind, value, and where it was named."""
        return f"{self.kind} environment {self.value} ({self.origin})"


def parse_environment(entry: Mapping[str, Any], where: str, config_path: str, workdir: Path) -> Optional[Environment]:
    """The environment a template's config entry (at `config_path`, such as "sticky: llm:") names,
    or None; WorkflowError naming the template and the key."""
    named = [key for key in ENVIRONMENT_KEYS if entry.get(key)]
    if len(named) > 1:
        raise WorkflowError(f"{where} names {' and '.join(map(repr, named))}: a template runs in one environment.")
    if not named:
        return None
    kind = named[0]
    value = entry[kind]
    origin = f"config '{config_path} {kind}:'"
    if not isinstance(value, str):
        raise WorkflowError(f"{where}: '{kind}' must be a path or an image name, got {value!r}.")
    if kind == "container":
        return Environment(kind, value, origin, container_digest(value, workdir))
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = workdir / path
    if kind == "python":
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise WorkflowError(
                f"{where}: 'python: {value}' is not an executable file (paths are relative to the working "
                f"directory {workdir}). Name an environment's interpreter, e.g. /path/to/venv/bin/python."
            )
        return Environment(kind, str(path), origin, interpreter_digest(path))
    if path.is_dir():
        interpreter = path / "bin" / "python"
        if not interpreter.is_file():
            raise WorkflowError(f"{where}: 'conda: {value}' is a folder without bin/python: not an environment.")
        return Environment(kind, str(path), origin, interpreter_digest(interpreter))
    if not path.is_file():
        raise WorkflowError(
            f"{where}: conda environment file '{value}' does not exist (paths are relative to the working "
            f"directory {workdir})."
        )
    return Environment(kind, str(path), origin, file_digest(path))


def file_digest(path: Path) -> str:
    """An environment file's content: a changed file is another environment (as for Snakemake)."""
    return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()


def interpreter_digest(interpreter: Path) -> str:
    """An existing environment: the interpreter, and when its packages last changed. Installing or
    removing a package changes its site-packages folder, so the template gets a new identity."""
    prefix = interpreter.parent.parent
    stamps = [str(interpreter.resolve())]
    for folder in sorted(prefix.glob("lib/python*/site-packages")):
        stamps.append(f"{folder}:{folder.stat().st_mtime_ns}")
    return "python:" + hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def container_digest(image: str, workdir: Path) -> str:
    """An image: its name, and for a local image file its size and modification time."""
    local = Path(image) if Path(image).is_absolute() else workdir / image
    stamp = f"{local.stat().st_size}:{local.stat().st_mtime_ns}" if local.is_file() else ""
    return "container:" + hashlib.sha256(f"{image}\n{stamp}".encode()).hexdigest()
