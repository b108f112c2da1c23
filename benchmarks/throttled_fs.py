"""A read-only view of a folder whose reads share one bandwidth, mounted with FUSE: the shared file
system of a cluster, as many nodes reading at once see it, on one machine. Used by `make bench`
(staging section); needs FUSE (/dev/fuse, libfuse2) and the fusepy package.

    python benchmarks/throttled_fs.py SOURCE MOUNTPOINT MB_PER_S

Runs in the foreground until unmounted (umount MOUNTPOINT) or killed. Reads bypass the page cache
(direct I/O), so every read pays for its bytes.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class Throttled(Operations):
    """Passthrough of `root`, read-only; every read waits its turn on one shared budget."""

    def __init__(self, root: str, bytes_per_s: float):
        self.root = os.path.realpath(root)
        self.rate = bytes_per_s
        self._link = threading.Lock()
        self.free_at = time.monotonic()  # when the link is next free

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: int = None) -> dict:
        st = os.lstat(self._path(path))
        return {
            key: getattr(st, key)
            for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._path(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._link:  # the transfers queue on one link
            start = max(self.free_at, time.monotonic())
            self.free_at = start + size / self.rate
        delay = self.free_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict:
        st = os.statvfs(self._path(path))
        return {
            key: getattr(st, key)
            for key in (
                "f_bavail",
                "f_bfree",
                "f_blocks",
                "f_bsize",
                "f_favail",
                "f_ffree",
                "f_files",
                "f_flag",
                "f_frsize",
                "f_namemax",
            )
        }


def main() -> None:
    source, mountpoint, mb_per_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    FUSE(Throttled(source, mb_per_s * 1e6), mountpoint, foreground=True, ro=True, direct_io=True, nothreads=False)


if __name__ == "__main__":
    main()
