"""The fence: a fenced attempt writes in a folder of its own (worker/task.py), and its outputs and
logs move into place only when the run accepts its result. Pure file operations, no run."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from snakemake.iocontainers import Namedlist, Snakemake

from snakemake_executor_plugin_sticky.head.fence import Fence
from snakemake_executor_plugin_sticky.wire import Invocation, InvocationResult, attempt_path
from snakemake_executor_plugin_sticky.worker.task import fenced


def invocation(tmp_path: Path, attempts: Path) -> Invocation:
    output = Namedlist(fromdict={"table": str(tmp_path / "out" / "a.tsv"), "plot": str(tmp_path / "out" / "b.png")})
    log = Namedlist(fromdict={"log": str(tmp_path / "logs" / "a.log")})
    snakemake = Snakemake(Namedlist(), output, Namedlist(), Namedlist(), 1, Namedlist(), log, {}, "r", None, "")
    return Invocation("sticky-r-1-abc", "t", "id", "tag", "r", 1, "s.py", snakemake, attempts=str(attempts))


def run_attempt(tmp_path: Path, fence: Fence, error: str | None = None, address: str = "tls://w1:1") -> tuple:
    """What a worker does: write every output and log of a fenced attempt; then the result."""
    original = invocation(tmp_path, fence.folder)
    seen, attempt = fenced(original)
    for path in [*seen.snakemake.output, *seen.snakemake.log]:
        Path(path).write_text(f"from {address}")
    result = InvocationResult(original.key, "w1", address, 1, 0.0, 1.0, error=error, extra={"attempt": attempt})
    return original, seen, result


def test_a_fenced_attempt_writes_in_its_folder_under_the_files_own_names(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original, seen, _ = run_attempt(tmp_path, fence)
    assert seen.snakemake.output.table.startswith(str(fence.folder)) and seen.snakemake.output.table.endswith("a.tsv")
    assert seen.snakemake.output.plot == seen.snakemake.output[1] and seen.snakemake.log.log.endswith("a.log")
    assert not (tmp_path / "out").exists(), "nothing in place before the head accepts the attempt"
    assert original.snakemake.output.table == str(tmp_path / "out" / "a.tsv"), "the head's invocation is unchanged"


def test_an_accepted_attempt_moves_its_outputs_and_logs_into_place_and_leaves_no_folder(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original, _, result = run_attempt(tmp_path, fence)
    _, _, late = run_attempt(tmp_path, fence, address="tls://w2:1")  # an attempt that lost the race
    assert fence.accept(original, result) is result
    assert (tmp_path / "out" / "a.tsv").read_text() == "from tls://w1:1"
    assert (tmp_path / "logs" / "a.log").read_text() == "from tls://w1:1"
    assert os.listdir(fence.folder) == [], "every attempt folder of the invocation is gone"


def test_a_failed_attempt_moves_its_logs_alone(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original, _, result = run_attempt(tmp_path, fence, error="Traceback ...")
    assert fence.accept(original, result).error == "Traceback ..."
    assert (tmp_path / "logs" / "a.log").exists() and not (tmp_path / "out" / "a.tsv").exists()


def test_a_result_of_an_invocation_given_up_on_its_worker_is_discarded(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original, _, result = run_attempt(tmp_path, fence)
    fence.worker_left("tls://w1:1", "w1", [original.key])
    outcome = fence.accept(original, result)
    assert not outcome.ok and "had given up" in outcome.error and "w1" in outcome.error
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_a_worker_that_left_after_its_invocations_finished_loses_none_of_them(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original, _, result = run_attempt(tmp_path, fence)
    fence.worker_left("tls://w1:1", "w1", [])  # preempted: it finished what it ran, then left
    assert fence.accept(original, result).ok and (tmp_path / "out" / "a.tsv").exists()
    assert list(fence.left) == ["w1"]


def test_an_attempt_that_made_a_folder_output_moves_it_whole(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original = invocation(tmp_path, fence.folder)
    seen, attempt = fenced(original)
    folder = Path(seen.snakemake.output.table)
    folder.mkdir()
    (folder / "part-0").write_text("x")
    (tmp_path / "out" / "a.tsv").mkdir(parents=True)  # a leftover Snakemake did not remove
    result = InvocationResult(original.key, "w1", "tls://w1:1", 1, 0.0, 1.0, extra={"attempt": attempt})
    assert fence.accept(original, result).ok
    assert (tmp_path / "out" / "a.tsv" / "part-0").read_text() == "x"


def test_an_invocation_without_an_attempt_is_left_as_it_is(tmp_path: Path):
    fence = Fence(tmp_path / "attempts")
    original = invocation(tmp_path, fence.folder)
    error = RuntimeError("lost")
    assert fence.accept(original, error) is error
    unfenced = invocation(tmp_path, fence.folder)
    unfenced.attempts = None
    assert fenced(unfenced) == (unfenced, None)


def test_the_path_mapping_keeps_relative_paths_below_the_attempt():
    assert attempt_path("/r/a/k.1", "out/parent/s1.json") == "/r/a/k.1/out/parent/s1.json"
    assert attempt_path("/r/a/k.1", "./out//x") == "/r/a/k.1/out/x"
    assert attempt_path("/r/a/k.1", "/data/x.bin") == "/r/a/k.1/.absolute/data/x.bin"
    outside = attempt_path("/r/a/k.1", "../up/x.txt")
    assert outside == "/r/a/k.1/.absolute" + os.path.abspath("../up/x.txt"), "never outside the attempt"
    assert attempt_path("/r/a/k.1", "/scratch/big/x.bin", beside=True) == "/scratch/big/.sticky-k.1/x.bin"


def relative_invocation(attempts: Path, outputs: dict, logs: dict) -> Invocation:
    snakemake = Snakemake(
        Namedlist(), Namedlist(fromdict=outputs), Namedlist(), Namedlist(), 1, Namedlist(),
        Namedlist(fromdict=logs), {}, "r", None, "",
    )  # fmt: skip
    return Invocation("sticky-r-1-abc", "t", "id", "tag", "r", 1, "s.py", snakemake, attempts=str(attempts))


def accepted(original: Invocation, attempt: str, fence: Fence, error: str | None = None) -> InvocationResult:
    result = InvocationResult(original.key, "w1", "tls://w1:1", 1, 0.0, 1.0, error=error, extra={"attempt": attempt})
    return fence.accept(original, result)


def test_what_a_script_derives_from_its_outputs_paths_behaves_as_in_place(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fence = Fence(tmp_path / ".snakemake" / "attempts")
    original = relative_invocation(
        fence.folder,
        {"fa": "ref/s1/genome.fa", "fai": "ref/s1/genome.fa.fai", "link": "ref/s1/latest.fa"},
        {"log": "logs/s1.log"},
    )
    seen, attempt = fenced(original)
    out = seen.snakemake.output
    assert Path(out.fa).parent.name == "s1", "the output's folder has its own name"
    Path(out.fa).write_text(">s1\nACGT\n")
    Path(out.fa + ".fai").write_text("s1\t4\n")  # samtools faidx: the index beside, by a derived path
    Path(out.fa + ".md5").write_text("x\n")  # beside it, and not declared
    os.symlink("genome.fa", out.link)  # a relative link between outputs
    Path(seen.snakemake.log.log).write_text("done\n")
    assert not (tmp_path / "ref").exists(), "nothing in place before the head accepts"
    assert accepted(original, attempt, fence).ok
    assert (tmp_path / "ref/s1/genome.fa.fai").read_text() == "s1\t4\n"
    assert (tmp_path / "ref/s1/genome.fa.md5").exists(), "what the script wrote beside its output is there too"
    assert (tmp_path / "ref/s1/latest.fa").read_text() == ">s1\nACGT\n", "the link resolves in place"
    assert (tmp_path / "logs/s1.log").read_text() == "done\n"
    assert os.listdir(fence.folder) == []


def test_a_failure_without_a_result_keeps_the_latest_attempts_log(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fence = Fence(tmp_path / ".snakemake" / "attempts")
    original = relative_invocation(fence.folder, {"out": "out/a.txt"}, {"log": "logs/a.log"})
    for text in ("first attempt\n", "last attempt\n"):
        seen, _ = fenced(original)
        Path(seen.snakemake.output.out).write_text("half")
        Path(seen.snakemake.log.log).write_text(text)
        time.sleep(0.01)  # the attempts' folders differ in age
    crash = RuntimeError("the invocation crashed its workers")
    assert fence.accept(original, crash) is crash
    assert (tmp_path / "logs/a.log").read_text() == "last attempt\n", "a crashed job's log stays, as in place"
    assert not (tmp_path / "out/a.txt").exists()
    assert os.listdir(fence.folder) == []


def test_an_output_on_another_file_system_is_written_there_and_renamed_into_place(tmp_path: Path, monkeypatch):
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(other).st_dev != os.stat(tmp_path).st_dev, "/dev/shm is a file system of its own here"
        monkeypatch.chdir(tmp_path)
        fence = Fence(tmp_path / ".snakemake" / "attempts")
        original = relative_invocation(fence.folder, {"big": str(other / "big.bin")}, {})
        seen, attempt = fenced(original)
        written = Path(seen.snakemake.output.big)
        assert written.parent.parent == other, "the attempt writes beside the output, on its file system"
        written.write_bytes(b"x" * 4096)
        inode = written.stat().st_ino
        assert accepted(original, attempt, fence).ok
        assert (other / "big.bin").stat().st_ino == inode, "accepted with a rename, not a copy"
        assert os.listdir(other) == ["big.bin"], "no attempt folder is left beside it"
    finally:
        shutil.rmtree(other)


def test_a_later_attempt_cut_off_before_it_wrote_its_log_leaves_the_log_that_was_written(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fence = Fence(tmp_path / ".snakemake" / "attempts")
    original = relative_invocation(fence.folder, {"out": "out/a.txt"}, {"log": "logs/a.log"})
    for text in ("loaded, then died\n", ""):  # the run again opened its log, then the run ended
        seen, _ = fenced(original)
        Path(seen.snakemake.log.log).write_text(text)
        time.sleep(0.01)
    crash = RuntimeError("the invocation crashed its workers")
    assert fence.accept(original, crash) is crash
    assert (tmp_path / "logs/a.log").read_text() == "loaded, then died\n"
    assert os.listdir(fence.folder) == []
