"""A template in its own software environment: workers start in another Python (a venv made here,
a conda environment, a rule's own conda:), with clear errors for an environment that cannot hold
them, and a template identity that follows the environment.

The environments are venvs made without pip: each sees this checkout's packages through a .pth
file (so none downloads anything), and the "Snakemake environment" of the main test has a finder
that refuses `transformers`, so that environment really lacks it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_sticky.environment import parse_environment
from snakemake_executor_plugin_sticky.templates import parse_template, with_environment

from conftest import RUN_TIMEOUT_S, Workflow, made_once
from helpers import CAREFUL, LLM_TEMPLATE, ONE_TEMPLATE_SNAKEFILE, complete_outputs, report_of, sticky_workflow, strike

SITE = sysconfig.get_paths()["purelib"]  # this test environment's packages (and the plugin's)
BLOCKER = '''
import importlib.abc, sys
class _Lacks(importlib.abc.MetaPathFinder):
    """This environment lacks transformers."""
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r} (not in this environment)", name=name)
        return None
sys.meta_path.insert(0, _Lacks())
'''


def make_venv(folder: Path, *, sees_this_checkout: bool = True, lacks_transformers: bool = False) -> Path:
    """A venv of this Python made without pip; its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    if sees_this_checkout:
        # addsitedir, not a plain path: the editable install of the plugin is a .pth file there
        (site / "_this_checkout.pth").write_text(f"import site; site.addsitedir({SITE!r})\n")
    if lacks_transformers:
        (site / "_lacks.py").write_text(BLOCKER)
        (site / "_lacks.pth").write_text("import _lacks\n")
    return folder / "bin" / "python"


def two_venvs(root: Path) -> dict[str, str]:
    return {
        "snakemake": str(make_venv(root / "snakemake-env", lacks_transformers=True)),
        "models": str(make_venv(root / "models-env")),
    }


@pytest.fixture
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two environments, made once for the whole test run (in whichever test process)."""
    return {name: Path(path) for name, path in made_once(tmp_path_factory, "environments", two_venvs).items()}


def tiny_model(folder: Path) -> Path:
    """A small causal LM made here with a fixed seed, saved as a real model folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(folder)
    return folder


def write_workflow(wf: Workflow, template_entry: str, rule_extra: str = "", count: int = 4) -> None:
    wf.write(
        "Snakefile",
        f"""
        configfile: "config.yaml"

        rule all:
            input: expand("out/{{i}}.txt", i=range({count}))

        rule infer:
            output: "out/{{i}}.txt"
            resources: sticky="lm"
            {rule_extra}
            script: "scripts/infer.py"
        """,
    )
    wf.write("config.yaml", "sticky:\n  lm:\n    setup: lm.py\n" + template_entry)
    wf.write(
        "lm.py",
        """
        import os, sys

        def setup(model=None):
            import transformers
            loaded = None
            if model is not None:
                loaded = transformers.AutoModelForCausalLM.from_pretrained(model)
            return {"python": sys.executable, "pid": os.getpid(), "model": loaded}

        def teardown(state):
            state.clear()
        """,
    )
    wf.write(
        "scripts/infer.py",
        """
        import os, sys, torch
        from snakemake_executor_plugin_sticky import sticky_state

        state = sticky_state(snakemake)
        logits = "none"
        if state["model"] is not None:
            with torch.no_grad():
                logits = tuple(state["model"](torch.tensor([[1, 2, 3]])).logits.shape)
        with open(snakemake.output[0], "w") as f:
            f.write(f"{sys.executable} {state['python']} {state['pid']} {os.getpid()} {logits}\\n")
        """,
    )


