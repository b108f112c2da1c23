"""Where a template's workers run: Snakemake's own Python, or the software environment the template
names, as a Snakemake rule names its own.

A template's config entry may name one of:
- `python:` the interpreter of an existing environment (a venv's `bin/python`, say);
- `conda:` an environment file, made and cached by Snakemake's own conda support (as for a rule's
  `conda:`, with --conda-prefix and --conda-frontend), or the folder of an existing environment;
- `container:` an image that the worker runs in (apptainer), as for a rule's `container:`.
A sticky rule's own `conda:` or `container:` names the template's environment when the template
names none. As for Snakemake's rules, `conda:` and `container:` count only where the run's
--software-deployment-method includes conda or apptainer; `python:` always counts.

Users keep Snakemake in a small environment and torch, vLLM and CUDA in another. The workers import
Dask, this plugin and the template's own imports from the template's environment, so that one must
hold the versions of this run: `probe` checks it before any worker starts and says how to fix it.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Optional

from snakemake_interface_common.exceptions import WorkflowError

from ..environment import Environment, container_digest, file_digest, interpreter_digest
from ..wire import PACKAGE

# What a worker's environment must share with the Snakemake process: the engine's protocol and this
# package's code (the same versions), and the pickles between the two (the same major versions).
SHARED = ("dask", "distributed", "cloudpickle", "msgpack", PACKAGE)
SAME_MAJOR = ("cloudpickle", "msgpack")
PROBE_TIMEOUT_S = 300.0  # the first start of a fresh environment's Python (or a container) is slow
PROBE_MARK = "sticky-environment-probe:"


def versions(names: tuple[str, ...]) -> dict[str, Optional[str]]:
    """This Python's version and executable, and the installed versions of `names` (None where
    missing). Self-contained: its source is what the environment's Python runs (PROBE)."""
    import importlib.metadata
    import platform
    import sys

    found: dict[str, Optional[str]] = {"python": platform.python_version(), "executable": sys.executable}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# The same function, run by the environment's Python: the two sides are read by one piece of code.
PROBE = (
    "from typing import Optional\n"
    + inspect.getsource(versions)
    + f"\nimport json\nprint({PROBE_MARK!r} + json.dumps(versions({SHARED!r})))\n"
)


def rule_environment(job: Any, deployment: frozenset[str]) -> Optional[Environment]:
    """The environment a sticky job's rule names (`conda:` or `container:`), where the run's
    deployment method counts it, as Snakemake counts it for any rule; None otherwise."""
    rule = f"rule '{job.rule.name}'"
    if "conda" in deployment and getattr(job, "conda_env_spec", None):
        env = job.conda_env
        file = getattr(env, "file", None)
        if file is not None:
            path = Path(file.get_path_or_uri())
            return Environment("conda", str(path), f"{rule}, conda:", file_digest(path))
        if getattr(env, "name", None):
            raise WorkflowError(
                f"Rule '{job.rule.name}' is sticky and names the conda environment '{env.name}' by name: "
                "give its folder (conda: /path/to/env) or an environment file, so that its workers can run there."
            )
        folder = Path(env.address)
        return Environment("conda", str(folder), f"{rule}, conda:", interpreter_digest(folder / "bin" / "python"))
    if "apptainer" in deployment and getattr(job, "container_img_url", None):
        image = job.container_img_url
        return Environment("container", image, f"{rule}, container:", container_digest(image, Path.cwd()))
    return None


def uncounted_environment(job: Any, deployment: frozenset[str]) -> Optional[str]:
    """What to say of a sticky rule's `conda:` or `container:` that the run's deployment method
    does not count (Snakemake ignores it for every rule then): never ignored silently."""
    for directive, method, named in (
        ("conda", "conda", getattr(job, "conda_env_spec", None)),
        ("container", "apptainer", getattr(job, "container_img_url", None)),
    ):
        if named and method not in deployment:
            return (
                f"Sticky rule '{job.rule.name}': its {directive}: is not used, as --software-deployment-method "
                f"does not include {method}; its template's workers run where the template says."
            )
    return None


def deployment_of(workflow: Any) -> frozenset[str]:
    """The run's --software-deployment-method, as lower-case names."""
    methods = workflow.deployment_settings.deployment_method or ()
    return frozenset(str(getattr(m, "name", m)).lower() for m in methods)


