"""Sticky declarations: which template each job of the DAG uses, checked against its rule and
the config before any job runs. It reads jobs and templates and starts nothing, so it can be
tested without a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from snakemake.resources import Resource
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from ..templates import CONFIG_SECTION, RESOURCE, TemplateSpec, parse_templates, with_environment
from .environments import deployment_of, rule_environment, uncounted_environment
from .gpus import GpuPlan, visible_gpus
from .invocations import local_script_path
from .validation import check_settings


class Declarations:
    """The templates of the config, and the checked declaration of every sticky rule.

    A sticky rule's own `conda:` or `container:` (where the run's --software-deployment-method
    counts it) names its template's environment when the template names none: `templates` then
    holds the template with that environment. Rules that disagree about it are refused."""

    def __init__(self, templates: dict[str, TemplateSpec], deployment: frozenset[str] = frozenset()):
        self.templates = templates
        self.deployment = deployment
        self._checked: set[tuple[str, str]] = set()
        self._scripts: dict[str, str] = {}
        self.notes: set[str] = set()  # what the run should say of the rules' environments

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
        name = sticky_name(job)
        if name is None:
            return None
        if (job.rule.name, name) in self._checked and job.rule.name in self._scripts:
            return self.templates[name]
        self.check(job, name)
        self._checked.add((job.rule.name, name))
        return self.templates[name]

    def script_of(self, job: JobExecutorInterface) -> str:
        """The job's script path, resolved once per rule unless it has wildcards or params (empty
        for a `shell:` job)."""
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
        if job.is_shell:
            self._scripts[job.rule.name] = ""
        elif not job.is_script:
            raise WorkflowError(
                f"{rule} is sticky (template '{name}') but its body is {body_kind(job)}. Sticky "
                f'invocations run a Python script inside the worker (script: "scripts/<name>.py") or a '
                "shell command as a child of the worker (shell:)."
            )
        else:
            self.check_script(job, name)
        if job.is_shadow:
            raise WorkflowError(f"{rule} is sticky (template '{name}'): shadow rules cannot run in a resident worker.")
        if job.benchmark is not None:
            raise WorkflowError(f"{rule} is sticky (template '{name}'): benchmark: is not supported for sticky rules.")
        self.check_environment(job, name)
        return self.templates[name]

    def check_script(self, job: JobExecutorInterface, name: str) -> None:
        """A sticky script is a local Python file."""
        script = local_script_path(job)
        if "{" not in str(job.rule.script):
            self._scripts[job.rule.name] = script
        if not script.endswith(".py"):
            raise WorkflowError(
                f"Rule '{job.rule.name}' is sticky (template '{name}') but its script '{job.rule.script}' is not a "
                f"Python file; only .py scripts can run inside a resident worker."
            )

    def check_environment(self, job: JobExecutorInterface, name: str) -> None:
        """The rule's own environment becomes the template's, agrees with it, or is refused."""
        note = uncounted_environment(job, self.deployment)
        if note is not None:
            self.notes.add(note)
        env = rule_environment(job, self.deployment)
        if env is None:
            return
        template = self.templates[name]
        if template.environment is None:
            self.templates[name] = with_environment(template, env)
        elif template.environment.digest != env.digest:
            raise WorkflowError(
                f"Rule '{job.rule.name}' names the {env.kind} environment {env.value}, but its sticky template "
                f"'{name}' runs in the {template.environment.kind} environment {template.environment.value}, "
                f"named by {template.environment.origin}. A template's workers run in one environment: name "
                f"the same one in both places, or leave it to the template's config entry ({CONFIG_SECTION}: "
                f"{name}: conda:, container: or python:)."
            )


def refuse_pipe_groups(jobs: Iterable[JobExecutorInterface]) -> None:
    """A sticky job in a pipe or service group (its jobs run at once, joined by a pipe) cannot
    run as an invocation: refused before any worker starts, with the rule named."""
    for job in jobs:
        name = sticky_name(job)
        if name is not None and getattr(job, "pipe_group", None) is not None:
            raise WorkflowError(
                f"Rule '{job.rule.name}' is sticky (template '{name}') but runs in a pipe or service group: "
                "its jobs run at once, joined by pipes, which an invocation inside a worker cannot join. "
                "Write that input or output as a plain file, or make the rule not sticky."
            )


def check_declarations(
    workflow: Any, jobs: Iterable[JobExecutorInterface], settings: Any
) -> tuple["Declarations", dict[str, TemplateSpec], dict[str, int]]:
    """What a run checks before any worker starts, and what a dry run checks too: the settings,
    the config's templates, and every job's declaration. The declarations, the templates used
    and how many jobs each has."""
    check_settings(settings)
    jobs = list(jobs)
    declarations = Declarations(parse_templates(workflow.config, Path.cwd()), deployment_of(workflow))
    refuse_pipe_groups(jobs)
    used, counts = declarations.templates_of(jobs)
    if settings.cluster != "local" and not settings.scheduler:
        from .engines import jobqueue

        jobqueue.check_pools(list(used.values()), settings)
    elif not settings.scheduler:  # local workers: the GPUs they ask for are visible here
        plan = GpuPlan(visible_gpus(), None)
        for template in used.values():
            plan.worker_count(template, settings.workers)
    return declarations, used, counts


def ready_templates(used: dict[str, TemplateSpec], ready_jobs: Iterable[JobExecutorInterface]) -> list[TemplateSpec]:
    """Templates with an invocation that can run at once: their workers start right away. The
    others start with their first invocation, once the jobs upstream of it are done, as a
    template's setup may read what those jobs write (a model built by the workflow, say)."""
    names = {sticky_name(job) for job in ready_jobs}
    return [template for name, template in used.items() if name in names]


def sticky_name(job: JobExecutorInterface) -> Optional[str]:
    """The template a job's rule names in its `sticky` resource. Where the rule gives a plain name
    it is read from the rule: evaluating the job's resources evaluates all of them (sizes of its
    input, its tmpdir), and Snakemake evaluates them anew once the job's input exists, so reading
    them here would double their cost for every job of a large run."""
    rule = getattr(job, "rule", None)
    declared = rule.resources.get(RESOURCE) if rule is not None else None
    if isinstance(declared, Resource) and not declared.is_evaluable():
        value = declared.value
        return None if value is None else str(value)
    return job.resources.get(RESOURCE)


def is_sticky(job: JobExecutorInterface) -> bool:
    """Whether the job runs as an invocation (groups never do: they are refused when sticky)."""
    return not job.is_group() and sticky_name(job) is not None


def sticky_rules_in_group(job: JobExecutorInterface) -> list[str]:
    """The sticky rules of a group job (which cannot run in a group)."""
    return [j.rule.name for j in job if j.resources.get(RESOURCE) is not None]


def body_kind(job: JobExecutorInterface) -> str:
    """How a rule's body is written, for a message that says why it cannot be sticky."""
    for kind in ("notebook", "wrapper", "cwl", "template_engine", "norun"):
        if getattr(job, f"is_{kind}", False):
            return {"norun": "empty (no run/shell/script)"}.get(kind, f"{kind}:")
    return "run:"
