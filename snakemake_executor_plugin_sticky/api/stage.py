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
  instead, computed once per node as the files are copied under a reader's lease (a node that
  finds the files staged elsewhere in the pool takes their version, and the copy, from there).
- **Nothing half made.** A copy that fails (a full disk, a source that changes while it is read)
  leaves no file behind and says why; a damaged manifest counts as a missing copy.
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
import pwd
import re
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..wire import CACHE_DIR_ENV, STAGE_TOPIC, Staged, WorkerWarning, write_atomically
from . import resident
from .resident import StageSettings

CHUNK_BYTES = 8 * 2**20
PEER_RETRY_AFTER_S = 300.0  # a peer that failed is not asked again for this long
PEER_TIMEOUT_S = 60.0  # one chunk from a peer
PEER_POLL_S = 1.0  # a worker waiting for a reader's lease looks for a peer this often


class StageError(RuntimeError):
    """The source cannot be staged; the message names the path and why."""


PEER_PARALLEL = 2  # copies one worker serves to peers at once
_in_use: dict[str, int] = {}  # version -> open file descriptor holding a shared lock
_lock = threading.Lock()
_failed_peers: dict[str, float] = {}  # peer address -> when a copy from it failed
_client: Any = None  # this worker's client of the scheduler, for the pool's semaphores and events


def settings() -> StageSettings:
    """This worker's stage() settings (from the run's); the defaults in any other process."""
    this = resident.current()
    return this.stage_settings if this is not None else StageSettings()


def dask_worker() -> Any:
    """The Dask worker this process is, for peers and the pool's reader leases; None elsewhere."""
    this = resident.current()
    return this.dask_worker if this is not None else None


def announce(kind: type, **fields: Any) -> None:
    """Tell the run (in a resident worker; elsewhere there is no one to tell)."""
    this = resident.current()
    if this is not None:
        this.announce(kind, **fields)


def forget_pool() -> None:
    """The worker leaves its pool: its client of the scheduler goes, and what it knew of peers."""
    global _client
    if _client is not None:
        _client.close()
        _client = None
    _failed_peers.clear()


def pool_client() -> Any:
    """A client of the scheduler with the worker's own credentials (TLS), made when first needed."""
    global _client
    if _client is None:
        from distributed import Client

        worker = dask_worker()
        security = client_security(worker.security)
        _client = Client(worker.scheduler.address, security=security, set_as_default=False, timeout="60s")
    return _client


def client_security(security: Any) -> Any:
    """The worker's credentials for a client. A worker started from the command line (a batch
    job, a worker in another environment) holds them for its worker role alone; the client then
    presents the worker's certificate."""
    if security.tls_client_cert or not security.tls_worker_cert:
        return security
    from distributed.security import Security

    return Security(
        tls_ca_file=security.tls_ca_file,
        tls_client_cert=security.tls_worker_cert,
        tls_client_key=security.tls_worker_key,
        require_encryption=security.require_encryption,
    )


def stage(path: str | os.PathLike, hash_content: bool = False) -> Path:
    """A node-local path holding the same content as `path` (a file or a folder)."""
    source = Path(path).expanduser().resolve()
    started = time.time()
    entries = scan(source)
    cache = cache_root()
    version, origin = identity_of(source, entries), "cache"
    if hash_content:
        version, origin = known_version(cache, version) or stage_hashed(source, entries, cache, version)
    done = cache / "copies" / f"{version}.json"
    hold(cache, version)  # first: an eviction that began before it has finished by now, and none starts
    manifest = read_manifest(done)
    if manifest is None:
        with file_lock(cache / "locks" / f"{version}.lock"):  # other workers of the node wait here
            manifest = read_manifest(done)
            if manifest is None:  # missing, or damaged: made (again)
                origin = fill(source, entries, cache, version)
                manifest = read_manifest(done) or {"bytes": sum(size for _, size, _ in entries)}
    copy_s = manifest.get("copy_seconds", 0.0) if origin != "cache" else 0.0
    os.utime(done)  # last used: the cache evicts the least recently used first
    if origin != "cache":
        evict(cache)
    announce(
        Staged,
        source=str(source),
        origin=origin,
        bytes=manifest["bytes"],
        seconds=round(time.time() - started, 3),
        copy_seconds=round(copy_s, 3),
        stage_started=started,
    )
    return cache / "copies" / version / source.name


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