def launch_command(env: Environment, template: str, workflow: Any, dag: Any, log: Any) -> tuple[str, ...]:
    """How to start Python in the environment: an interpreter path, or apptainer and its image.
    A conda environment file is made here by Snakemake's conda support (cached in --conda-prefix);
    an environment that the run's deployment method does not count gives () (Snakemake's Python),
    and says so."""
    deployment = deployment_of(workflow)
    where = f"Sticky template '{template}': its {env.describe()}"
    if env.kind == "python":
        return (env.value,)
    if env.kind == "conda":
        if "conda" not in deployment:
            log.info(
                f"{where} is not used: --software-deployment-method does not include conda, so the "
                "template's workers run in Snakemake's own Python, as Snakemake's rules do."
            )
            return ()
        if Path(env.value).is_dir():
            return (str(Path(env.value) / "bin" / "python"),)
        return (str(Path(create_conda_env(env, where, workflow)) / "bin" / "python"),)
    if "apptainer" not in deployment:
        log.info(
            f"{where} is not used: --software-deployment-method does not include apptainer, so the "
            "template's workers run in Snakemake's own Python, as Snakemake's rules do."
        )
        return ()
    return container_command(env, where, workflow, dag)


def create_conda_env(env: Environment, where: str, workflow: Any) -> str:
    """Make the environment through Snakemake's conda support (or find it made): its folder."""
    from snakemake.deployment.conda import CondaEnvFileSpec

    try:
        conda_env = CondaEnvFileSpec(env.value).get_conda_env(workflow)
        conda_env.create(workflow.dryrun)
        return conda_env.address
    except Exception as e:
        raise WorkflowError(f"{where} could not be made by Snakemake's conda support: {e}") from e


def container_command(env: Environment, where: str, workflow: Any, dag: Any) -> tuple[str, ...]:
    """apptainer exec of the image (pulled by Snakemake's container support), with the run's
    --apptainer-args, GPUs passed through (--nv), the working directory bound, and its Python."""
    from snakemake.deployment.singularity import Image

    try:
        image = dag.container_imgs.get(env.value) or Image(env.value, dag, is_containerized=False)
        image.pull(workflow.dryrun)
        path = image.path
    except Exception as e:
        raise WorkflowError(f"{where} could not be pulled by Snakemake's container support: {e}") from e
    args = shlex.split(workflow.deployment_settings.apptainer_args or "")
    return ("apptainer", "exec", "--nv", *args, "--bind", os.getcwd(), "--pwd", os.getcwd(), path, "python")


def probe(env: Environment, command: tuple[str, ...], template: str) -> dict[str, Any]:
    """Run the environment's Python once and check that it can hold the template's workers: the
    same Python minor version, Dask, pickles and plugin as this run. WorkflowError otherwise,
    naming the environment and the versions, and saying how to fix it."""
    where = f"Sticky template '{template}': its {env.describe()}"
    try:
        done = subprocess.run(
            [*command, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WorkflowError(f"{where} could not run {shlex.join(command)}: {e}") from None
    line = next((x for x in done.stdout.splitlines() if x.startswith(PROBE_MARK)), None)
    if done.returncode != 0 or line is None:
        raise WorkflowError(
            f"{where}: {shlex.join(command)} failed (exit status {done.returncode}):\n{done.stderr.strip()[-2000:]}"
        )
    there = json.loads(line[len(PROBE_MARK) :])
    ours = versions(SHARED)
    problems = []
    if there["python"].split(".")[:2] != str(ours["python"]).split(".")[:2]:
        problems.append(f"Python {there['python']} there, {ours['python']} here (the minor versions must agree)")
    for name in SHARED:
        found, wanted = there.get(name), ours[name]
        if name in SAME_MAJOR and found and wanted and found.split(".")[0] == wanted.split(".")[0]:
            continue
        if found != wanted:
            problems.append(f"{name} {found or 'missing'} there, {wanted} here")
    if problems:
        listed = "\n  - ".join(problems)
        hint = install_hint(env, command, ours)
        raise WorkflowError(f"{where} cannot hold its workers ({there['executable']}):\n  - {listed}\n{hint}")
    return there


def install_hint(env: Environment, command: tuple[str, ...], ours: dict[str, Optional[str]]) -> str:
    """How to give the environment this run's versions."""
    pins = [f"{name}=={ours[name]}" for name in SHARED if ours[name]]
    source = checkout()
    if source is not None:  # this plugin from a checkout: install that checkout there
        pins = [p for p in pins if not p.startswith(PACKAGE)] + [source]
    if env.kind == "container":  # an image is read-only: it is built again
        return f"Build the image {env.value} again with: pip install {shlex.join(pins)}"
    text = f"Install them there: {shlex.join([*command, '-m', 'pip', 'install', *pins])}"
    if env.kind == "conda" and not Path(env.value).is_dir():
        lines = "\n".join(f"      - {p}" for p in pins)
        python = str(ours["python"]).rsplit(".", 1)[0]
        text += f"\nor add to {env.value}, under dependencies:\n  - python={python}\n  - pip\n  - pip:\n{lines}"
    return text


def checkout() -> Optional[str]:
    """The folder of this plugin's source checkout, where it is installed from one (editable)."""
    import importlib.metadata

    try:
        direct = importlib.metadata.distribution(PACKAGE).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    url = json.loads(direct).get("url", "") if direct else ""
    return url[len("file://") :] if url.startswith("file://") else None
