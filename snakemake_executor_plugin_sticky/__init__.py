"""snakemake-executor-plugin-sticky: run `script:` invocations inside resident workers that
built their template's state (a loaded model) once.

Snakemake looks up `Executor`, `ExecutorSettings` and `common_settings` here. Scripts import
`sticky_state`, templates `Batcher` and `stage`, Snakefiles `sticky_identity`; the executor (and
Dask) load only when Snakemake asks for `Executor`, so a script under another executor pays
nothing for them.
"""

from typing import Any

from .api.batcher import Batcher
from .api.identity import sticky_identity
from .api.stage import stage
from .api.state import sticky_state
from .head.dryrun import StickyCommonSettings
from .settings import ExecutorSettings

__all__ = ["Batcher", "Executor", "ExecutorSettings", "common_settings", "stage", "sticky_identity", "sticky_state"]

# Same as Snakemake's local executor: jobs run on this machine with its file system, and jobs
# that are not sticky are handed to the local executor itself. A dry run checks the sticky
# declarations as the real run does (dryrun.py).
common_settings = StickyCommonSettings(
    non_local_exec=False,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_envvar_declarations_to_cmd=True,
    auto_deploy_default_storage_provider=False,
)


def __getattr__(name: str) -> Any:
    if name == "Executor":
        from .head.executor import Executor

        return Executor
    raise AttributeError(name)