def identity_of(source: Path, entries: list[tuple[str, int, int]]) -> str:
    """The version's name from what a `stat` tells: the source's path and kind, and its files'
    paths, sizes and modification times."""
    kind = "file" if source.is_file() else "folder"
    identity = hashlib.sha256(json.dumps([kind, str(source), entries]).encode()).hexdigest()[:24]
    return f"{source.name[:40]}-{identity}"


def known_version(cache: Path, identity: str) -> Optional[tuple[str, str]]:
    """The content version this node found for `identity` before, if any."""
    try:
        version = (cache / "hashes" / identity).read_text().strip()
    except FileNotFoundError:
        return None
    return (version, "cache") if version else None


def stage_hashed(source: Path, entries: list[tuple[str, int, int]], cache: Path, identity: str) -> tuple[str, str]:
    """The content version of the source (`hash_content=True`), found once per node: from a node
    that staged the same files (its copy is fetched next), or by hashing the files as they are
    copied from the shared source, under a reader's lease, so they are read once."""
    with file_lock(cache / "locks" / f"{identity}.lock"):
        known = known_version(cache, identity)
        if known is not None:
            return known
        lease = SourceLease(source)
        while True:
            version = version_from_peers(identity)
            if version is None and lease.acquire(timeout=PEER_POLL_S):
                try:
                    version = version_from_peers(identity)
                    if version is None:
                        version = copy_hashed(source, entries, cache, identity)
                        write_atomically(cache / "hashes" / identity, version)
                        return version, "shared"
                finally:
                    lease.release()
            if version is not None:
                write_atomically(cache / "hashes" / identity, version)
                return version, "cache"


def copy_hashed(source: Path, entries: list[tuple[str, int, int]], cache: Path, identity: str) -> str:
    """Copy the source from the shared file system, hashing it on the way; put the copy in place
    under its content version unless the node has that version already. Returns the version."""
    partial = new_partial(cache, identity)
    try:
        with disk_errors(cache, source, entries):
            digest, copy_s = timed(lambda: copy_from_source(source, entries, partial / source.name, hashing=True))
        version = f"{source.name[:40]}-sha256-{digest[:24]}"
        hold(cache, version)
        with file_lock(cache / "locks" / f"{version}.lock"):
            if read_manifest(cache / "copies" / f"{version}.json") is None:
                finish(cache, version, partial, source, entries, ("shared", copy_s), identity)
        return version
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # what is left of it: nothing once in place


# -- the cache ----------------------------------------------------------------------------------


def cache_root() -> Path:
    """This user's folder of copies on this node: `--sticky-cache-dir` (with $VARS and ~ expanded
    here), else $STICKY_CACHE_DIR, else the temporary folder ($TMPDIR); a subfolder only the user
    can enter."""
    configured = settings().cache_dir
    if configured:
        base = node_local(configured, "--sticky-cache-dir")
    elif os.environ.get(CACHE_DIR_ENV):
        base = node_local(os.environ[CACHE_DIR_ENV], f"${CACHE_DIR_ENV}")
    else:
        base = tempfile.gettempdir()
    root = Path(base) / f"sticky-cache-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = root.stat()
    if info.st_uid != os.getuid():
        raise StageError(
            f"stage(): the cache folder {root} belongs to {user_name(info.st_uid)}, not to you: another user "
            "made it first. Give a folder of your own with --sticky-cache-dir (e.g. '/local/scratch/$USER')."
        )
    if info.st_mode & 0o077:
        raise StageError(f"stage(): the cache {root} must be private to you (chmod 700 {root}).")
    for sub in ("copies", "partial", "locks", "hashes"):
        (root / sub).mkdir(exist_ok=True, mode=0o700)
    return root