def test_template_in_a_second_venv_loads_a_transformers_model_that_snakemakes_environment_lacks(
    workflow: Workflow, envs: dict[str, Path], tmp_path: Path
):
    lacking = subprocess.run([str(envs["snakemake"]), "-c", "import transformers"], capture_output=True, text=True)
    assert lacking.returncode != 0 and "not in this environment" in lacking.stderr
    model = tiny_model(tmp_path / "model")
    write_workflow(workflow, f"    python: {envs['models']}\n    kwargs: {{model: {model}}}\n")
    run = workflow.run(python=envs["snakemake"])
    assert run.returncode == 0, run.output
    assert f"workers run in python environment {envs['models']}" in run.output
    rows = [workflow.read(f"out/{i}.txt").split() for i in range(4)]
    for script_python, state_python, state_pid, script_pid, *logits in rows:
        assert script_python == state_python == str(envs["models"])  # every invocation ran there
        assert state_pid == script_pid  # in the resident worker
        assert " ".join(logits) == "(1, 3, 64)"  # the model loaded with from_pretrained ran
    assert len({row[2] for row in rows}) == 1  # one worker built the state once
    assert not workflow.leftover_processes()
    # the run's folder, with the credentials the workers read, is gone with the run
    assert not list((workflow.root / ".snakemake" / "sticky" / "runs").iterdir())


def test_a_rules_own_conda_folder_becomes_its_templates_environment(workflow: Workflow, envs: dict[str, Path]):
    # An existing environment's folder needs no conda to make it; Snakemake needs conda only for
    # the run's metadata (dropped here) and for jobs that are not sticky (none here).
    folder = envs["models"].parent.parent
    write_workflow(workflow, "", rule_extra=f'conda: "{folder}"')
    targets = [f"out/{i}.txt" for i in range(4)]
    run = workflow.run("--sdm", "conda", "--drop-metadata", *targets, python=envs["snakemake"])
    assert run.returncode == 0, run.output
    assert f"conda environment {folder} (rule 'infer', conda:)" in run.output
    assert {workflow.read(t).split()[0] for t in targets} == {str(envs["models"])}


def test_a_rule_whose_environment_disagrees_with_its_templates_is_refused(
    workflow: Workflow, envs: dict[str, Path], tmp_path: Path
):
    other = make_venv(tmp_path / "other-env").parent.parent
    write_workflow(workflow, f"    python: {envs['models']}\n", rule_extra=f'conda: "{other}"')
    run = workflow.run("--sdm", "conda", "--drop-metadata", "out/0.txt", python=envs["snakemake"])
    assert run.returncode != 0
    assert f"Rule 'infer' names the conda environment {other}" in run.output, run.output
    assert f"sticky template 'lm' runs in the python environment {envs['models']}" in run.output
    assert not (workflow.root / "out").exists()


def test_an_environment_without_the_plugin_is_refused_before_any_invocation(workflow: Workflow, tmp_path: Path):
    bare = make_venv(tmp_path / "bare-env", sees_this_checkout=False)
    write_workflow(workflow, f"    python: {bare}\n")
    run = workflow.run()
    assert run.returncode != 0
    assert f"Sticky template 'lm': its python environment {bare}" in run.output, run.output
    assert "snakemake-executor-plugin-sticky missing there" in run.output
    assert "distributed missing there" in run.output
    assert f"Install them there: {bare} -m pip install" in run.output
    assert not (workflow.root / "out").exists()
    assert not workflow.leftover_processes()


def test_an_environment_with_another_dask_is_refused_naming_both_versions(workflow: Workflow, tmp_path: Path):
    import distributed

    python = make_venv(tmp_path / "old-dask-env")
    site = next((tmp_path / "old-dask-env").glob("lib/python*/site-packages"))
    # found before this checkout's own (the .pth adds those after the venv's site-packages)
    info = site / "distributed-2000.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: distributed\nVersion: 2000.1.0\n")
    write_workflow(workflow, f"    python: {python}\n")
    run = workflow.run()
    assert run.returncode != 0
    assert f"distributed 2000.1.0 there, {distributed.__version__} here" in run.output, run.output
    assert f"distributed=={distributed.__version__}" in run.output  # the fix names the version
    assert not (workflow.root / "out").exists()


def test_a_conda_environment_file_goes_to_snakemakes_conda_support(workflow: Workflow):
    # No conda channel can be reached from here: the run goes as far as Snakemake's conda
    # support, whose error comes back naming the template and the file.
    workflow.write("envs/lm.yaml", "channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - transformers\n")
    write_workflow(workflow, "    conda: envs/lm.yaml\n")
    run = workflow.run("--sdm", "conda", "--conda-prefix", str(workflow.root / "conda-envs"), "out/0.txt")
    assert run.returncode != 0
    assert (
        f"Sticky template 'lm': its conda environment {workflow.root / 'envs/lm.yaml'} (config 'sticky: lm: "
        "conda:') could not be made by Snakemake's conda support" in run.output
    ), run.output
    assert not (workflow.root / "out").exists()


