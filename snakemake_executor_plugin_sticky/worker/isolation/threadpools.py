"""The rule's `threads` for the thread pools of torch and the BLAS libraries, with `slots: 1`.

In a job Snakemake starts, torch, OpenBLAS and MKL size their pools from `OMP_NUM_THREADS` and its
kin, which Snakemake sets to the rule's `threads`, as the process first loads them. In a resident
worker they are loaded once, so with one invocation at a time its pools are set to its rule's
`threads` as it begins and put back as it ends. What the template set stays the template's: a
template whose code called `torch.set_num_threads` (in `setup`, as a fresh job's setup would
after the variables were read) keeps its count. With `slots` above 1 the pools are the
process's, shared by neighbours: the template sizes them.

BLAS pools are reached through threadpoolctl. Its controller scans the loaded libraries (about a
millisecond), so it is made again only when modules were loaded since.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable, Optional

from threadpoolctl import ThreadpoolController

from .context import current

_pinned = False  # torch.set_num_threads was called by the template's code (not a script's)


def _watch_set_num_threads(torch: Any) -> None:
    """Note the template's calls of `torch.set_num_threads` from now on."""
    original = torch.set_num_threads
    if getattr(original, "__sticky_watch__", False):
        return

    def set_num_threads(count: int) -> None:
        global _pinned
        if current() is None:
            _pinned = True
        original(count)

    set_num_threads.__sticky_watch__ = True  # type: ignore[attr-defined]
    set_num_threads.__wrapped__ = original  # type: ignore[attr-defined]
    set_num_threads.__doc__ = original.__doc__
    torch.set_num_threads = set_num_threads


def set_torch_threads(torch: Any, count: int) -> None:
    """Set torch's count as the isolation does: not the template's call."""
    getattr(torch.set_num_threads, "__wrapped__", torch.set_num_threads)(count)


class _ThenWatch(importlib.abc.Loader):
    """torch's own loader, then the watch of its thread count."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _watch_set_num_threads(module)


class TorchFinder(importlib.abc.MetaPathFinder):
    """Finds torch as the other finders do, to watch it once it is loaded, whoever imports it."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenWatch(spec.loader)
        return spec


def install() -> Callable[[], None]:
    """Watch torch's thread count from now on (before the template's setup runs); the undo."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _watch_set_num_threads(torch)
    sys.meta_path.insert(0, TorchFinder)  # type: ignore[arg-type]
    return lambda: sys.meta_path.remove(TorchFinder) if TorchFinder in sys.meta_path else None  # type: ignore[arg-type]


class ThreadPools:
    """Sizes the pools to an invocation's `threads` and puts them back (slots 1)."""

    def __init__(self) -> None:
        self._controller: Any = None
        self._modules = 0
        self._saved: list[tuple[Any, int]] = []

    def begin(self, threads: int, torch: Optional[Any]) -> None:
        """Size torch's pool (unless the template set it) and the BLAS pools to `threads`."""
        if torch is not None and not _pinned and torch.get_num_threads() != threads:
            set_torch_threads(torch, threads)  # put back with torch's other settings (libraries.py)
        for pool in self._blas():
            count = pool.num_threads
            if count != threads:
                self._saved.append((pool, count))
                pool.set_num_threads(threads)

    def end(self) -> None:
        """Put the BLAS pools back as they were."""
        while self._saved:
            pool, count = self._saved.pop()
            pool.set_num_threads(count)

    def _blas(self) -> list[Any]:
        if "numpy" not in sys.modules and "scipy" not in sys.modules:
            return []
        if self._controller is None or self._modules != len(sys.modules):
            self._controller = ThreadpoolController().select(user_api="blas")
            self._modules = len(sys.modules)
        return list(self._controller.lib_controllers)
