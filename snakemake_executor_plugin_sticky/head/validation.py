"""Checks of the --sticky-* settings before anything starts: a value that cannot work is refused
with the flag named (the settings' help texts live in settings.py)."""

from __future__ import annotations

from snakemake_interface_common.exceptions import WorkflowError

from ..settings import CLUSTERS, ExecutorSettings


def check_settings(settings: ExecutorSettings) -> None:
    """Every --sticky-* value that cannot work, refused before anything starts, naming the flag."""
    if settings.cluster not in CLUSTERS:
        raise WorkflowError(f"--sticky-cluster must be one of {', '.join(CLUSTERS)}, got {settings.cluster!r}.")
    if settings.scheduler and settings.cluster != "local":
        raise WorkflowError(
            "--sticky-scheduler (attach to your own workers) and --sticky-cluster "
            f"{settings.cluster} (start batch-job workers) exclude each other; give one."
        )
    if settings.max_workers < 1:
        raise WorkflowError(f"--sticky-max-workers must be at least 1, got {settings.max_workers}.")
    if settings.idle_timeout < 0:
        raise WorkflowError(f"--sticky-idle-timeout must not be negative, got {settings.idle_timeout}.")
    if settings.job_cores is not None and settings.job_cores < 1:
        raise WorkflowError(f"--sticky-job-cores must be at least 1, got {settings.job_cores}.")
    if settings.workers is not None and settings.workers < 1:
        raise WorkflowError(f"--sticky-workers must be at least 1, got {settings.workers}.")
    if settings.setup_attempts < 1:
        raise WorkflowError(f"--sticky-setup-attempts must be at least 1, got {settings.setup_attempts}.")
    if settings.max_worker_losses < 0:
        raise WorkflowError(f"--sticky-max-worker-losses must not be negative, got {settings.max_worker_losses}.")
    if settings.invocation_crashes < 1:
        raise WorkflowError(f"--sticky-invocation-crashes must be at least 1, got {settings.invocation_crashes}.")
    if settings.invocation_timeout is not None and settings.invocation_timeout <= 0:
        raise WorkflowError(f"--sticky-invocation-timeout must be positive, got {settings.invocation_timeout}.")
    if settings.preempt_grace < 0:
        raise WorkflowError(f"--sticky-preempt-grace must not be negative, got {settings.preempt_grace}.")
    if settings.teardown_grace < 0:
        raise WorkflowError(f"--sticky-teardown-grace must not be negative, got {settings.teardown_grace}.")
    if settings.stage_readers < 1:
        raise WorkflowError(f"--sticky-stage-readers must be at least 1, got {settings.stage_readers}.")
    if settings.cache_size is not None:
        from dask.utils import parse_bytes

        try:
            parse_bytes(settings.cache_size)
        except (ValueError, TypeError) as e:
            raise WorkflowError(
                f"--sticky-cache-size {settings.cache_size!r} is not a size such as 200GB ({e})."
            ) from e
    if settings.cache_dir and not settings.cache_dir.startswith(("/", "~", "$")):
        raise WorkflowError(
            f"--sticky-cache-dir {settings.cache_dir!r} is not absolute: stage() copies must be node-local, and a "
            "relative folder is one folder in the shared working directory for every node. Give an absolute "
            "node-local folder (/local/scratch/$USER), or '$TMPDIR' where the jobs have one."
        )
    if settings.status_interval < 0:
        raise WorkflowError(f"--sticky-status-interval must not be negative, got {settings.status_interval}.")
    if settings.setup_retry_delay < 0:
        raise WorkflowError(f"--sticky-setup-retry-delay must not be negative, got {settings.setup_retry_delay}.")