def test_a_rules_conda_that_the_deployment_method_does_not_count_is_said(workflow: Workflow):
    workflow.write("envs/lm.yaml", "dependencies:\n  - python=3.11\n")
    write_workflow(workflow, "", rule_extra='conda: "envs/lm.yaml"', count=2)
    run = workflow.run()
    assert run.returncode == 0, run.output
    assert (
        "Sticky rule 'infer': its conda: is not used, as --software-deployment-method does not include conda"
        in run.output
    )
    assert workflow.read("out/0.txt").split()[0] == sys.executable


def test_a_container_goes_to_snakemakes_container_support(workflow: Workflow):
    # No apptainer here: the run goes as far as Snakemake's container support.
    write_workflow(workflow, "    container: docker://python:3.11\n")
    run = workflow.run("out/0.txt", "--sdm", "apptainer")
    assert run.returncode != 0
    assert (
        "Sticky template 'lm': its container environment docker://python:3.11 (config 'sticky: lm: container:') "
        "could not be pulled by Snakemake's container support" in run.output
    ), run.output
    assert not (workflow.root / "out").exists()


def test_without_conda_deployment_a_templates_conda_file_is_not_used_and_the_run_says_so(workflow: Workflow):
    workflow.write("envs/lm.yaml", "dependencies:\n  - python=3.11\n")
    write_workflow(workflow, "    conda: envs/lm.yaml\n", count=2)
    run = workflow.run()
    assert run.returncode == 0, run.output
    assert "--software-deployment-method does not include conda" in run.output
    assert workflow.read("out/0.txt").split()[0] == sys.executable


def test_a_killed_snakemake_takes_its_environments_workers_along(workflow: Workflow, envs: dict[str, Path]):
    write_workflow(workflow, f"    python: {envs['models']}\n", count=1)
    workflow.write(
        "scripts/infer.py",
        """
        import time
        from snakemake_executor_plugin_sticky import sticky_state
        sticky_state(snakemake)
        open("invocation-started", "w").close()
        time.sleep(600)
        """,
    )
    proc = workflow.popen()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (workflow.root / "invocation-started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, workflow.read("snakemake.log")
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "supervisor" in " ".join(p.cmdline())]
    assert workers, "the worker runs under the supervisor"
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup of Snakemake's own: the supervisor must notice
    proc.wait()
    assert not workflow.leftover_processes(wait_s=60), workflow.read("snakemake.log")


