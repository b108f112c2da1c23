"""stage(): node-local copies of a template's files, once per node and content version, kept
between runs, from a peer instead of the shared source. Real files, real processes, real
Snakemake and Dask; "nodes" are cache folders (a node is a host and its cache folder).

Opens of source files are counted with a Python audit hook that the template installs before it
stages: every `open` of a file under the source is written to opens.txt.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snakemake_executor_plugin_sticky.api import stage as staging
from snakemake_executor_plugin_sticky.api.stage import StageError, stage

from conftest import Workflow, snakemake_env
from helpers import COUNT_OPENS, as_resident, digest_of, make_model, start_scheduler


@pytest.fixture
def cache(tmp_path: Path):
    with as_resident(cache_dir=str(tmp_path / "cache")):
        yield tmp_path / "cache"


def test_a_copy_is_made_once_then_reused_and_made_again_when_the_content_changes(tmp_path: Path, cache: Path):
    source = make_model(tmp_path / "model")
    first = stage(source)
    assert first.is_dir() and str(first).startswith(str(cache)) and first.name == "model"
    assert sorted(p.name for p in first.iterdir()) == [f"shard-{i}.bin" for i in range(4)]
    assert (first / "shard-2.bin").read_bytes() == (source / "shard-2.bin").read_bytes()
    assert stage(source) == first, "the same version: the same copy"
    (source / "shard-1.bin").write_bytes(b"new weights")
    second = stage(source)
    assert second != first and (second / "shard-1.bin").read_bytes() == b"new weights"
    single = stage(source / "shard-3.bin")
    assert single.is_file() and single.read_bytes() == (source / "shard-3.bin").read_bytes()


def test_a_content_hash_names_the_version_by_content(tmp_path: Path, cache: Path):
    a = make_model(tmp_path / "a" / "model", files=2, size_mb=1)
    b = make_model(tmp_path / "b" / "model", files=2, size_mb=1)  # the same bytes elsewhere
    assert stage(a, hash_content=True) == stage(b, hash_content=True)
    assert stage(a) != stage(b), "by path, sizes and times, two sources are two versions"


def test_a_missing_or_unusable_source_is_named(tmp_path: Path, cache: Path):
    with pytest.raises(StageError, match=f"stage\\(\\): {tmp_path}/nowhere does not exist"):
        stage(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(StageError, match="pipe is neither a file nor a folder"):
        stage(tmp_path / "pipe")


def test_a_peer_is_served_only_bytes_inside_a_done_copy(tmp_path: Path, cache: Path):
    source = make_model(tmp_path / "model", files=2, size_mb=1)
    other = stage(make_model(tmp_path / "other", files=1, size_mb=1, seed=7))
    copy = stage(source)
    version = copy.parent.name

    def serve(version: str, name: str, relative: str, offset: int = 0, size: int = 64) -> bytes:
        return asyncio.run(staging.serve_chunk(version, name, relative, offset, size))

    assert serve(version, "model", "shard-1.bin", 5, 10) == (source / "shard-1.bin").read_bytes()[5:15]
    (tmp_path / "secret").write_text("not a copy")
    for version_, name, relative in [
        (version, "model", "../../../../secret"),
        (version, "model", str(tmp_path / "secret")),
        (version, "..", f"{other.parent.name}/other/shard-0.bin"),
        (version, "../..", "secret"),
        ("..", "copies", f"{version}.json"),
        (f"{version}/..", "model", "shard-0.bin"),
        (".", "model", "shard-0.bin"),
    ]:
        with pytest.raises(StageError):
            serve(version_, name, relative)
    with pytest.raises(StageError, match="no chunk"):
        serve(version, "model", "shard-0.bin", offset=-1)
    with pytest.raises(StageError, match="no chunk"):
        serve(version, "model", "shard-0.bin", size=0)


def test_copies_that_processes_stage_while_others_evict_are_always_whole(tmp_path: Path):
    """Eight processes stage three sources over and over in a cache with room for one copy: each
    returned copy is whole when returned and stays while the process holds it."""
    sources = [make_model(tmp_path / f"m{i}", files=2, size_mb=1, seed=i) for i in range(3)]
    env = {**snakemake_env(), "STICKY_CACHE_DIR": str(tmp_path / "cache")}
    code = f"""
import sys
from pathlib import Path
from snakemake_executor_plugin_sticky.api import stage as staging
from snakemake_executor_plugin_sticky.api import resident
from snakemake_executor_plugin_sticky.api.resident import StageSettings
class Resident:
    template, dask_worker, stage_settings = "t", None, StageSettings(cache_size=3 * 2**20)
    def announce(self, kind, **fields):
        pass
