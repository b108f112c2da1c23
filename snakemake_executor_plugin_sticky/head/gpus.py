"""The GPU plan of a machine's local workers: which GPU ids each worker gets, pinned with
CUDA_VISIBLE_DEVICES before it imports anything of its template."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Optional

from snakemake_interface_common.exceptions import WorkflowError

from ..templates import TemplateSpec


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [g.strip() for g in declared.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


class GpuPlan:
    """Hands out GPU ids to workers, template after template, sharing only when asked for more,
    and takes them back from a retired pool."""

    def __init__(self, gpus: list[str], log: Any):
        self.gpus = gpus
        self.log = log
        self._users = {gpu: 0 for gpu in gpus}  # workers pinned to each GPU
        self._warned: set[str] = set()

    def worker_count(self, template: TemplateSpec, default_workers: Optional[int]) -> int:
        """How many workers the template gets; WorkflowError when more GPUs are asked for than visible."""
        workers = template.workers or default_workers
        if workers is None:
            workers = max(1, len(self.gpus) // template.gpus) if template.gpus else 1
        needed = workers * template.gpus
        if needed > len(self.gpus):
            raise WorkflowError(
                f"Sticky template '{template.name}' asks for {workers} worker(s) x {template.gpus} "
                f"GPU(s), but {len(self.gpus)} GPU(s) are visible here "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
                f"Lower 'gpus:' or the number of workers, or run where the GPUs are."
            )
        return workers

    def take(self, template: TemplateSpec) -> list[str]:
        """The GPU ids of the template's next worker: the least used ones."""
        if not template.gpus:
            return []
        least_used = sorted(self.gpus, key=lambda gpu: (self._users[gpu], self.gpus.index(gpu)))
        taken = sorted(least_used[: template.gpus], key=self.gpus.index)
        if any(self._users[gpu] for gpu in taken) and template.name not in self._warned:
            self._warned.add(template.name)
            self.log.warning(
                f"Sticky template '{template.name}' shares GPUs with other templates: more GPUs "
                f"are asked for in total than the {len(self.gpus)} visible."
            )
        for gpu in taken:
            self._users[gpu] += 1
        return taken

    def release(self, gpus: list[str]) -> None:
        """A retired worker's GPU ids go back to the plan."""
        for gpu in gpus:
            self._users[gpu] -= 1