def name_of(process: psutil.Process) -> str:
    """A process's name; empty for one that has just ended (or is still becoming what it runs)."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def test_the_supervisor_ends_its_worker_when_the_process_that_started_it_is_gone(tmp_path: Path):
    # A worker that would not notice on its own (here `sleep`): the supervisor watches its parent.
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "read, write = os.pipe()\n"
            "env = {**os.environ, 'STICKY_SUPERVISOR_WATCH_FD': str(read)}\n"
            "supervisor = subprocess.Popen([sys.executable, '-m', 'snakemake_executor_plugin_sticky.worker.supervisor', 'sleep', "
            "'600'], env=env, pass_fds=(read,))\n"
            "print(supervisor.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    supervisor = psutil.Process(int(starter.stdout.readline()))
    deadline = time.monotonic() + 60
    while (worker := next((c for c in supervisor.children() if name_of(c) == "sleep"), None)) is None:
        assert time.monotonic() < deadline, "the supervisor started no worker"
        time.sleep(0.05)
    starter.kill()
    starter.wait()
    worker.wait(timeout=60)  # psutil.TimeoutExpired if the worker outlives its starter
    supervisor.wait(timeout=60)


def test_template_identity_follows_its_environment(tmp_path: Path):
    (tmp_path / "t.py").write_text("def setup():\n    return 1\n")
    python = make_venv(tmp_path / "venv")
    plain = parse_template("t", {"setup": "t.py"}, tmp_path)
    in_venv = parse_template("t", {"setup": "t.py", "python": str(python)}, tmp_path)
    assert in_venv.identity != plain.identity
    assert parse_template("t", {"setup": "t.py", "python": str(python)}, tmp_path).identity == in_venv.identity
    # a package installed into the environment: another identity
    time.sleep(0.01)
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    (site / "newpackage").mkdir()
    assert parse_template("t", {"setup": "t.py", "python": str(python)}, tmp_path).identity != in_venv.identity
    # a changed environment file: another identity
    (tmp_path / "env.yaml").write_text("dependencies:\n  - python=3.11\n")
    first = parse_template("t", {"setup": "t.py", "conda": "env.yaml"}, tmp_path)
    (tmp_path / "env.yaml").write_text("dependencies:\n  - python=3.11\n  - transformers\n")
    second = parse_template("t", {"setup": "t.py", "conda": "env.yaml"}, tmp_path)
    assert first.identity != second.identity
    # an environment a rule names
    env = parse_environment({"conda": "env.yaml"}, "t", "sticky: t:", tmp_path)
    assert env is not None and with_environment(plain, env).identity not in (plain.identity, first.identity)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"python": "venv/bin/python", "conda": "env.yaml"}, "names 'python' and 'conda'"),
        ({"python": "no/such/python"}, "'python: no/such/python' is not an executable file"),
        ({"conda": "missing.yaml"}, "conda environment file 'missing.yaml' does not exist"),
        ({"container": 3}, "'container' must be a path or an image name"),
    ],
)
def test_environment_mistakes_name_the_template_and_key(tmp_path: Path, entry: dict, message: str):
    (tmp_path / "t.py").write_text("def setup():\n    return 1\n")
    with pytest.raises(WorkflowError, match="Sticky template 't'") as raised:
        parse_template("t", {"setup": "t.py", **entry}, tmp_path)
    assert message in str(raised.value)


@pytest.mark.usefixtures("slurm")
def test_slurm_workers_of_a_template_run_in_its_environment(workflow: Workflow, envs: dict[str, Path]):
    write_workflow(workflow, f"    python: {envs['models']}\n", count=2)
    run = workflow.run("--sticky-cluster", "slurm", "--sticky-interface", "lo", python=envs["snakemake"])
    assert run.returncode == 0, run.output
    assert {workflow.read(f"out/{i}.txt").split()[0] for i in range(2)} == {str(envs["models"])}


def test_a_killed_worker_in_its_environment_is_started_again_and_its_invocation_rerun(
    workflow: Workflow, envs: dict[str, Path]
):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE + f"    python: {envs['models']}\n")
    # the last invocation waits for the replacement's state: the run cannot end before it is built
    waits = (
        "import os, time\n"
        "if snakemake.wildcards.i == '39':\n"
        "    deadline = time.time() + 180\n"
        "    while len(open('setups-llm.txt').read().split()) < 3 and time.time() < deadline:\n"
        "        time.sleep(0.1)\n"
    )
    workflow.write("scripts/record.py", waits + CAREFUL)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=40", "sleep=0.2", "victim=5")
    victim = strike(workflow, 5, signal.SIGKILL)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, output
    assert complete_outputs(workflow, 40), "every output whole, the killed attempt's half one replaced"
    assert f"end 5 {victim}" not in workflow.read("out/5.json")
    setups = workflow.lines("setups-llm.txt")
    assert len(setups) == 3 and str(victim) in setups, "the lost worker was started again and rebuilt"
    assert report_of(workflow)["workers_lost"] == 1
    assert workflow.leftover_processes() == []


def test_snakemake_stopped_while_a_worker_in_its_environment_starts_leaves_nothing(
    workflow: Workflow, envs: dict[str, Path]
):
    write_workflow(workflow, f"    python: {envs['models']}\n", count=2)
    proc = workflow.popen()
    for line in proc.follow():
        if "starting worker 1/1" in line:
            break
    os.kill(proc.pid, signal.SIGINT)  # Snakemake alone: its own cancel must end the starting worker
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode != 0
    assert not workflow.leftover_processes(wait_s=30), output
    assert not list((workflow.root / ".snakemake" / "sticky" / "runs").iterdir())
