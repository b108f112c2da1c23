"""Template specs: read the workflow config's `sticky:` section, check it before any work, hash it.

A template is the recipe of a resident state: a Python file defining `setup(**kwargs) -> state`
(and optionally `teardown(state)`), the kwargs, and what one worker needs (`gpus`, `slots`).
Its identity hashes all of that, so a changed template never meets state built from an old one.
The setup file is only parsed here, never imported: the Snakemake process must not load models.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Optional

from snakemake_interface_common.exceptions import WorkflowError

from .environment import ENVIRONMENT_KEYS, Environment, parse_environment

CONFIG_SECTION = "sticky"
RESOURCE = "sticky"
TEMPLATE_KEYS = ("setup", "kwargs", "gpus", "slots", "workers", "cluster", *ENVIRONMENT_KEYS)


@dataclass(frozen=True)
class TemplateSpec:
    """One template, resolved and checked; picklable so workers receive it as is."""

    name: str
    setup: Path
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    gpus: int = 0
    slots: int = 1
    workers: Optional[int] = None
    identity: str = ""
    # batch-job pools: each a mapping of cluster settings overriding the --sticky-* ones
    pools: tuple[Mapping[str, Any], ...] = ()
    # the software environment its workers run in (None: Snakemake's own Python), and once the
    # run has resolved it, the command that starts Python there (environments.py)
    environment: Optional[Environment] = None
    launch: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        """The Dask worker resource that routes this template's invocations. It names the
        template only, so workers started by hand can join (attach mode); which state a worker
        holds is decided by the identity its worker plugin carries."""
        return f"sticky-{self.name}"


def template_identity(
    code: bytes, kwargs: Mapping[str, Any], gpus: int, slots: int, environment: Optional[Environment] = None
) -> str:
    """A hash of the setup file's code, its kwargs, gpus, slots and environment: a changed template
    is another, and no state is built from an old environment."""
    canonical = json.dumps(
        {"kwargs": kwargs, "gpus": gpus, "slots": slots, "environment": environment.digest if environment else None},
        sort_keys=True,
        default=repr,
    )
    digest = hashlib.sha256(code)
    digest.update(b"\0")
    digest.update(canonical.encode())
    return digest.hexdigest()


def parse_templates(config: Mapping[str, Any], workdir: Path) -> dict[str, TemplateSpec]:
    """All templates of the config's `sticky:` section; raise WorkflowError naming the culprit."""
    section = config.get(CONFIG_SECTION) if config else None
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise WorkflowError(
            f"The config entry '{CONFIG_SECTION}:' must map template names to their "
            f"settings ({', '.join(TEMPLATE_KEYS)}), not {type(section).__name__}."
        )
    return {str(name): parse_template(str(name), entry, workdir) for name, entry in section.items()}


def parse_template(name: str, entry: Any, workdir: Path) -> TemplateSpec:
    """One template of the config, checked; WorkflowError naming the template and the key."""
    where = f"Sticky template '{name}' (config '{CONFIG_SECTION}: {name}:')"
    if not isinstance(entry, Mapping):
        raise WorkflowError(f"{where} must be a mapping with at least 'setup: path/to/template.py'.")
    unknown = sorted(set(entry) - set(TEMPLATE_KEYS))
    if unknown:
        raise WorkflowError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed are {', '.join(TEMPLATE_KEYS)}."
        )
    if not entry.get("setup"):
        raise WorkflowError(f"{where} needs 'setup:', the path of a Python file defining setup(**kwargs).")
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise WorkflowError(f"{where}: 'kwargs' must be a mapping of setup() arguments.")
    gpus = _count(entry.get("gpus", 0), f"{where}: 'gpus'", minimum=0)
    slots = _count(entry.get("slots", 1), f"{where}: 'slots'", minimum=1)
    workers = entry.get("workers")
    if workers is not None:
        workers = _count(workers, f"{where}: 'workers'", minimum=1)

    pools = parse_pools(entry.get("cluster"), where)

    setup = Path(str(entry["setup"]))
    if not setup.is_absolute():
        setup = workdir / setup
    if not setup.is_file():
        raise WorkflowError(
            f"{where}: setup file '{entry['setup']}' does not exist "
            f"(paths are relative to the working directory {workdir})."
        )
    if setup.suffix != ".py":
        raise WorkflowError(f"{where}: setup file '{entry['setup']}' must be a Python file (.py).")
    code = setup.read_bytes()
    check_setup_source(code, setup, dict(kwargs), where)
    environment = parse_environment(entry, where, f"{CONFIG_SECTION}: {name}:", workdir)
    return TemplateSpec(
        name=name,
        setup=setup.resolve(),
        kwargs=dict(kwargs),
        gpus=gpus,
        slots=slots,
        workers=workers,
        identity=template_identity(code, kwargs, gpus, slots, environment),
        pools=pools,
        environment=environment,
    )


