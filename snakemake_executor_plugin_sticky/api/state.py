"""`sticky_state(snakemake)`: the one call a script makes to get its template's state.

Inside a resident worker the state is already there (api/resident.py's accessor hands it over). Under any
other executor the script builds it in its own process, as the create-destroy model does, so the
same workflow runs both ways.
"""

from __future__ import annotations

import atexit
import sys
import threading
from pathlib import Path
from typing import Any

from snakemake_interface_common.exceptions import WorkflowError

from ..templates import CONFIG_SECTION, RESOURCE, TemplateSpec, load_template_module, parse_template
from . import resident

_built: dict[str, Any] = {}
_build_lock = threading.Lock()


def template_name(snakemake: Any) -> str:
    """The template the rule's `sticky` resource names; WorkflowError when it names none."""
    name = snakemake.resources.get(RESOURCE) if snakemake.resources else None
    if not isinstance(name, str) or not name:
        raise WorkflowError(
            f"sticky_state() was called from rule '{snakemake.rule}', which declares no "
            f'template: add resources: {RESOURCE}="<template>" to the rule.'
        )
    return name


def sticky_state(snakemake: Any) -> Any:
    """The state of the template named by the rule's `sticky` resource.

    In a sticky worker: the resident state, built once per worker. Elsewhere: built here, once
    per process, and torn down when the process exits.
    """
    name = template_name(snakemake)
    this = resident.current()
    if this is not None and this.template == name:
        return this.state()
    return _build_in_process(name, snakemake.config)


def _build_in_process(name: str, config: Any) -> Any:
    entries = (config or {}).get(CONFIG_SECTION) or {}
    if name not in entries:
        raise WorkflowError(
            f"Sticky template '{name}' is not defined under '{CONFIG_SECTION}:' in the workflow config."
        )
    spec = parse_template(name, entries[name], Path.cwd())
    with _build_lock:
        if spec.identity not in _built:
            try:
                _built[spec.identity] = setup_state(spec)
            except ImportError as e:
                if spec.environment is None:
                    raise
                # The template's environment holds its workers only: here the script's own runs.
                raise WorkflowError(
                    f"Sticky template '{name}' names the {spec.environment.describe()}, in which only the "
                    f"sticky executor's workers run. Here the script runs in {sys.executable}, where setup() "
                    f"failed: {e}. For other executors, give the rule the environment too (conda: or container:)."
                ) from e
            atexit.register(teardown_state, spec, _built[spec.identity])
        return _built[spec.identity]


def setup_state(spec: TemplateSpec) -> Any:
    """Build the template's state in this process."""
    return load_template_module(spec).setup(**spec.kwargs)


def teardown_state(spec: TemplateSpec, state: Any) -> None:
    """Tear the template's state down with its `teardown`, when it has one."""
    teardown = getattr(load_template_module(spec), "teardown", None)
    if teardown is not None:
        teardown(state)
