"""Sticky declarations: which template each job of the DAG uses, checked against its rule and
the config before any job runs. It reads jobs and templates and starts nothing, so it can be
tested without a run."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from .invocation import local_script_path
from .templates import CONFIG_SECTION, RESOURCE, TemplateSpec


class Declarations:
    """The templates of the config, and the checked declaration of every sticky rule."""

    def __init__(self, templates: dict[str, TemplateSpec]):
        self.templates = templates
        self._checked: dict[tuple[str, str], TemplateSpec] = {}
        self._scripts: dict[str, str] = {}

    def templates_of(self, jobs: Iterable[JobExecutorInterface]) -> tuple[dict[str, TemplateSpec], dict[str, int]]:
        """Check every job; the templates they use, and how many jobs each has."""
        used: dict[str, TemplateSpec] = {}
        counts: dict[str, int] = {}
        for job in jobs:
            template = self.template_for(job)
            if template is not None:
                used[template.name] = template
                counts[template.name] = counts.get(template.name, 0) + 1
        return used, counts

    def template_for(self, job: JobExecutorInterface) -> Optional[TemplateSpec]:
        """The job's template, or None for a job that is not sticky; WorkflowError if misdeclared.
        A rule is checked once per template (and per script, when its path has wildcards)."""
        name = job.resources.get(RESOURCE)
        if name is None:
            return None
        checked = self._checked.get((job.rule.name, name))
        if checked is not None and job.rule.name in self._scripts:
            return checked
        template = self.check(job, name)
        self._checked[(job.rule.name, name)] = template
        return template

    def script_of(self, job: JobExecutorInterface) -> str:
        """The job's script path, resolved once per rule unless it has wildcards or params."""
        cached = self._scripts.get(job.rule.name)
        return cached if cached is not None else local_script_path(job)

    def check(self, job: JobExecutorInterface, name: Any) -> TemplateSpec:
        """The template a sticky job names, or WorkflowError naming the rule and what is wrong."""
        rule = f"Rule '{job.rule.name}'"
        if not isinstance(name, str) or not name:
            raise WorkflowError(f"{rule}: resources: {RESOURCE}= must name a template, got {name!r}.")
        if name not in self.templates:
            defined = ", ".join(sorted(self.templates)) or "none"
            raise WorkflowError(
                f"{rule} asks for sticky template '{name}', which is not defined under "
                f"'{CONFIG_SECTION}:' in the workflow config (defined: {defined}). Define it there "
                f'or fix the rule\'s resources: {RESOURCE}="...".'
            )
        if not job.is_script:
            raise WorkflowError(
                f"{rule} is sticky (template '{name}') but its body is {body_kind(job)}. Sticky "
                f'invocations run a Python script inside the worker: use script: "scripts/<name>.py".'
            )
        script = local_script_path(job)
        if "{" not in str(job.rule.script):
            self._scripts[job.rule.name] = script
        if not script.endswith(".py"):
            raise WorkflowError(
                f"{rule} is sticky (template '{name}') but its script '{job.rule.script}' is not a "
                f"Python file; only .py scripts can run inside a resident worker."
            )
        if job.is_shadow:
            raise WorkflowError(f"{rule} is sticky (template '{name}'): shadow rules cannot run in a resident worker.")
        if job.benchmark is not None:
            raise WorkflowError(f"{rule} is sticky (template '{name}'): benchmark: is not supported for sticky rules.")
        return self.templates[name]


def ready_templates(used: dict[str, TemplateSpec], ready_jobs: Iterable[JobExecutorInterface]) -> list[TemplateSpec]:
    """Templates with an invocation that can run at once: their workers start right away. The
    others start with their first invocation, once the jobs upstream of it are done, as a
    template's setup may read what those jobs write (a model built by the workflow, say)."""
    names = {job.resources.get(RESOURCE) for job in ready_jobs}
    return [template for name, template in used.items() if name in names]


def is_sticky(job: JobExecutorInterface) -> bool:
    """Whether the job runs as an invocation (groups never do: they are refused when sticky)."""
    return not job.is_group() and job.resources.get(RESOURCE) is not None


def sticky_rules_in_group(job: JobExecutorInterface) -> list[str]:
    """The sticky rules of a group job (which cannot run in a group)."""
    return [j.rule.name for j in job if j.resources.get(RESOURCE) is not None]


def body_kind(job: JobExecutorInterface) -> str:
    """How a rule's body is written, for a message that says why it cannot be sticky."""
    for kind in ("shell", "notebook", "wrapper", "cwl", "template_engine", "norun"):
        if getattr(job, f"is_{kind}", False):
            return {"norun": "empty (no run/shell/script)"}.get(kind, f"{kind}:")
    return "run:"
