"""`stage(path)`: a node-local copy of a template's files (a model folder), made once per node and
content version, kept between runs, fetched from a peer instead of the shared file system.

When tens of GPUs start at once, each reading the same gigabytes from Lustre, GPFS or NFS, the
shared file system paces the whole scale-out, and every replacement or preempted worker reads
them again. `stage()` in a template's `setup` returns a path on node-local storage with the same
content:

- **Once per node and version.** The first worker of a node copies; the others wait on a file
  lock and share the copy. A copy is written aside and renamed into place, so one killed halfway
  never counts as done. It stays for later runs, until the cache outgrows `--sticky-cache-size`
  (least recently used first; a copy in use is never removed).
- **Content identity.** A version is known from the relative paths, sizes and modification times
  of the source (a `stat` of each file, never an `open`), so a current copy is reused without
  reading the source. `stage(path, hash_content=True)` names the version by a hash of the content
  instead (computed once, when copying).
- **Few readers of the shared source.** At most `--sticky-stage-readers` nodes of the pool read
  the same source at once (a Dask semaphore in the scheduler); the others wait, then copy from a
  node that has it: **peer transfer**, in chunks, over the engine's TLS connections. A peer that
  fails is not asked again for a while; with no peer, the copy comes from the shared source.

Under any other executor `stage()` works too (a node-local cache with its file lock): a
create-destroy run that stages reloads from local disk each time ("StickyI/O").
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

CHUNK_BYTES = 8 * 2**20
PEER_RETRY_AFTER_S = 300.0  # a peer that failed is not asked again for this long
PEER_TIMEOUT_S = 60.0  # one chunk from a peer
PEER_POLL_S = 1.0  # a worker waiting for a reader's lease looks for a peer this often
STAGE_TOPIC = "sticky-stage"  # Dask event topic: which worker holds which version
ENV_CACHE_DIR = "STICKY_CACHE_DIR"  # where a process that is no resident worker caches


class StageError(RuntimeError):
    """The source cannot be staged; the message names the path and why."""


@dataclass
class Config:
    """Set by a resident worker (from the --sticky-* settings); defaults elsewhere."""

    cache_dir: Optional[str] = None
    cache_size: Optional[int] = None  # bytes
    readers: int = 1
    peer_parallel: int = 2  # copies one worker serves to peers at once
    worker: Any = None  # the Dask worker, for peers and the pool-wide semaphore
    announce: Optional[Callable[[dict], None]] = None
    failed_peers: dict[str, float] = field(default_factory=dict)


_config = Config()
_in_use: dict[str, int] = {}  # version -> open file descriptor holding a shared lock
_lock = threading.Lock()


_client: Any = None  # this worker's client of the scheduler, for the pool's semaphores and events


def configure(**settings: Any) -> None:
    """Set by a resident worker from the run's settings; with no arguments, the defaults again."""
    global _config, _client
    if _client is not None:
        _client.close()
        _client = None
    _config = Config(**settings)


def pool_client() -> Any:
    """A client of the scheduler with the worker's own credentials (TLS), made when first needed."""
    global _client
    if _client is None:
        from distributed import Client

        worker = _config.worker
        _client = Client(worker.scheduler.address, security=worker.security, set_as_default=False, timeout="60s")
    return _client


def stage(path: str | os.PathLike, hash_content: bool = False) -> Path:
    """A node-local path holding the same content as `path` (a file or a folder)."""
    source = Path(path).expanduser().resolve()
    started = time.time()
    entries = scan(source)
    cache = cache_root()
    version = version_of(source, entries, cache, hash_content)
    copy = cache / "copies" / version / source.name
    done = cache / "copies" / f"{version}.json"
    origin = "cache"
    hold(cache, version)  # first: an eviction that began before it has finished by now, and none starts
    if not done.exists():
        with file_lock(cache / "locks" / f"{version}.lock"):  # other workers of the node wait here
            if not done.exists():
                origin = fill(source, entries, cache, version, hash_content)
    os.utime(done)  # last used: the cache evicts the least recently used first
    manifest = json.loads(done.read_text())
    if origin != "cache":
        evict(cache)
    if _config.announce is not None:
        _config.announce(
            {
                "event": "staged",
                "source": str(source),
                "from": origin,
                "bytes": manifest["bytes"],
                "seconds": round(time.time() - started, 3),
                "stage_started": started,
            }
        )
    return copy


