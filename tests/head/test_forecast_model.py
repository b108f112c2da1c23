"""The forecast's model, with no workers: earlier runs recorded as history lines, a plan, figures."""

from __future__ import annotations

import pytest

from snakemake_executor_plugin_sticky.head.forecast import Plan, forecast, lines


def run_line(
    identity: str = "abc", setup: float = 10.0, rules: dict | None = None, workers: int = 2, span: float = 0.0
):
    rules = rules or {"verify": {"count": 40, "mean_s": 1.0, "median_s": 1.0}}
    invocations = sum(r["count"] for r in rules.values())
    work = sum(r["count"] * r["mean_s"] for r in rules.values())
    return {
        "host": "vm",
        "cluster": "local",
        "templates": {
            "llm": {
                "identity": identity,
                "workers": workers,
                "slots": 1,
                "gpus_per_worker": 1,
                "setup_s": [setup] * workers,
                "rules": rules,
                "invocations": invocations,
                "sticky_s": span or setup + work / workers,
            }
        },
    }


def test_without_history_it_says_what_it_knows():
    f = forecast(Plan("llm", "abc", {"verify": 120}, workers=4), [])
    assert f.sticky_s is None
    text = "\n".join(lines(f))
    assert "120 invocation(s)" in text and "4 worker(s)" in text and "no earlier run" in text


def test_one_earlier_run_scales_to_more_invocations_and_workers():
    f = forecast(Plan("llm", "abc", {"verify": 120}, workers=4, gpus=1), [run_line()])
    assert f.setup_s == 10.0 and f.rule_s == {"verify": 1.0}
    assert f.sticky_s == pytest.approx(10 + 120 / 4)  # no own cost beyond setup and work earlier
    assert f.create_destroy_s == pytest.approx((10 * 120 + 120) / 4)
    assert f.gpu_hours == pytest.approx(4 * f.sticky_s / 3600)


def test_the_plugins_own_cost_per_invocation_carries_over():
    earlier = run_line(span=10 + 40 / 2 + 0.05 * 40)  # 50 ms per invocation beyond setup and work
    f = forecast(Plan("llm", "abc", {"verify": 400}, workers=2), [earlier])
    assert f.sticky_s == pytest.approx(10 + 400 / 2 + 0.05 * 400)


def test_rules_keep_their_own_times_and_an_unseen_rule_takes_the_others_mean():
    rules = {
        "fast": {"count": 10, "mean_s": 0.1, "median_s": 0.1},
        "slow": {"count": 10, "mean_s": 3.0, "median_s": 3.0},
    }
    f = forecast(Plan("llm", "abc", {"fast": 10, "slow": 10, "new": 2}, workers=1), [run_line(rules=rules, workers=1)])
    assert f.rule_s == {"fast": 0.1, "slow": 3.0, "new": pytest.approx(1.55)}


def test_runs_of_the_same_identity_come_first_and_the_basis_says_which():
    same = run_line(identity="abc", setup=10.0)
    other = run_line(identity="zzz", setup=99.0)
    f = forecast(Plan("llm", "abc", {"verify": 10}, workers=2), [same, other])
    assert f.setup_s == 10.0 and "the same template" in f.basis and f.runs == 1
    f = forecast(Plan("llm", "new", {"verify": 10}, workers=2), [other])
    assert f.setup_s == 99.0 and "other code" in f.basis


def test_a_worker_share_beyond_its_walltime_is_said():
    f = forecast(Plan("llm", "abc", {"verify": 10_000}, workers=2, walltime_s=3600), [run_line()])
    assert f.fits_walltime is False
    assert any("does NOT fit" in line for line in lines(f))
    f = forecast(Plan("llm", "abc", {"verify": 100}, workers=2, walltime_s=3600), [run_line()])
    assert f.fits_walltime is True


def on_partition(line: dict, partition: str, waits: tuple[float, int], mean_batch: float) -> dict:
    entry = line["templates"]["llm"]
    entry.update(partitions=[partition], queue_wait_s={"median": waits[0], "count": waits[1]})
    entry["batch"] = {"mean_batch": mean_batch, "max_batch": 8}
    return {**line, "cluster": "slurm"}


def test_a_batch_systems_queue_wait_comes_from_earlier_jobs_on_the_same_partition():
    runs = [on_partition(run_line(), "gpu", (30.0, 2), 3.0), on_partition(run_line(), "gpu", (90.0, 4), 5.0)]
    runs.append(on_partition(run_line(), "debug", (1.0, 1), 1.0))
    plan = Plan("llm", "abc", {"verify": 40}, workers=2, walltime_s=3600, partitions=("gpu",))
    f = forecast(plan, runs)
    assert f.queue_wait_s == pytest.approx(60.0) and "6 job(s) in 2 run(s) on gpu" in f.queue_basis
    assert f.mean_batch == pytest.approx(3.0)  # the median of the runs' means
    text = "\n".join(lines(f))
    assert "waits 60.0 s in the queue" in text and "model calls of 3.0 item(s)" in text
    elsewhere = forecast(Plan("llm", "abc", {"verify": 40}, workers=2, walltime_s=3600, partitions=("long",)), runs)
    assert elsewhere.queue_wait_s is None and "queue wait: unknown (no earlier worker job on partition(s) long)" in (
        "\n".join(lines(elsewhere))
    )
    local = forecast(Plan("llm", "abc", {"verify": 40}, workers=2), runs)
    assert local.queue_wait_s is None and "queue" not in "\n".join(lines(local))