resident.attach(Resident())
sources = {[str(s) for s in sources]!r}
for turn in range(40):
    source = Path(sources[(turn + int(sys.argv[1])) % 3])
    copy = staging.stage(source)
    for shard in ("shard-0.bin", "shard-1.bin"):
        assert (copy / shard).read_bytes() == (source / shard).read_bytes(), (copy, shard)
    staging.release_all()
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(errors)


def test_a_copy_killed_halfway_never_counts_as_done(tmp_path: Path):
    source = make_model(tmp_path / "model", files=8, size_mb=64)
    env = {**snakemake_env(), "STICKY_CACHE_DIR": str(tmp_path / "cache")}
    code = "from snakemake_executor_plugin_sticky import stage; stage(%r)" % str(source)
    copier = subprocess.Popen([sys.executable, "-c", code], env=env)
    partial = tmp_path / "cache" / f"sticky-cache-{os.getuid()}" / "partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and any(p.is_dir() and any(p.rglob("*.bin")) for p in partial.iterdir())):
        assert copier.poll() is None and time.monotonic() < deadline, "the copy ended before it could be killed"
        time.sleep(0.001)
    copier.send_signal(signal.SIGKILL)
    copier.wait()
    copies = partial.parent / "copies"
    assert not list(copies.glob("*.json")), "no copy counts as done"
    with as_resident(cache_dir=str(tmp_path / "cache")):
        done = stage(source)
        assert all((done / f"shard-{i}.bin").stat().st_size == 64 * 2**20 for i in range(8))
        assert not list(partial.iterdir()), "the half copy was cleared"


def test_eviction_removes_the_least_recently_used_copies_but_never_one_in_use(tmp_path: Path):
    sources = [make_model(tmp_path / f"m{i}", files=1, size_mb=4, seed=i) for i in range(3)]
    env = {**snakemake_env(), "STICKY_CACHE_DIR": str(tmp_path / "cache")}
    # another process uses m0's copy and keeps running
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from snakemake_executor_plugin_sticky import stage; "
            f"print(stage({str(sources[0])!r}), flush=True); time.sleep(600)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        in_use = Path(holder.stdout.readline().strip())
        with as_resident(cache_dir=str(tmp_path / "cache"), cache_size=6 * 2**20):  # room for one copy
            m1 = stage(sources[1])
            assert in_use.exists(), "m0 is in use: never evicted"
            staging.release_all()  # this process no longer uses m1
            m2 = stage(sources[2])
            assert in_use.exists() and not m1.exists() and m2.exists(), "m1, unused and least recent, went"
    finally:
        holder.kill()
        holder.wait()


# -- in workflows ---------------------------------------------------------------------------------

TEMPLATE = (
    """
import hashlib, os, sys
from snakemake_executor_plugin_sticky import stage

SOURCE = {source!r}

"""
    + COUNT_OPENS
    + """
def setup():
    sys.addaudithook(count_opens)
    local = stage(SOURCE)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            digest.update(f.read())
    with open("loaded.txt", "a") as f:
        f.write(f"{{os.getpid()}} {{local}} {{digest.hexdigest()}}\\n")
    return {{"local": str(local), "digest": digest.hexdigest()}}
"""
)

SNAKEFILE = """
configfile: "config.yaml"
rule all:
    input: expand("out/{i}.txt", i=range(int(config.get("count", 8))))
rule use:
    output: "out/{i}.txt"
    resources: sticky="model"
    script: "scripts/use.py"
"""

USE = """
import time
from snakemake_executor_plugin_sticky import sticky_state
state = sticky_state(snakemake)
time.sleep(0.3)
open(snakemake.output[0], "w").write(state["digest"])
"""


def staging_workflow(workflow: Workflow, source: Path) -> None:
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write("config.yaml", "sticky:\n  model:\n    setup: templates/model.py\n")
    workflow.write("templates/model.py", TEMPLATE.format(source=str(source)))
    workflow.write("scripts/use.py", USE)


def loaded(workflow: Workflow) -> list[tuple[str, str]]:
    return [tuple(line.split()[1:]) for line in workflow.read("loaded.txt").splitlines()]


def stagings(workflow: Workflow) -> list[dict]:
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))
    return [s for w in report["templates"]["model"]["workers"] for s in w["stagings"]]


