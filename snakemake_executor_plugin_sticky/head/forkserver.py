"""Where local worker processes come from: a forkserver started first thing when the executor
starts, while the Snakemake process does the rest of its start on the other core.

Every worker process needs Dask, which takes a good part of a second of CPU to import. The
forkserver imports it once, on a core that is idle at that point, and each worker is then a fork
of it: a worker builds its state a fraction of that time after its start, and N workers cost one
import instead of N (docs/benchmarks.md, "Start-up costs"). The forkserver imports nothing of any
template (so no worker is forked after CUDA was initialised), ignores Ctrl-C, and exits when the
Snakemake process does.

This module stays light: Snakemake imports the plugin (and its settings) whenever it lists
executors.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any, Callable

PRELOAD = [
    "distributed",
    "snakemake_executor_plugin_sticky.worker.plugin",
    "snakemake_executor_plugin_sticky.worker.task",
    "snakemake_executor_plugin_sticky.worker.forkserver_reaper",
]


def available() -> bool:
    """Whether this Python can start processes from a forkserver."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def start_forkserver() -> Callable[[], None]:
    """Start the forkserver unless it runs (idempotent). Its environment gets Dask's
    `distributed.nanny.pre-spawn-environ` (one thread per BLAS, malloc trimming), which a spawning
    Nanny would set in this process before starting each worker; here this process's own
    environment is left as it is, so jobs that are not sticky see the user's. Returns the undo of
    what it changed in multiprocessing (the forkserver itself serves later runs too)."""
    import multiprocessing.forkserver

    undo = skip_snakemake_cli_in_children()
    multiprocessing.set_forkserver_preload(PRELOAD)
    pre_spawn = {k: str(v) for k, v in pre_spawn_environ().items()}
    saved = {k: os.environ.get(k) for k in pre_spawn}
    os.environ.update(pre_spawn)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return undo


def pre_spawn_environ() -> dict[str, Any]:
    """`distributed.nanny.pre-spawn-environ` from Dask's config, without importing distributed
    here (its defaults are registered by that import: read them from its YAML file instead)."""
    import importlib.util

    import dask.config
    import yaml

    key = "distributed.nanny.pre-spawn-environ"
    if dask.config.get(key, default=None) is None:
        spec = importlib.util.find_spec("distributed")
        folder = list(spec.submodule_search_locations or [])[0]
        with open(os.path.join(folder, "distributed.yaml")) as defaults:
            # libyaml's loader where there is one: a tenth of the pure-Python loader's time
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            dask.config.update_defaults(yaml.load(defaults, Loader=loader))
    environ = dict(dask.config.get(key, default=None) or {})
    # A spawning Nanny adds this one too, for hashes that agree across workers.
    if str(environ.get("PYTHONHASHSEED", "0")) in ("None", "0"):
        environ["PYTHONHASHSEED"] = 6640
    # As for Dask's own: a variable the user has set wins over the config's value.
    return {k: os.environ.get(k, str(v)) for k, v in environ.items() if v is not None}


def skip_snakemake_cli_in_children() -> Callable[[], None]:
    """A spawned process (the forkserver too) re-imports its parent's `__main__`. Under the
    `snakemake` console script that is all of snakemake.cli (most of a second of CPU), which no worker
    uses. Only when `__main__` is that script, child processes skip it. Returns the undo."""
    import multiprocessing.spawn

    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None or getattr(main, "__file__", None) is None:
        return lambda: None  # `python -m snakemake`: spawn skips a `__main__` module by name already
    from snakemake.cli import main as snakemake_main

    original = multiprocessing.spawn.get_preparation_data
    if getattr(main, "main", None) is not snakemake_main or getattr(original, "sticky", False):
        return lambda: None

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        return data

    preparation_data.sticky = True  # type: ignore[attr-defined]
    multiprocessing.spawn.get_preparation_data = preparation_data
    return lambda: setattr(multiprocessing.spawn, "get_preparation_data", original)
