"""Turn a Snakemake job into the small picklable invocation a worker runs (wire.Invocation).

The invocation carries exactly what Snakemake's own `script:` preamble would give the script: a
`snakemake.iocontainers.Snakemake` object, plus the script's resolved path; a `shell:` job's
carries its command, formatted here. Nothing of the workflow (rules, DAG, run functions)
travels, so a worker needs no Snakefile.
"""

from __future__ import annotations

import os
import secrets
import shlex
import uuid
from typing import Any, Optional

from snakemake.iocontainers import Namedlist, Params, Snakemake
from snakemake.sourcecache import LocalSourceFile
from snakemake_interface_common.exceptions import WorkflowError

from ..templates import TemplateSpec
from ..wire import Invocation, ShellCommand


class InvocationCrashedWorkers(RuntimeError):
    """The invocation was running on a worker each time one died, as many times as allowed."""

    def __init__(self, workers: list[str]):
        super().__init__(f"it was running on {len(workers)} worker(s) that died")
        self.workers = workers  # addresses, in the order they died


def local_script_path(job: Any) -> str:
    """The job's `script:` as an absolute local path (wildcards and params expanded)."""
    source = job._path_to_source_file(job.rule.script)
    if not isinstance(source, LocalSourceFile):
        raise WorkflowError(
            f"Rule '{job.rule.name}': sticky invocations run a local Python script, but "
            f"script '{job.rule.script}' is not a local file."
        )
    return os.path.abspath(source.get_path_or_uri(secret_free=True))


def invocation_timeout(resources: Any, default_s: Optional[float]) -> Optional[float]:
    """Seconds an invocation may run: the rule's `runtime` resource (minutes) if it has one."""
    runtime_min = resources.get("runtime")
    if isinstance(runtime_min, (int, float)) and not isinstance(runtime_min, bool):
        return float(runtime_min) * 60
    return default_s


def build_invocation(
    job: Any, template: TemplateSpec, script: str, config: dict[str, Any], default_timeout_s: Optional[float] = None
) -> Invocation:
    """The invocation of a Snakemake job, with the `snakemake` object Snakemake's script preamble would give."""
    snakemake = script_object(job, config, os.path.dirname(script) if script else rule_folder(job.rule) or "")
    return Invocation(
        key=f"sticky-{job.rule.name}-{job.jobid}-{uuid.uuid4().hex[:8]}",
        template=template.name,
        identity=template.identity,
        tag=template.tag,
        rule=job.rule.name,
        jobid=job.jobid,
        script=script,
        snakemake=snakemake,
        timeout_s=invocation_timeout(job.resources, default_timeout_s),
        basedir=rule_folder(job.rule),
        shell=shell_command(job) if not script else None,
    )


def shell_command(job: Any) -> ShellCommand:
    """A `shell:` job's command as Snakemake's `shell()` would run it: formatted with the job's
    namespace and the workflow's globals, with the shell's prefix (bash's strict mode, or the
    Snakefile's `shell.prefix`), its suffix and its executable (the `shell_exec` resource). The
    outputs' and logs' paths stay tokens, which the worker fills in (fenced runs write elsewhere)."""
    from snakemake.shell import shell

    nonce = secrets.token_hex(4)
    tokens: dict[str, tuple[str, int]] = {}
    quoted: dict[str, str] = {}
    lists = {}
    for kind in ("output", "log"):
        named = getattr(job, kind)
        made = [f"@sticky-{nonce}-{kind}-{index}@" for index in range(len(named))]
        tokens.update({token: (kind, index) for index, token in enumerate(made)})
        stand_in = iter(made)
        lists[kind] = Namedlist(toclone=named, custom_map=lambda _: next(stand_in))

    def quote(text: str) -> str:  # a quoted field with a path in it is quoted by the worker
        if not any(token in text for token in tokens):
            return shlex.quote(text)
        token = f"@sticky-{nonce}-quoted-{len(quoted)}@"
        quoted[token] = text
        return token

    command = job.format_wildcards(job.rule.shellcmd, quote_func=quote, **lists)
    executable = job.resources.get("shell_exec") or shell.get_executable()
    command = " ".join((shell._get_process_prefix(executable), command, shell._process_suffix)).strip()
    return ShellCommand(command=command, executable=executable, tokens=tokens, quoted=quoted)


# Libraries whose params Snakemake's `snakemake` object stores converted (Snakemake._safely_store_params).
PARAM_LIBRARIES = ("pandas", "numpy", "polars")


def script_object(job: Any, config: dict[str, Any], scriptdir: str) -> Snakemake:
    """The `snakemake` object of a job, as Snakemake's constructor builds it. That constructor
    imports pandas, numpy and polars for every job to convert params of their types, and an import
    that fails searches sys.path anew each time: in Snakemake's scheduler thread, once per
    invocation. A param can only be of those types when its library is loaded, so where no param
    is, the object gets the same fields without the imports."""
    params = job.params
    if any(type(value).__module__.split(".")[0] in PARAM_LIBRARIES for value in params):
        return Snakemake(
            job.input, job.output, params, job.wildcards, job.threads, job.resources, job.log, config,
            job.rule.name, None, scriptdir,
        )  # fmt: skip
    made = Snakemake.__new__(Snakemake)
    made.input = job.input._plainstrings()
    made.output = job.output._plainstrings()
    made._params_store = Params(toclone=list(params))
    made._params_store._take_names(params._get_names())
    made._params_types = {}
    made.wildcards = job.wildcards
    made.threads = job.threads
    made.resources = job.resources
    made.log = job.log._plainstrings()
    made.config = config
    made.rule = job.rule.name
    made.bench_iteration = None
    made.scriptdir = scriptdir
    return made


def rule_folder(rule: Any) -> Optional[str]:
    """The folder of the Snakefile that defines the rule, where it is a local file."""
    basedir = getattr(rule, "basedir", None)
    if isinstance(basedir, LocalSourceFile):
        return os.path.abspath(basedir.get_path_or_uri(secret_free=True))
    return None
