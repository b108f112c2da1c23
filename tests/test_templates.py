"""Template identity and GPU planning: pure units, no engine needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_sticky.head.gpus import GpuPlan
from snakemake_executor_plugin_sticky.templates import parse_templates


class Log:
    def __init__(self):
        self.warnings: list[str] = []

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)


def templates(tmp_path: Path, code: str, **entry) -> dict:
    (tmp_path / "t.py").write_text(code)
    return parse_templates({"sticky": {"llm": {"setup": "t.py", **entry}}}, tmp_path)


def test_identity_changes_with_code_kwargs_and_resources(tmp_path: Path):
    base = templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 1})["llm"]
    again = templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 1})["llm"]
    assert base.identity == again.identity and base.tag == again.tag
    variants = [
        templates(tmp_path, "def setup(m):\n    return m + 0\n", kwargs={"m": 1})["llm"],
        templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 2})["llm"],
        templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 1}, gpus=1)["llm"],
        templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 1}, slots=2)["llm"],
    ]
    assert len({base.identity, *(v.identity for v in variants)}) == 5
    # the routing tag names the template only, so hand-started workers can join
    assert {base.tag, *(v.tag for v in variants)} == {"sticky-llm"}
    # how many workers there are does not change what a worker holds
    assert (
        templates(tmp_path, "def setup(m):\n    return m\n", kwargs={"m": 1}, workers=3)["llm"].identity
        == base.identity
    )


def test_one_worker_per_visible_gpu_pinned_without_overlap(tmp_path: Path):
    one = templates(tmp_path, "def setup():\n    return 1\n", gpus=1)["llm"]
    plan = GpuPlan(["0", "1", "2", "3"], Log())
    assert plan.worker_count(one, None) == 4
    assert [plan.take(one) for _ in range(4)] == [["0"], ["1"], ["2"], ["3"]]

    two = templates(tmp_path, "def setup():\n    return 1\n", gpus=2)["llm"]
    plan = GpuPlan(["0", "1", "2", "3"], Log())
    assert plan.worker_count(two, None) == 2
    assert [plan.take(two) for _ in range(2)] == [["0", "1"], ["2", "3"]]


def test_cpu_template_gets_one_worker_and_no_gpu(tmp_path: Path):
    cpu = templates(tmp_path, "def setup():\n    return 1\n")["llm"]
    plan = GpuPlan(["0", "1"], Log())
    assert plan.worker_count(cpu, None) == 1 and plan.worker_count(cpu, 3) == 3
    assert plan.take(cpu) == []


def test_asking_for_more_gpus_than_visible_names_the_template(tmp_path: Path):
    one = templates(tmp_path, "def setup():\n    return 1\n", gpus=1)["llm"]
    with pytest.raises(WorkflowError, match="Sticky template 'llm' asks for 3 worker"):
        GpuPlan(["0", "1"], Log()).worker_count(one, 3)


def test_templates_sharing_gpus_are_warned_about(tmp_path: Path):
    one = templates(tmp_path, "def setup():\n    return 1\n", gpus=1)["llm"]
    log = Log()
    plan = GpuPlan(["0"], log)
    assert plan.take(one) == ["0"] and plan.take(one) == ["0"]
    assert log.warnings and "shares GPUs" in log.warnings[0]


def test_gpus_of_a_retired_pool_go_to_the_next_template_unshared(tmp_path: Path):
    first = templates(tmp_path, "def setup():\n    return 1\n", gpus=1)["llm"]
    log = Log()
    plan = GpuPlan(["0", "1"], log)
    taken = [plan.take(first) for _ in range(2)]
    assert taken == [["0"], ["1"]]
    plan.release(taken[0] + taken[1])
    assert [plan.take(first) for _ in range(2)] == [["0"], ["1"]] and not log.warnings


def test_rule_runtime_sets_the_invocation_timeout():
    from snakemake_executor_plugin_sticky.head.invocations import invocation_timeout

    assert invocation_timeout({"runtime": 2}, None) == 120.0  # Snakemake's runtime is in minutes
    assert invocation_timeout({"runtime": 2}, 30.0) == 120.0  # and wins over --sticky-invocation-timeout
    assert invocation_timeout({}, 30.0) == 30.0
    assert invocation_timeout({"runtime": "1h"}, None) is None  # unparsed text is not a limit
    assert invocation_timeout({}, None) is None