def test_two_workers_share_one_copy_kept_between_runs_and_renewed_when_a_file_changes(
    workflow: Workflow, tmp_path: Path
):
    source = make_model(tmp_path / "shared-fs" / "model")
    scratch = tmp_path / "scratch"
    staging_workflow(workflow, source)
    run = workflow.run("--sticky-workers", "2", "--sticky-cache-dir", str(scratch), cores=4)
    assert run.returncode == 0, run.output
    first = loaded(workflow)
    assert len(first) == 2 and len({local for local, _ in first}) == 1, "both workers loaded the same copy"
    assert first[0][0].startswith(str(scratch) + os.sep)
    opens = workflow.lines("opens.txt")
    assert sorted(opens) == sorted(str(p) for p in source.iterdir()), "each source file opened once"
    assert sorted(s["from"] for s in stagings(workflow)) == ["cache", "shared"]
    assert "staged " in run.output and "from shared" in run.output
    (cold,) = [s for s in stagings(workflow) if s["from"] == "shared"]
    # A cold stage costs its copy and a moment to tell the pool: never a wait for a deadline.
    assert cold["seconds"] - cold["copy_seconds"] < staging.ANNOUNCE_WAIT_S / 2, cold
    assert "did not list" not in run.output

    (workflow.root / "opens.txt").unlink()
    (workflow.root / "loaded.txt").unlink()
    again = workflow.run("--sticky-workers", "2", "--sticky-cache-dir", str(scratch), "--forceall", cores=4)
    assert again.returncode == 0, again.output
    assert not (workflow.root / "opens.txt").exists(), "the second run opened no source file"
    assert [local for local, _ in loaded(workflow)] == [first[0][0]] * 2

    (source / "shard-2.bin").write_bytes(b"retrained")
    (workflow.root / "loaded.txt").unlink()
    changed = workflow.run("--sticky-workers", "2", "--sticky-cache-dir", str(scratch), "--forceall", cores=4)
    assert changed.returncode == 0, changed.output
    assert {digest for _, digest in loaded(workflow)} == {digest_of(source)}, "the new content was loaded"
    assert workflow.leftover_processes() == []