def node_local(folder: str, setting: str) -> str:
    """The cache's folder with $VARS and ~ expanded on this node; StageError when a variable is
    not set here or the folder is not absolute (it would be one folder in the shared working
    directory for every node)."""
    expanded = os.path.expanduser(os.path.expandvars(folder))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise StageError(
            f"stage(): {setting} {folder!r} names ${unset.group(1)}, which is not set on {socket.gethostname()}. "
            f"Set it where the workers start (--sticky-prologue 'export {unset.group(1)}=/local/scratch'), or "
            "give an absolute node-local folder."
        )
    if not os.path.isabs(expanded):
        raise StageError(
            f"stage(): {setting} {folder!r} is not an absolute folder: the copies must be node-local, and a "
            "relative folder is one folder in the shared working directory for every node. Give an absolute "
            "node-local folder, such as /local/scratch or '$TMPDIR' where jobs have one."
        )
    return expanded


def user_name(uid: int) -> str:
    """A user as a message names them."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


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


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """A copy's manifest; None when it is missing or damaged (then the copy counts as missing)."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("bytes"), int) else None


def evict(cache: Path) -> None:
    """Beyond --sticky-cache-size, remove the least recently used copies that no process uses.
    Copies being made (`partial/`) count too; a copy whose manifest is damaged goes first."""
    limit = settings().cache_size
    if limit is None:
        return
    with file_lock(cache / "locks" / "evict.lock"):  # one eviction at a time on the node
        sizes: dict[Path, tuple[float, int]] = {}
        for manifest in (cache / "copies").glob("*.json"):
            try:
                used = manifest.stat().st_mtime
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
            known = read_manifest(manifest)
            size = known["bytes"] if known is not None else disk_usage(cache / "copies" / manifest.name[:-5])
            sizes[manifest] = (used if known is not None else 0.0, size)
        total = sum(size for _, size in sizes.values()) + disk_usage(cache / "partial")
        for manifest in sorted(sizes, key=lambda p: sizes[p][0]):
            if total <= limit:
                return
            total -= evict_one(cache, manifest, sizes[manifest][1])


