"""With `slots: 1` a rule's `threads` size torch's and the BLAS libraries' pools for its script, as
in a job Snakemake starts, unless the template set torch's count (which stays the template's)."""

from __future__ import annotations

from pathlib import Path

from conftest import Workflow

SNAKEFILE = """
configfile: "config.yaml"
JOBS = [("free", 2), ("free", 1), ("pinned", 2), ("free", 2), ("pinned", 1), ("free", 1)]

rule all:
    input: [f"out/{t}-{n}-{i}.txt" for i, (t, n) in enumerate(JOBS)]

def previous(w):
    i = int(w.i)
    return [] if i == 0 else [f"out/{JOBS[i - 1][0]}-{JOBS[i - 1][1]}-{i - 1}.txt"]

rule pools:
    input: previous
    output: "out/{t}-{n}-{i}.txt"
    threads: lambda w: int(w.n)
    resources: sticky=lambda w: w.t
    script: "pools.py"
"""

TEMPLATE = """
import numpy, torch

def setup(pin=False):
    if pin:
        torch.set_num_threads(1)
    return {"pin": pin}
"""

CONFIG = """
sticky:
  free: {setup: template.py, slots: 1}
  pinned: {setup: template.py, kwargs: {pin: true}, slots: 1}
"""

SCRIPT = """
import numpy, torch
from threadpoolctl import threadpool_info
from snakemake_executor_plugin_sticky import sticky_state

state = sticky_state(snakemake)
blas = sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
open(snakemake.output[0], "w").write(f"{snakemake.threads} {torch.get_num_threads()} {blas}\\n")
torch.set_num_threads(7)  # a script's own change ends with it
"""


def pools_workflow(root: Path) -> Workflow:
    root.mkdir()
    wf = Workflow(root)
    wf.write("Snakefile", SNAKEFILE)
    wf.write("config.yaml", CONFIG)
    wf.write("template.py", TEMPLATE)
    wf.write("pools.py", SCRIPT)
    return wf


def test_threads_size_torch_and_blas_pools_as_in_a_fresh_job(tmp_path: Path):
    local = pools_workflow(tmp_path / "local")
    run = local.run(executor=None, cores=2)
    assert run.returncode == 0, run.output
    sticky = pools_workflow(tmp_path / "sticky")
    run = sticky.run("--sticky-workers", "1", cores=2)
    assert run.returncode == 0, run.output

    def seen(wf: Workflow) -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted((wf.root / "out").glob("*.txt"))}

    expected = seen(local)
    assert expected["free-1-1.txt"].split()[1] == "1" and expected["pinned-2-2.txt"].split()[1] == "1", expected
    assert seen(sticky) == expected
