"""The job script each batch system would get for a worker: dask-jobqueue fills it from the
template and the --sticky-* settings. Pure units: nothing is submitted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from distributed.security import Security
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_sticky.head.engines.batch_systems import (
    SYSTEMS,
    check_pools,
    job_for,
    lifetime_seconds,
    pools_of,
    walltime_seconds,
)
from snakemake_executor_plugin_sticky.head.engines.jobqueue import network_host
from snakemake_executor_plugin_sticky.head.run_folders import RunFolder, clean_stale_runs
from snakemake_executor_plugin_sticky.settings import ExecutorSettings
from snakemake_executor_plugin_sticky.templates import parse_templates

SCHEDULER = "tls://10.1.2.3:8786"


def template(tmp_path: Path, **entry):
    (tmp_path / "t.py").write_text("def setup():\n    return 1\n")
    return parse_templates({"sticky": {"llm": {"setup": "t.py", **entry}}}, tmp_path)["llm"]


def script(system: str, spec, settings: ExecutorSettings, security=None, pool: int = 0) -> str:
    pool_spec = pools_of(spec, settings)[pool]
    return job_for(
        SYSTEMS[system],
        spec,
        pool_spec,
        scheduler=SCHEDULER,
        name="llm-1-7",
        security=security,
        interface=None,
        log_directory=None,
        run_id="5eed1e55",
    ).job_script()


SETTINGS = ExecutorSettings(
    queue="gpuq",
    account="proj42",
    walltime="02:00:00",
    memory="32GB",
    prologue="module load cuda/12; source /opt/venv/bin/activate",
    python="/opt/venv/bin/python",
)

EXPECTED = {
    "slurm": [
        "#SBATCH -J sticky-llm-5eed1e55",
        "#SBATCH -p gpuq",
        "#SBATCH -A proj42",
        "#SBATCH -t 02:00:00",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --cpus-per-task=2",
    ],
    "pbs": [
        "#PBS -N sticky-llm-5eed1e55",
        "#PBS -q gpuq",
        "#PBS -A proj42",
        "#PBS -l walltime=02:00:00",
        "#PBS -l ngpus=2",
        "#PBS -l select=1:ncpus=2:mem=30GB",
    ],
    "sge": ["#$ -N sticky-llm-5eed1e55", "#$ -q gpuq", "#$ -P proj42", "#$ -l h_rt=02:00:00", "#$ -l gpu=2"],
    "lsf": [
        "#BSUB -J sticky-llm-5eed1e55",
        "#BSUB -q gpuq",
        '#BSUB -P "proj42"',
        "#BSUB -W 02:00",
        '#BSUB -gpu "num=2"',
        "#BSUB -n 2",
    ],
    "htcondor": ["request_gpus = 2", "accounting_group = proj42", "MY.DaskWorkerCores = 2"],
    "oar": [
        "#OAR -n sticky-llm-5eed1e55",
        "#OAR -q gpuq",
        "#OAR --project proj42",
        "#OAR -l /nodes=1/core=2,walltime=02:00:00",
        "#OAR -p gpu_count>=2",
    ],
}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_job_script_asks_for_the_templates_gpus_and_starts_one_tagged_worker(tmp_path: Path, system: str):
    spec = template(tmp_path, gpus=2, slots=2)
    text = script(system, spec, SETTINGS)
    lines = text.splitlines()
    for expected in EXPECTED[system]:
        assert expected in lines or (system == "htcondor" and expected in text), (expected, text)
    command = next(line for line in lines if "distributed.cli.dask_worker" in line)
    # the supervisor runs the worker: what it starts ends with it, and the job gets its exit status
    assert (
        f"/opt/venv/bin/python -m snakemake_executor_plugin_sticky.worker.supervisor -m distributed.cli.dask_worker "
        f"{SCHEDULER} --name llm-1-7"
    ) in command
    assert "--resources sticky-llm=2" in command and "export STICKY_WORKER_LIFETIME_S=6600" in text
    assert "--no-nanny" in command  # the batch system supervises; the job ends with its worker
    # the prologue runs before the worker, in the job
    assert text.index("module load cuda/12; source /opt/venv/bin/activate") < text.index("dask_worker")


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_cpu_template_asks_for_no_gpu(tmp_path: Path, system: str):
    text = script(system, template(tmp_path), ExecutorSettings())
    assert "gpu" not in text.lower().replace("sticky-llm-5eed1e55", "")


def test_tls_credentials_reach_the_worker_as_files(tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    security = Security(
        tls_ca_file=str(cert), tls_worker_cert=str(cert), tls_worker_key=str(key), require_encryption=True
    )
    text = script("slurm", template(tmp_path), ExecutorSettings(), security=security)
    assert f"--tls-ca-file {cert} --tls-cert {cert} --tls-key {key}" in text
    assert "BEGIN" not in text  # paths only, never key material in the script


def test_template_pools_override_settings_and_split_gpu_types(tmp_path: Path):
    spec = template(
        tmp_path,
        gpus=1,
        cluster=[
            {"name": "a100", "queue": "a100q", "max-workers": 8, "job-extra": ["--constraint=a100"]},
            {"name": "v100", "queue": "v100q", "max-workers": 2, "walltime": "04:00:00"},
        ],
    )
    settings = ExecutorSettings(queue="default", job_extra="--qos=high; --exclusive")
    a100, v100 = pools_of(spec, settings)
    assert (a100.name, a100.queue, a100.max_workers, a100.job_extra) == ("a100", "a100q", 8, ["--constraint=a100"])
    assert (v100.queue, v100.max_workers, v100.walltime, v100.job_extra) == (
        "v100q",
        2,
        "04:00:00",
        ["--qos=high", "--exclusive"],
    )
    assert "#SBATCH -p v100q" in script("slurm", spec, settings, pool=1)


@pytest.mark.parametrize(
    "cluster, culprit",
    [
        ({"partition": "x"}, "unknown key(s) 'partition'"),
        ({"max-workers": 0}, "'max-workers' must be an integer >= 1"),
        ({"walltime": "two hours"}, "walltime must look like HH:MM:SS"),
    ],
)
def test_bad_pool_settings_name_template_pool_and_key(tmp_path: Path, cluster: dict, culprit: str):
    spec = template(tmp_path, cluster=cluster)
    with pytest.raises(WorkflowError) as error:
        pools_of(spec, ExecutorSettings())
    assert "Sticky template 'llm', cluster pool 1" in str(error.value) and culprit in str(error.value)


def test_cluster_entry_must_be_mapping_or_list(tmp_path: Path):
    with pytest.raises(WorkflowError, match="'cluster' must be a mapping"):
        template(tmp_path, cluster="slurm")


def test_walltime_and_worker_lifetime():
    assert walltime_seconds("01:00:00") == 3600 and walltime_seconds("1-00:00:00") == 86400
    assert walltime_seconds("30:00") == 1800
    assert lifetime_seconds("01:00:00") == 3240  # 10% early
    assert lifetime_seconds("24:00:00") == 86400 - 600  # at most 10 min early


@pytest.mark.parametrize(
    "system, directive",
    [("slurm", "#SBATCH --mem"), ("pbs", ":mem="), ("lsf", "#BSUB -M"), ("htcondor", "RequestMemory")],
)
def test_no_memory_asked_for_unless_set(tmp_path: Path, system: str, directive: str):
    spec = template(tmp_path)
    assert directive not in script(system, spec, ExecutorSettings())
    assert directive in script(system, spec, ExecutorSettings(memory="8GB"))


WORKFLOW = Path(__file__).resolve().parents[2] / "workflow"


@pytest.mark.parametrize("profile", ["slurm", "slurm-gpu-types", "htcondor", "pbs", "attach"])
def test_example_profiles_are_valid_snakemake_profiles(tmp_path: Path, profile: str):
    shutil.copytree(WORKFLOW, tmp_path / "workflow", ignore=shutil.ignore_patterns("results", ".snakemake"))
    done = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "--workflow-profile", f"profiles/{profile}", "-n", "-q"],
        cwd=tmp_path / "workflow",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_types_profile_gives_two_pools_asking_for_their_gpu_type():
    config = yaml.safe_load((WORKFLOW / "config" / "config.yaml").read_text())
    pools = yaml.safe_load((WORKFLOW / "profiles" / "slurm-gpu-types" / "pools.yaml").read_text())
    config["sticky"]["llm"].update(pools["sticky"]["llm"], setup=str(WORKFLOW / "templates" / "llm.py"), gpus=1)
    config["sticky"]["llm"]["kwargs"] = {"model": "m", "dtype": "bfloat16", "device": "cuda"}
    spec = parse_templates(config, WORKFLOW)["llm"]
    settings = ExecutorSettings(cluster="slurm")
    assert [(p.name, p.queue, p.max_workers) for p in pools_of(spec, settings)] == [
        ("a100", "gpu-a100", 8),
        ("v100", "gpu-v100", 4),
    ]
    assert "#SBATCH --gres=gpu:a100:1" in script("slurm", spec, settings, pool=0)
    v100 = script("slurm", spec, settings, pool=1)
    assert "#SBATCH --gres=gpu:v100:1" in v100 and "#SBATCH --constraint=v100-32gb" in v100


def test_max_workers_from_pool_then_template_then_setting(tmp_path: Path):
    settings = ExecutorSettings(max_workers=4)
    assert pools_of(template(tmp_path), settings)[0].max_workers == 4
    assert pools_of(template(tmp_path, workers=6), settings)[0].max_workers == 6
    assert pools_of(template(tmp_path, workers=6, cluster={"max-workers": 2}), settings)[0].max_workers == 2


def test_every_cluster_choice_but_local_is_a_batch_system():
    from snakemake_executor_plugin_sticky.settings import CLUSTERS

    assert set(SYSTEMS) == set(CLUSTERS) - {"local"}


@pytest.mark.parametrize(
    "system, entry, settings, culprit",
    [
        ("slurm", {}, {"memory": "lots"}, "--sticky-memory (template 'llm') 'lots' is not a size"),
        ("slurm", {"cluster": {"memory": "64 gigs"}}, {}, "Sticky template 'llm', cluster pool 1: 'memory' '64 gigs'"),
        (
            "slurm",
            {"gpus": 1},
            {"gpu_directive": "--gres=gpu:{gpu}"},
            "--sticky-gpu-directive (template 'llm') '--gres=gpu:{gpu}' cannot be filled in",
        ),
        (
            "htcondor",
            {},
            {"job_extra": "+WantGPU True"},
            "--sticky-job-extra (template 'llm'): HTCondor job directive '+WantGPU True' must look like key = value",
        ),
        (
            "pbs",
            {"cluster": [{}, {"walltime": "soon"}]},
            {},
            "Sticky template 'llm', cluster pool 2: walltime must look like HH:MM:SS",
        ),
    ],
)
def test_bad_batch_settings_fail_before_any_job_naming_the_setting(tmp_path: Path, system, entry, settings, culprit):
    spec = template(tmp_path, **entry)
    with pytest.raises(WorkflowError) as error:
        check_pools([spec], ExecutorSettings(cluster=system, **settings))
    assert culprit in str(error.value)


def test_good_batch_settings_pass_the_check(tmp_path: Path):
    for system in SYSTEMS:
        check_pools(
            [template(tmp_path, gpus=2, cluster=[{"memory": "8GB"}, {"queue": "b"}])], replace(SETTINGS, cluster=system)
        )


def test_an_address_other_nodes_cannot_reach_is_refused_naming_the_interface_setting(monkeypatch):
    # a default Debian hosts file: the host's name is 127.0.1.1
    monkeypatch.setattr("socket.gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(WorkflowError) as error:
        network_host(None)
    message = str(error.value)
    assert "127.0.1.1" in message and "loopback" in message and "--sticky-interface" in message and "lo " in message
    assert network_host("lo")[0] == "127.0.0.1", "a loopback interface named on purpose (one-node cluster)"
    address, origin = network_host(None, lambda: ["no-such-node.invalid", "127.0.0.1"])
    assert address == "127.0.0.1" and "route to compute node 127.0.0.1" in origin, "the route to the first node"
    with pytest.raises(WorkflowError, match="--sticky-interface no-such-if"):
        network_host("no-such-if")


def test_the_next_run_cancels_the_jobs_a_dead_run_left(tmp_path: Path):
    runs = tmp_path / "runs"
    cancelled = tmp_path / "cancelled.txt"
    cancel = tmp_path / "fake-scancel"
    cancel.write_text(f'#!/bin/sh\necho "$@" >> {cancelled}\n')
    cancel.chmod(0o755)
    dead = RunFolder.create(runs, "slurm", str(cancel))
    dead.job_submitted("101")
    dead.job_submitted("102")
    dead.credentials.mkdir()
    owner = json.loads((dead.path / "owner.json").read_text())
    owner["pid"], owner["started"] = 999_999_999, "0"  # a process that is gone
    (dead.path / "owner.json").write_text(json.dumps(owner))
    alive = RunFolder.create(runs, "slurm", str(cancel))  # this process: a run going on (--nolock)
    messages = []

    class Log:
        def info(self, text: str) -> None:
            messages.append(text)

    clean_stale_runs(runs, Log())
    assert cancelled.read_text().split() == ["101", "102"]
    assert not dead.path.exists(), "its folder and credentials are gone"
    assert alive.path.exists()
    assert f"run {dead.run_id}" in messages[0] and "cancelled its 2 slurm job(s) 101, 102" in messages[0]


@pytest.mark.parametrize("how", ["another user's folder", "a file others may write"])
def test_a_run_folder_that_is_not_the_users_alone_is_never_trusted(tmp_path: Path, how: str):
    runs = tmp_path / "runs"
    ran = tmp_path / "the-command-ran"
    planted = RunFolder.create(runs, "slurm", f"touch {ran}")
    planted.job_submitted("101")
    owner = json.loads((planted.path / "owner.json").read_text())
    owner["pid"], owner["started"] = 999_999_999, "0"  # a dead run, whose cancel command would run
    (planted.path / "owner.json").write_text(json.dumps(owner))
    if how == "another user's folder":
        for path in (planted.path, planted.path / "owner.json", planted.path / "jobs"):
            os.chown(path, 65534, 65534)
    else:
        (planted.path / "owner.json").chmod(0o666)
    warnings = []
    log = SimpleNamespace(info=warnings.append, warning=warnings.append)
    clean_stale_runs(runs, log)
    assert not ran.exists(), "the command in owner.json did not run"
    assert planted.path.exists(), "nor was the folder removed"
    assert len(warnings) == 1 and str(planted.path) in warnings[0] and "left as it is" in warnings[0]