def with_environment(spec: TemplateSpec, environment: Environment) -> TemplateSpec:
    """The template running in an environment that a sticky rule names (its own names none)."""
    code = spec.setup.read_bytes()
    identity = template_identity(code, spec.kwargs, spec.gpus, spec.slots, environment)
    return replace(spec, environment=environment, identity=identity)


def parse_pools(cluster: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    """`cluster:` is one mapping of batch-job settings, or a list of them (one pool each)."""
    if cluster is None:
        return ()
    entries = [cluster] if isinstance(cluster, Mapping) else cluster
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise WorkflowError(
            f"{where}: 'cluster' must be a mapping of batch-job settings (queue, account, walltime, "
            f"memory, cores, job-extra, prologue, python, max-workers), or a list of such mappings, one per pool."
        )
    return tuple(dict(e) for e in entries)


def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WorkflowError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_setup_source(code: bytes, path: Path, kwargs: dict[str, Any], where: str) -> None:
    """Check that the file defines setup() and that the configured kwargs fit its signature."""
    try:
        tree = ast.parse(code, filename=str(path))
    except SyntaxError as e:
        raise WorkflowError(f"{where}: setup file {path} has a syntax error at line {e.lineno}: {e.msg}.") from None
    setup = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "setup"), None)
    if setup is None:
        raise WorkflowError(f"{where}: setup file {path} defines no top-level function setup(**kwargs) -> state.")
    args = setup.args
    if args.posonlyargs and len(args.defaults) < len(args.posonlyargs) + len(args.args):
        raise WorkflowError(f"{where}: setup() in {path} takes positional-only arguments; make them keyword arguments.")
    named = [a.arg for a in args.args + args.kwonlyargs]
    required = [a.arg for a in args.args[: len(args.args) - len(args.defaults)]]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    missing = [a for a in required if a not in kwargs]
    unknown = [k for k in kwargs if k not in named] if args.kwarg is None else []
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing required argument(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unexpected argument(s) {', '.join(unknown)}")
        raise WorkflowError(
            f"{where}: 'kwargs' do not match setup({', '.join(named)}) in {path}: {'; '.join(problems)}."
        )


def load_template_module(spec: TemplateSpec) -> ModuleType:
    """Import the setup file as a module of its own (in the process that will hold the state).

    The module's name is importable by the processes the template starts with spawn or
    forkserver (vLLM's engine core, a process pool): they unpickle the template's functions by
    that name. A small loader module of that name, in a folder of this user's, is on sys.path.
    """
    module_name = f"sticky_template_{spec.name}_{spec.identity[:12]}".replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    loaders = template_loaders_folder()
    write_loader(loaders / f"{module_name}.py", spec.setup)
    if str(loaders) not in sys.path:
        sys.path.append(str(loaders))
    try:
        return importlib.import_module(module_name)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


LOADER = """# Loads a sticky template under the name its functions carry (snakemake-executor-plugin-sticky).
import importlib.util as _util, sys as _sys
_spec = _util.spec_from_file_location(__name__, {path!r})
_module = _util.module_from_spec(_spec)
_sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
"""


def template_loaders_folder() -> Path:
    """This user's folder of template loaders, on this machine, readable by the user alone."""
    folder = Path(tempfile.gettempdir()) / f"sticky-templates-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user and be private to them (chmod 700).")
    return folder


def write_loader(path: Path, setup: Path) -> None:
    """Write the loader module unless it holds this text already (aside, then renamed)."""
    text = LOADER.format(path=str(setup))
    if path.exists() and path.read_text() == text:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)  # workers starting side by side never read half a loader