def disk_usage(folder: Path) -> int:
    """Bytes of the files below `folder` (0 when it is gone)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total


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


def fill(source: Path, entries: list[tuple[str, int, int]], cache: Path, version: str) -> str:
    """Make the copy (this process holds the version's node lock): from a node that has it, else
    from the shared source, under one of the pool's reader leases. While waiting for a lease it
    looks for a node that has the copy by now. Returns where the copy came from. A copy that
    fails leaves nothing behind."""
    for stale in (cache / "partial").glob(f"{version}-*"):  # a copy killed halfway
        shutil.rmtree(stale, ignore_errors=True)
    partial = new_partial(cache, version)
    target = partial / source.name
    lease = SourceLease(source)
    try:
        with disk_errors(cache, source, entries):
            while True:
                copied = timed(lambda: from_a_peer(version, source, entries, target))
                if copied[0] is not None:
                    break
                if lease.acquire(timeout=PEER_POLL_S):
                    try:
                        copied = timed(lambda: from_a_peer(version, source, entries, target))
                        if copied[0] is None:
                            copied = timed(lambda: copy_from_source(source, entries, target) or "shared")
                        # done, and known to the pool, before the next reader may start
                        finish(cache, version, partial, source, entries, copied)
                        return str(copied[0])
                    finally:
                        lease.release()
            finish(cache, version, partial, source, entries, copied)
            return str(copied[0])
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone once renamed into place


def timed(copy: Callable[[], Optional[str]]) -> tuple[Optional[str], float]:
    """What a copy returns (where it came from, or its digest), and the seconds it took."""
    began = time.monotonic()
    origin = copy()
    return origin, time.monotonic() - began


def new_partial(cache: Path, name: str) -> Path:
    """A private folder in which a copy is made before it is renamed into place."""
    partial = cache / "partial" / f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
    partial.mkdir(mode=0o700)
    return partial


@contextmanager
def disk_errors(cache: Path, source: Path, entries: list[tuple[str, int, int]]) -> Iterator[None]:
    """A full disk (or quota) while copying becomes a StageError that says so, names the cache
    and says how much the copy needs."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        needed = sum(size for _, size, _ in entries)
        free = shutil.disk_usage(cache).free
        raise StageError(
            f"stage(): the disk of the cache {cache} is full: {source} needs {format_bytes(needed)}, and "
            f"{format_bytes(free)} are free there. Free space there, lower --sticky-cache-size so that older "
            "copies go, or point --sticky-cache-dir at a larger node-local disk."
        ) from e


def format_bytes(n: int) -> str:
    """A size as a message gives it."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def finish(
    cache: Path,
    version: str,
    partial: Path,
    source: Path,
    entries: list[tuple[str, int, int]],
    copied: tuple[Optional[str], float],
    identity: Optional[str] = None,
) -> None:
    """Put the copy in place (a rename: a copy killed before this never counts), then say so.
    `copied`: where the copy came from, and the seconds the copy itself took."""
    shutil.rmtree(cache / "copies" / version, ignore_errors=True)  # what an eviction left half removed
    os.rename(partial, cache / "copies" / version)
    manifest = {
        "source": str(source),
        "files": entries,
        "bytes": sum(size for _, size, _ in entries),
        "created": time.time(),
        "from": copied[0],
        "copy_seconds": round(copied[1], 3),
        "identity": identity,
    }
    write_atomically(cache / "copies" / f"{version}.json", json.dumps(manifest))
    announce_holder(version, manifest)


def copy_from_source(
    source: Path, entries: list[tuple[str, int, int]], target: Path, hashing: bool = False
) -> Optional[str]:
    """Copy the source's files from the shared file system, keeping their modification times,
    each checked against the size the scan found. With `hashing`, the hex digest of the content,
    framed by kind, paths and sizes so that two different sources never share it."""
    digest = hashlib.sha256(b"file\0" if source.is_file() else b"folder\0") if hashing else None
    for relative, size, _ in entries:
        origin = source if source.is_file() else source / relative
        destination = target if source.is_file() else target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if digest is not None:
            name = relative.encode()
            digest.update(len(name).to_bytes(8, "big") + name + size.to_bytes(8, "big"))
        copied = copy_file(origin, destination, digest)
        if copied != size:
            raise StageError(
                f"stage(): {origin} changed while it was copied ({copied} bytes copied, {size} when it was "
                "scanned). Stage it once it no longer changes."
            )
        shutil.copystat(origin, destination)
    return None if digest is None else digest.hexdigest()


def copy_file(origin: Path, destination: Path, digest: Any = None) -> int:
    """Copy one file (hashing it on the way when `digest` is given); the bytes copied."""
    if digest is None:
        shutil.copyfile(origin, destination)
        return destination.stat().st_size
    copied = 0
    with open(origin, "rb") as f, open(destination, "wb") as out:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
            out.write(block)
            copied += len(block)
    return copied


class SourceLease:
    """One of the --sticky-stage-readers leases of the pool for reading a source from the shared
    file system: a Dask semaphore in the scheduler; with no engine, a lock of this node."""

    def __init__(self, source: Path):
        self.name = "sticky-stage-" + hashlib.sha256(str(source).encode()).hexdigest()[:16]
        self.semaphore: Any = None
        self.fd: Optional[int] = None

    def acquire(self, timeout: float) -> bool:
        """Take a lease within `timeout` seconds; False when none came free."""
        if dask_worker() is not None:
            from distributed import Semaphore

            if self.semaphore is None:
                client = pool_client()
                self.semaphore = Semaphore(
                    max_leases=settings().readers, name=self.name, scheduler_rpc=client.scheduler, loop=client.loop
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


ANNOUNCE_WAIT_S = 10.0  # how long a holder waits for the scheduler to know its copy


def announce_holder(version: str, manifest: dict[str, Any]) -> None:
    """Tell the pool this worker holds the version; return once the scheduler knows it, so that
    the next reader finds it. Should the scheduler not know it in time, say so: the next reader
    may then copy from the shared source instead of from this worker."""
    worker = dask_worker()
    if worker is None:
        return
    event = {
        "version": version,
        "identity": manifest.get("identity"),
        "address": worker.address,
        "node": node_name(),
        "bytes": manifest["bytes"],
    }
    worker.log_event(STAGE_TOPIC, event)
    client = pool_client()
    deadline = time.monotonic() + ANNOUNCE_WAIT_S
    while not announced(event, [e for _, e in client.get_events(STAGE_TOPIC)]):
        if time.monotonic() >= deadline:
            announce(
                WorkerWarning,
                text=f"stage(): the scheduler did not list this worker's copy of {manifest.get('source')} "
                f"within {ANNOUNCE_WAIT_S:g} s; other nodes may read it from the shared source instead.",
            )
            return
        time.sleep(0.02)


def announced(sent: dict[str, Any], stored: list[dict[str, Any]]) -> bool:
    """Whether the scheduler stores the event: it adds fields of its own (the sending `worker`),
    so a stored event holds every field that was sent, and maybe more."""
    return any(all(event.get(key) == value for key, value in sent.items()) for event in stored)


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
            and now - _failed_peers.get(address, 0.0) > PEER_RETRY_AFTER_S
        ):
            found.append(address)
    return found


def version_from_peers(identity: str) -> Optional[str]:
    """The content version a node of the pool found for the same files (`hash_content=True`)."""
    if dask_worker() is None:
        return None
    for _, event in pool_client().get_events(STAGE_TOPIC):
        if event.get("identity") == identity and event.get("version"):
            return str(event["version"])
    return None


class PeerError(RuntimeError):
    """A peer could not serve a chunk (a failure of the peer or the network, not of this node)."""


def from_a_peer(version: str, source: Path, entries: list[tuple[str, int, int]], target: Path) -> Optional[str]:
    """Copy the version from a worker of another node that holds it, in chunks over the engine's
    connections; None when no peer has it or every one failed (they are not asked again for a
    while). A failure here (a full disk) is raised, and blames no peer."""
    worker = dask_worker()
    if worker is None:
        return None
    for address in peers_with(version):
        try:
            copy_from_peer(worker, address, version, source, entries, target)
            return f"peer {address}"
        except PeerError as e:
            _failed_peers[address] = time.time()
            announce(
                WorkerWarning,
                text=f"stage(): copying {source.name} from {address} failed ({e}); it is not asked again for "
                f"{PEER_RETRY_AFTER_S:.0f} s.",
            )
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    return None


def copy_from_peer(
    worker: Any, address: str, version: str, source: Path, entries: list[tuple[str, int, int]], target: Path
) -> None:
    """Every file of the copy from one peer; PeerError for what the peer or the network did."""
    for relative, size, mtime in entries:
        destination = target if source.is_file() else target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(destination, "wb") as out:
            for offset in range(0, max(size, 1), CHUNK_BYTES):
                try:
                    chunk = call_peer(
                        worker, address, version, source.name, relative if source.is_dir() else "", offset
                    )
                except Exception as e:
                    raise PeerError(f"{type(e).__name__}: {e}") from e
                out.write(chunk)
        if destination.stat().st_size != size:
            raise PeerError(f"{relative}: {destination.stat().st_size} bytes from the peer, {size} expected")
        os.utime(destination, ns=(time.time_ns(), mtime))


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
        _serving = asyncio.Semaphore(PEER_PARALLEL)
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
