"""A job's `snakemake` object, as the invocation carries it: the same as Snakemake's own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from snakemake.iocontainers import InputFiles, Log, Namedlist, OutputFiles, Params, ResourceList, Snakemake, Wildcards

from snakemake_executor_plugin_sticky.head.invocations import script_object


def job(params: Params) -> SimpleNamespace:
    return SimpleNamespace(
        input=InputFiles(fromdict={"table": "in/a.tsv"}),
        output=OutputFiles(fromdict={"plot": "out/a.png", "summary": "out/a.txt"}),
        params=params,
        wildcards=Wildcards(fromdict={"sample": "a"}),
        threads=4,
        resources=ResourceList(fromdict={"mem_mb": 1000, "sticky": "llm"}),
        log=Log(fromdict={"log": "logs/a.log"}),
        rule=SimpleNamespace(name="plot"),
    )


def fields(made: Snakemake) -> dict:
    """Every field, a named list as its items and its names."""
    return {
        name: (list(value), dict(value._names)) if isinstance(value, Namedlist) else value
        for name, value in vars(made).items()
    }


def test_the_object_without_snakemakes_imports_has_snakemakes_fields():
    params = Params(fromdict={"threshold": 0.5, "labels": ["a", "b"], "name": "x"})
    the_job = job(params)
    config = {"sticky": {"llm": {"setup": "t.py"}}}
    ours = script_object(the_job, config, "/w/scripts")
    snakemakes = Snakemake(
        the_job.input, the_job.output, params, the_job.wildcards, 4, the_job.resources, the_job.log, config,
        "plot", None, "/w/scripts",
    )  # fmt: skip
    assert fields(ours) == fields(snakemakes)
    assert ours.params.threshold == 0.5 and ours.output.summary == "out/a.txt" and ours.log.log == "logs/a.log"


def test_a_param_of_a_library_snakemake_converts_goes_through_snakemakes_constructor():
    ours = script_object(job(Params(fromdict={"matrix": np.eye(2)})), {}, "/w")
    assert ours._params_types == {0: "np.ndarray"} and ours.params.matrix.tolist() == [[1.0, 0.0], [0.0, 1.0]]