# -- the source ---------------------------------------------------------------------------------


def scan(source: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file of the source, sorted; stat only."""
    try:
        info = source.stat()
    except FileNotFoundError:
        raise StageError(f"stage(): {source} does not exist.") from None
    except PermissionError as e:
        raise StageError(f"stage(): {source} cannot be read ({e.strerror}).") from None
    if stat.S_ISREG(info.st_mode):
        check_readable(source)
        return [(source.name, info.st_size, info.st_mtime_ns)]
    if not stat.S_ISDIR(info.st_mode):
        raise StageError(f"stage(): {source} is neither a file nor a folder.")
    entries = []
    for folder, dirs, files in os.walk(source, onerror=lambda e: raise_stage_error(source, e), followlinks=True):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder, name)
            check_readable(full)
            file_info = full.stat()
            entries.append((str(full.relative_to(source)), file_info.st_size, file_info.st_mtime_ns))
    return entries


def check_readable(path: Path) -> None:
    """StageError naming the file when it cannot be read."""
    if not os.access(path, os.R_OK):
        raise StageError(f"stage(): {path} cannot be read (permission denied).")


def raise_stage_error(source: Path, error: OSError) -> None:
    """os.walk's error handler: StageError naming what cannot be read."""
    raise StageError(f"stage(): {error.filename or source} cannot be read ({error.strerror}).")


def version_of(source: Path, entries: list[tuple[str, int, int]], cache: Path, hash_content: bool) -> str:
    """The version's name: from the source's path and its files' paths, sizes and modification
    times; with `hash_content`, from the content (looked up by the former once it is known)."""
    identity = hashlib.sha256(json.dumps([str(source), entries]).encode()).hexdigest()[:24]
    if not hash_content:
        return f"{source.name[:40]}-{identity}"
    known = cache / "hashes" / identity
    if known.exists():
        return known.read_text().strip()
    digest = hashlib.sha256()
    for relative, _, _ in entries:
        digest.update(relative.encode() + b"\0")
        with open(source / relative if source.is_dir() else source, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
    version = f"{source.name[:40]}-sha256-{digest.hexdigest()[:24]}"
    write_atomically(known, version)
    return version


# -- the cache ----------------------------------------------------------------------------------


def cache_root() -> Path:
    """This user's folder of copies on this node: `--sticky-cache-dir` (with $VARS and ~ expanded
    here), else $STICKY_CACHE_DIR, else the temporary folder ($TMPDIR); a subfolder only the user
    can enter."""
    base = _config.cache_dir or os.environ.get(ENV_CACHE_DIR) or tempfile.gettempdir()
    base = os.path.expanduser(os.path.expandvars(base))
    root = Path(base) / f"sticky-cache-{os.getuid()}"
    for sub in ("", "copies", "partial", "locks", "hashes"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    info = root.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StageError(f"stage(): the cache {root} must belong to this user and be private to them (chmod 700).")
    return root


class file_lock:
    """An exclusive lock on a file, held across processes of this node."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def hold(cache: Path, version: str) -> None:
    """Mark the copy in use by this process (a shared lock, released when the process ends or
    the state is torn down): the cache never evicts it meanwhile."""
    with _lock:
        if version in _in_use:
            return
        fd = os.open(cache / "locks" / f"{version}.use", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _in_use[version] = fd


def release_all() -> None:
    """This process no longer uses its copies (its state was torn down)."""
    with _lock:
        for fd in _in_use.values():
            os.close(fd)
        _in_use.clear()


def write_atomically(path: Path, text: str) -> None:
    """Write a small file aside and rename it into place: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    partial.write_text(text)
    os.replace(partial, path)


def evict(cache: Path) -> None:
    """Beyond --sticky-cache-size, remove the least recently used copies that no process uses."""
    limit = _config.cache_size
    if limit is None:
        return
    with file_lock(cache / "locks" / "evict.lock"):  # one eviction at a time on the node
        sizes: dict[Path, tuple[float, int]] = {}
        for manifest in (cache / "copies").glob("*.json"):
            try:
                sizes[manifest] = (manifest.stat().st_mtime, json.loads(manifest.read_text()).get("bytes", 0))
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
        total = sum(size for _, size in sizes.values())
        for manifest in sorted(sizes, key=lambda p: sizes[p][0]):
            if total <= limit:
                return
            total -= evict_one(cache, manifest, sizes[manifest][1])


def evict_one(cache: Path, manifest: Path, size: int) -> int:
    """Remove one copy unless a process uses it; the bytes freed."""
    version = manifest.name[: -len(".json")]
    fd = os.open(cache / "locks" / f"{version}.use", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return 0  # in use
        try:
            manifest.unlink()  # no longer done: a process that holds it from now on makes it again
        except FileNotFoundError:
            return 0
        shutil.rmtree(cache / "copies" / version, ignore_errors=True)
        return size
    finally:
        os.close(fd)


# -- making the copy ----------------------------------------------------------------------------


def fill(source: Path, entries: list[tuple[str, int, int]], cache: Path, version: str, hash_content: bool) -> str:
    """Make the copy (this process holds the version's node lock): from a node that has it, else
    from the shared source, under one of the pool's reader leases. While waiting for a lease it
    looks for a node that has the copy by now. Returns where the copy came from."""
    for stale in (cache / "partial").glob(f"{version}-*"):  # a copy killed halfway
        shutil.rmtree(stale, ignore_errors=True)
    partial = cache / "partial" / f"{version}-{os.getpid()}-{secrets.token_hex(3)}"
    partial.mkdir(mode=0o700)
    target = partial / source.name
    lease = SourceLease(source)
    while True:
        origin = from_a_peer(version, source, entries, target)
        if origin is not None:
            break
        if lease.acquire(timeout=PEER_POLL_S):
            try:
                origin = from_a_peer(version, source, entries, target)
                if origin is None:
                    copy_from_source(source, entries, target)
                    origin = "shared"
                # done, and known to the pool, before the next reader may start
                finish(cache, version, partial, source, entries, origin, hash_content)
                return origin
            finally:
                lease.release()
    finish(cache, version, partial, source, entries, origin, hash_content)
    return origin


def finish(
    cache: Path,
    version: str,
    partial: Path,
    source: Path,
    entries: list[tuple[str, int, int]],
    origin: str,
    hash_content: bool,
) -> None:
    """Put the copy in place (a rename: a copy killed before this never counts), then say so."""
    shutil.rmtree(cache / "copies" / version, ignore_errors=True)  # what an eviction left half removed
    os.rename(partial, cache / "copies" / version)
    manifest = {
        "source": str(source),
        "files": entries,
        "bytes": sum(size for _, size, _ in entries),
        "created": time.time(),
        "from": origin,
        "hash_content": hash_content,
    }
    write_atomically(cache / "copies" / f"{version}.json", json.dumps(manifest))
    announce_holder(version, manifest)


def copy_from_source(source: Path, entries: list[tuple[str, int, int]], target: Path) -> None:
    """Copy the source's files from the shared file system, keeping their modification times."""
    if source.is_file():
        shutil.copy2(source, target)
        return
    for relative, _, _ in entries:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, destination)


class SourceLease:
    """One of the --sticky-stage-readers leases of the pool for reading a source from the shared
    file system: a Dask semaphore in the scheduler; with no engine, a lock of this node."""

    def __init__(self, source: Path):
        self.name = "sticky-stage-" + hashlib.sha256(str(source).encode()).hexdigest()[:16]
        self.semaphore: Any = None
        self.fd: Optional[int] = None

    def acquire(self, timeout: float) -> bool:
        """Take a lease within `timeout` seconds; False when none came free."""
        if _config.worker is not None:
            from distributed import Semaphore

            if self.semaphore is None:
                client = pool_client()
                self.semaphore = Semaphore(
                    max_leases=_config.readers, name=self.name, scheduler_rpc=client.scheduler, loop=client.loop
                )
            return bool(self.semaphore.acquire(timeout=timeout))
        self.fd = os.open(cache_root() / "locks" / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        """Give the lease back."""
        if self.semaphore is not None:
            self.semaphore.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- peers --------------------------------------------------------------------------------------


def node_name() -> str:
    """A node: a host and its cache folder (two cache folders on one host are two nodes)."""
    return f"{socket.gethostname()}:{cache_root()}"


def announce_holder(version: str, manifest: dict[str, Any]) -> None:
    """Tell the pool this worker holds the version; return once the scheduler knows it, so that
    the next reader finds it."""
    worker = _config.worker
    if worker is None:
        return
    event = {"version": version, "address": worker.address, "node": node_name(), "bytes": manifest["bytes"]}
    worker.log_event(STAGE_TOPIC, event)
    client = pool_client()
    deadline = time.monotonic() + 10
    while event not in [e for _, e in client.get_events(STAGE_TOPIC)] and time.monotonic() < deadline:
        time.sleep(0.05)


def peers_with(version: str) -> list[str]:
    """Workers of other nodes that hold the version and are alive, not failed lately."""
    client = pool_client()
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    here = node_name()
    now = time.time()
    found = []
    for _, event in client.get_events(STAGE_TOPIC):
        address = event.get("address")
        if (
            event.get("version") == version
            and event.get("node") != here
            and address in alive
            and address not in found
            and now - _config.failed_peers.get(address, 0.0) > PEER_RETRY_AFTER_S
        ):
            found.append(address)
    return found


def from_a_peer(version: str, source: Path, entries: list[tuple[str, int, int]], target: Path) -> Optional[str]:
    """Copy the version from a worker of another node that holds it, in chunks over the engine's
    connections; None when no peer has it or every one failed (they are not asked again for a while)."""
    worker = _config.worker
    if worker is None:
        return None
    for address in peers_with(version):
        try:
            for relative, size, _ in entries:
                destination = target if source.is_file() else target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with open(destination, "wb") as out:
                    for offset in range(0, max(size, 1), CHUNK_BYTES):
                        chunk = call_peer(
                            worker, address, version, source.name, relative if source.is_dir() else "", offset
                        )
                        out.write(chunk)
                if destination.stat().st_size != size:
                    raise StageError(f"{relative}: {destination.stat().st_size} bytes from the peer, {size} expected")
                os.utime(destination, ns=(time.time_ns(), next(m for r, _, m in entries if r == relative)))
            return f"peer {address}"
        except Exception as e:
            _config.failed_peers[address] = time.time()
            if _config.announce is not None:
                _config.announce(
                    {
                        "event": "warning",
                        "text": f"stage(): copying {source.name} from {address} failed "
                        f"({type(e).__name__}: {e}); it is not asked again for {PEER_RETRY_AFTER_S:.0f} s.",
                    }
                )
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    return None


def call_peer(worker: Any, address: str, version: str, name: str, relative: str, offset: int) -> bytes:
    """One chunk of a peer's copy, over the worker's TLS connections."""

    async def ask() -> bytes:
        return await worker.rpc(address).sticky_stage_read(
            version=version, name=name, relative=relative, offset=offset, size=CHUNK_BYTES
        )

    future = asyncio.run_coroutine_threadsafe(ask(), worker.loop.asyncio_loop)
    return future.result(PEER_TIMEOUT_S)


_serving: Optional[asyncio.Semaphore] = None


async def serve_chunk(version: str, name: str, relative: str, offset: int, size: int) -> bytes:
    """A worker's RPC handler: a chunk of a copy this node holds, for a peer. Only files inside
    a done copy are served (the caller proved the run's credentials already)."""
    global _serving
    if _serving is None:
        _serving = asyncio.Semaphore(_config.peer_parallel)
    cache = cache_root()
    for part in (version, name):
        if not part or part != Path(part).name or part.startswith("."):
            raise StageError(f"{part!r} is not a copy's name")
    if not (cache / "copies" / f"{version}.json").exists():
        raise StageError(f"this node holds no copy {version!r}")
    if offset < 0 or size <= 0:
        raise StageError(f"no chunk at offset {offset} of size {size}")
    copy = (cache / "copies" / version).resolve()
    path = (copy / name / relative).resolve() if relative else (copy / name).resolve()
    if copy not in path.parents:
        raise StageError(f"{name}/{relative} is not inside copy {version!r}")
    size = min(size, CHUNK_BYTES)
    async with _serving:  # at most peer_parallel copies served at once
        return await asyncio.to_thread(read_chunk, path, offset, size)


def read_chunk(path: Path, offset: int, size: int) -> bytes:
    """Bytes of a file of a copy, for a peer."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