def test_the_same_template_stages_under_the_local_executor(workflow: Workflow, tmp_path: Path):
    source = make_model(tmp_path / "model", files=2, size_mb=1)
    staging_workflow(workflow, source)
    run = workflow.run("--config", "count=3", executor=None, cores=1, env={"STICKY_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 0, run.output
    assert len(loaded(workflow)) == 3 and len({local for local, _ in loaded(workflow)}) == 1
    assert len(workflow.lines("opens.txt")) == 2, "create-destroy processes reload from the node-local copy"


def test_a_missing_source_fails_the_template_naming_the_path(workflow: Workflow, tmp_path: Path):
    staging_workflow(workflow, tmp_path / "no-such-model")
    run = workflow.run("--sticky-setup-attempts", "1", "--config", "count=1", timeout=120)
    assert run.returncode != 0
    assert f"stage(): {tmp_path}/no-such-model does not exist" in run.output


def start_workers(workflow: Workflow, scheduler_file: Path, nodes: list[Path]) -> list[subprocess.Popen]:
    """One worker per 'node': each with a cache folder of its own ($NODE_CACHE)."""
    dask = str(Path(sys.executable).with_name("dask"))
    workers = []
    for node in nodes:
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "snakemake_executor_plugin_sticky.worker.supervisor",
                    dask,
                    "worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--resources",
                    "sticky-model=1",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "0",
                    "--no-nanny",
                    "--no-dashboard",
                ],
                cwd=workflow.root,
                env={**snakemake_env(), "NODE_CACHE": str(node)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    return workers


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_one_node_reads_the_shared_source_and_the_others_copy_from_it(workflow: Workflow, tmp_path: Path):
    source = make_model(tmp_path / "shared-fs" / "model")
    staging_workflow(workflow, source)
    scheduler, scheduler_file = start_scheduler(workflow)
    nodes = [tmp_path / f"node{i}" for i in range(3)]
    workers = start_workers(workflow, scheduler_file, nodes)
    try:
        run = workflow.run(
            "--sticky-scheduler",
            str(scheduler_file),
            "--sticky-cache-dir",
            "$NODE_CACHE",
            "--sticky-stage-readers",
            "1",
            "--config",
            "count=12",
            cores=3,
        )
        assert run.returncode == 0, run.output
        origins = sorted(s["from"].split()[0] for s in stagings(workflow))
        assert origins == ["peer", "peer", "shared"], "one node read the shared source, two copied from a peer"
        assert sorted(workflow.lines("opens.txt")) == sorted(str(p) for p in source.iterdir()), "read once in all"
        copies = {local for local, _ in loaded(workflow)}
        assert len(copies) == 3 and all(any(c.startswith(str(n)) for n in nodes) for c in copies), copies
        assert {digest for _, digest in loaded(workflow)} == {digest_of(source)}
    finally:
        stop([*workers, scheduler])


def test_a_peer_that_fails_is_left_for_the_shared_source(workflow: Workflow, tmp_path: Path):
    source = make_model(tmp_path / "shared-fs" / "model")
    staging_workflow(workflow, source)
    workflow.write("scripts/use.py", USE.replace("time.sleep(0.3)", "time.sleep(1)"))
    scheduler, scheduler_file = start_scheduler(workflow)
    first, second = tmp_path / "node-a", tmp_path / "node-b"
    workers = start_workers(workflow, scheduler_file, [first])
    try:
        proc = workflow.popen(
            "--sticky-scheduler",
            str(scheduler_file),
            "--sticky-cache-dir",
            "$NODE_CACHE",
            "--config",
            "count=16",
            cores=2,
        )
        deadline = time.monotonic() + 120
        while not (workflow.root / "loaded.txt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.log.read_text()
            time.sleep(0.1)
        next(first.rglob("shard-1.bin")).unlink()  # node a's copy breaks after it loaded it
        workers += start_workers(workflow, scheduler_file, [second])  # node b joins mid-run
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output
        assert sorted(s["from"] for s in stagings(workflow)) == ["shared", "shared"], stagings(workflow)
        assert "is not asked again" in output, "node b tried node a, which failed, then the shared source"
        assert {digest for _, digest in loaded(workflow)} == {digest_of(source)}
    finally:
        stop([*workers, scheduler])


# -- edges: a cache that stays node-local and clean ------------------------------------------------


@pytest.mark.parametrize(
    "folder,message",
    [
        ("$STICKY_UNSET_FOLDER/cache", "names $STICKY_UNSET_FOLDER, which is not set on"),
        ("${STICKY_UNSET_FOLDER}", "names $STICKY_UNSET_FOLDER, which is not set on"),
        ("relative/cache", "is not an absolute folder"),
    ],
)
def test_a_cache_folder_that_is_not_node_local_is_refused_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str, message: str
):
    monkeypatch.delenv("STICKY_UNSET_FOLDER", raising=False)
    monkeypatch.chdir(tmp_path)
    with as_resident(cache_dir=folder):
        with pytest.raises(StageError, match=re.escape(f"--sticky-cache-dir {folder!r}")) as refused:
            stage(make_model(tmp_path / "model", files=1, size_mb=1))
        assert message in str(refused.value)
        assert not list(tmp_path.glob("**/sticky-cache-*")), "nothing was made in the working directory"


def test_a_cache_folder_another_user_made_first_is_named_with_its_owner(tmp_path: Path):
    base = tmp_path / "scratch"
    taken = base / f"sticky-cache-{os.getuid()}"
    taken.mkdir(parents=True, mode=0o700)
    os.chown(taken, 65534, 65534)  # nobody made it first
    with as_resident(cache_dir=str(base)):
        with pytest.raises(StageError, match="belongs to .*uid 65534.*not to you") as refused:
            stage(make_model(tmp_path / "model", files=1, size_mb=1))
        assert str(taken) in str(refused.value) and "--sticky-cache-dir" in str(refused.value)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB file system of its own (tmpfs): a cache disk too small for a 4 MiB model."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    yield mount
    staging.release_all()  # the copies' use locks are files there
    subprocess.run(["umount", str(mount)], check=True)


def test_a_copy_onto_a_full_disk_leaves_nothing_and_says_how_much_it_needs(tmp_path: Path, small_disk: Path):
    source = make_model(tmp_path / "model", files=2, size_mb=2)
    with as_resident(cache_dir=str(small_disk)):
        with pytest.raises(StageError, match="is full") as refused:
            stage(source)
        said = str(refused.value)
        assert f"{small_disk}/sticky-cache-{os.getuid()}" in said and "needs 4.0 MiB" in said, said
        cache = small_disk / f"sticky-cache-{os.getuid()}"
        assert list((cache / "partial").iterdir()) == [], "the partial copy was removed"
        assert not list((cache / "copies").iterdir())


def test_a_full_disk_while_copying_from_a_peer_blames_no_peer(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
):
    source = make_model(tmp_path / "model", files=2, size_mb=2)
    peer = "tls://198.18.0.9:4321"
    monkeypatch.setattr(staging, "peers_with", lambda version: [peer])
    monkeypatch.setattr(staging, "call_peer", lambda w, a, v, name, relative, offset: b"x" * staging.CHUNK_BYTES)
    with as_resident(cache_dir=str(small_disk), dask_worker=object()) as this:
        with pytest.raises(StageError, match="is full"):
            staging.fill(source, staging.scan(source), staging.cache_root(), "model-v1")
        assert staging._failed_peers == {} and this.events == [], "the disk here was full, not the peer at fault"


def test_a_source_that_changes_while_it_is_copied_is_refused_and_leaves_nothing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    source = make_model(tmp_path / "model", files=2, size_mb=1)
    entries = staging.scan(source)
    (source / "shard-1.bin").write_bytes(b"shorter now")  # after the scan, before the copy
    monkeypatch.setattr(staging, "scan", lambda s: entries)
    with pytest.raises(StageError, match="shard-1.bin changed while it was copied"):
        stage(source)
    root = cache / f"sticky-cache-{os.getuid()}"
    assert list((root / "partial").iterdir()) == [] and not list((root / "copies").glob("*.json"))


def test_a_damaged_manifest_counts_as_a_missing_copy(tmp_path: Path, cache: Path):
    source = make_model(tmp_path / "model", files=2, size_mb=1)
    first = stage(source)
    staging.release_all()
    manifest = first.parent.with_suffix(".json")
    manifest.write_text('{"source": "/mod')  # a crash mid-write, before fsync
    again = stage(source)
    assert again == first and (again / "shard-0.bin").read_bytes() == (source / "shard-0.bin").read_bytes()
    assert json.loads(manifest.read_text())["bytes"] == 2 * 2**20, "made again, with a whole manifest"
    staging.release_all()
    manifest.write_text("not json")
    with as_resident(cache_dir=str(cache), cache_size=0):
        staging.evict(staging.cache_root())  # evicts instead of failing
    assert not manifest.exists() and not first.parent.exists()


def test_copies_in_the_making_count_in_the_cache_size(tmp_path: Path, cache: Path):
    kept = stage(make_model(tmp_path / "kept", files=1, size_mb=2))
    staging.release_all()
    root = cache / f"sticky-cache-{os.getuid()}"
    (root / "partial" / "someone-else-1-abc").mkdir()
    (root / "partial" / "someone-else-1-abc" / "half.bin").write_bytes(b"\0" * 2**20)
    with as_resident(cache_dir=str(cache), cache_size=2 * 2**20):
        staging.evict(root)
    assert not kept.exists(), "2 MiB kept + 1 MiB in the making is above 2 MiB: the old copy goes"


def test_a_content_hash_reads_each_file_once_and_is_framed(tmp_path: Path, cache: Path):
    source = make_model(tmp_path / "model", files=3, size_mb=1)
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(str(source)):
            opened.append(args[0])

    sys.addaudithook(audit)
    copy = stage(source, hash_content=True)
    reads = list(opened)  # the hook stays for the process; nothing opens this folder again
    assert sorted(reads) == sorted(str(source / f"shard-{i}.bin") for i in range(3)), "each file read once"
    assert (copy / "shard-2.bin").read_bytes() == (source / "shard-2.bin").read_bytes()
    one, two = tmp_path / "one" / "model", tmp_path / "two" / "model"
    one.mkdir(parents=True), two.mkdir(parents=True)
    (one / "a").write_bytes(b"x"), (one / "b").write_bytes(b"y")
    (two / "a").write_bytes(b"xb\0y")  # the same bytes once names and contents run together
    assert stage(one, hash_content=True) != stage(two, hash_content=True)


def test_a_holder_is_known_once_the_scheduler_stores_its_event_with_fields_of_its_own():
    sent = {"version": "v1", "identity": None, "address": "tls://127.0.0.1:1", "node": "n", "bytes": 5}
    stored_by_the_scheduler = [{**sent, "worker": "tls://127.0.0.1:1"}]
    assert staging.announced(sent, stored_by_the_scheduler)
    assert not staging.announced(sent, [{**sent, "version": "v0", "worker": "tls://127.0.0.1:1"}])
    assert not staging.announced(sent, [])


def test_announcing_a_copy_returns_once_a_real_scheduler_lists_it(tmp_path: Path):
    from distributed import Client, LocalCluster

    # in-process, over Dask's inproc transport: no port; its HTTP server (health, no data) stops at once
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        cluster.scheduler.http_server.stop()
        worker = next(iter(cluster.workers.values()))
        with as_resident(cache_dir=str(tmp_path / "cache"), dask_worker=worker) as this:
            staging.announce_holder("v1", {"identity": None, "bytes": 5, "source": "model"})
            events = [e for _, e in client.get_events(staging.STAGE_TOPIC)]
            assert [e["version"] for e in events] == ["v1"], "the event was stored before the call returned"
            assert events[0]["worker"] == worker.address, "as stored, the event carries the scheduler's field"
            assert this.events == [], "no warning of a deadline"
