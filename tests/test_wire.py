"""The contract between the head and the workers: every event record survives the trip through
the plain dicts Dask's events carry."""

from __future__ import annotations

import dataclasses
import pickle

import cloudpickle
import msgpack
import pytest

from snakemake_executor_plugin_sticky import wire

WHO = dict(template="llm", name="llm-0", address="tls://127.0.0.1:4000", host="node1", pid=42, gpus=("0",), time=1.5)
SAMPLES = [
    wire.SetupStarted(**WHO),
    wire.Ready(**WHO, setup_s=2.5, setup_started=1.0),
    wire.SetupFailed(**WHO, error="Traceback ...", setup_started=1.0),
    wire.Poisoned(**WHO, cause="OutOfMemoryError in rule verify"),
    wire.InvocationTimedOut(**WHO, key="sticky-verify-3-ab", rule="verify", timeout_s=60.0),
    wire.Preempted(**WHO, grace_s=30.0),
    wire.WalltimeNear(**WHO, grace_s=30.0),
    wire.Staged(
        **WHO, source="/models/m", origin="peer tls://x", bytes=10, seconds=0.5, copy_seconds=0.4, stage_started=1.2
    ),
    wire.WorkerWarning(**WHO, text="no reaper guards this worker"),
    wire.Removed(address="tls://127.0.0.1:4000", graceful=False, running=("k1", "k2"), time=3.0),
    wire.WorkerExited(address="tls://127.0.0.1:4000", exitcode=-9),
    wire.JobStarted(template="llm", name="llm-1-3", queued_s=12.5, partition="gpu", time=3.0),
    wire.HandedBack(address="tls://127.0.0.1:4000", task="sticky-r-1-ab", keys=("k3", "k4"), results=b"\x80pickled"),
]


def test_every_kind_of_event_has_a_sample():
    assert {type(event) for event in SAMPLES} == set(wire.EVENTS.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_an_event_survives_the_trip_through_dask(event: wire.Event):
    message = event.to_message()
    assert message["event"] == event.kind
    carried = msgpack.unpackb(msgpack.packb(message))  # as Dask's comms carry it
    assert wire.Event.from_message(carried) == event
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.time = 0  # type: ignore[misc]


def test_a_message_of_no_known_kind_is_refused():
    with pytest.raises(ValueError, match="no sticky event of kind 'nonsense'"):
        wire.Event.from_message({"event": "nonsense"})


def test_packed_invocations_are_pickled_once_and_pass_through_as_bytes():
    calls = []

    def dumps(items):
        calls.append(1)
        return cloudpickle.dumps(items)

    packed = wire.Packed([{"key": "a"}, lambda: "the config may hold a function"], dumps=dumps)
    once = pickle.dumps(packed)
    passed_on = pickle.loads(once)  # as the scheduler does, and pickles it again for a worker
    again = pickle.dumps(passed_on)
    assert calls == [1] and pickle.dumps(packed) == once, "the client's pickling is done once"
    items = pickle.loads(again).unpack()
    assert items[0] == {"key": "a"} and items[1]() == "the config may hold a function"
    assert packed.unpack()[0] == {"key": "a"}
