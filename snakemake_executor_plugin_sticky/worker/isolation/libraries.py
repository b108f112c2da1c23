"""Library state a script changes: warnings filters, the global random generators, pyplot's figures.

- `warnings.filters` is each invocation's own once its script changes it (`simplefilter("error")`),
  for the C code that reads it as for `warnings`' own functions; every invocation starts with the
  warning registries reset, so a warning shows once per job as in a fresh process.
- `random`'s module functions, and `numpy.random`'s and numpy's global RandomState itself
  (what libraries draw from), draw from a generator of the invocation's own, seeded from the
  system as a fresh process's is: `random.seed(0)` in one script decides nothing in another,
  even side by side.
- pyplot's figures (the current figure too) are each invocation's own, closed at its end.
- What only the process can hold (warnings' default action and show hooks, matplotlib's
  rcParams, the recursion limit, socket's default timeout, torch's thread count, default dtype,
  matmul precision, deterministic and backend flags, and its random generators; pandas' options
  and the verbosity of transformers, datasets and huggingface_hub) is put back when
  the invocations that overlapped have all ended: after each invocation with `slots: 1`, so each
  starts from the state the template left, as a fresh job starts from the state its setup leaves.
- torch's grad mode belongs to the thread: `torch.set_grad_enabled(False)` ends with the script.
"""

from __future__ import annotations

import copy
import random
import socket
import sys
import threading
import types
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional

from . import torchrandom
from .context import InvocationContext, current
from .logs import SharedList
from .threadpools import set_torch_threads

WARNINGS_SHARED = ("defaultaction", "showwarning", "formatwarning")


def _filters() -> property:
    def get(module: types.ModuleType) -> Any:
        context = current()
        if context is not None:
            view = context.viewed(module)
            if view is not None and "filters" in view:
                return view["filters"]
        return module.__dict__["filters"]

    def set_(module: types.ModuleType, value: Any) -> None:
        context = current()
        if context is not None:
            view = context.viewed(module)
            if (view is not None and "filters" in view) or context.owns_caller():
                own = list.__getitem__(value, slice(None)) if isinstance(value, list) else list(value)
                context.view(module)["filters"] = own
                return
        if not (isinstance(value, SharedList) and value.owner is module):
            value = SharedList(module, "filters", value)
        module.__dict__["filters"] = value

    return property(get, set_)


class InvocationWarnings(types.ModuleType):
    """The class of `warnings` in a resident worker: per-invocation filters."""

    filters = _filters()


def _install_warnings() -> Callable[[], None]:
    original = warnings.__dict__["filters"]
    warnings.__dict__["filters"] = SharedList(warnings, "filters", original)
    warnings.__class__ = InvocationWarnings

    def undo() -> None:
        warnings.__class__ = types.ModuleType
        warnings.__dict__["filters"] = list(warnings.__dict__["filters"])
        warnings._filters_mutated()  # type: ignore[attr-defined]

    return undo


def _own_generator(kind: str, make: Callable[[], Any], shared: Any) -> Any:
    """The calling thread's invocation's own generator of `kind` (made at its first draw), or the
    process's `shared` one outside invocations."""
    context = current()
    if context is None:
        return shared
    if kind not in context.generators:
        context.generators[kind] = make()
    return context.generators[kind]


def _generator(kind: str, make: Callable[[], Any], shared: Any, method: str, name: str) -> Callable:
    def draw(*args: Any, **kwargs: Any) -> Any:
        return getattr(_own_generator(kind, make, shared), method)(*args, **kwargs)

    draw.__name__ = draw.__qualname__ = name
    draw.__doc__ = getattr(shared, method).__doc__
    return draw


def _route_generator(
    modules: list[types.ModuleType], kind: str, shared: Any, make: Callable[[], Any], also: dict[str, str]
) -> Callable:
    """Route the module functions that are methods of `shared` (and those of `also`, which call
    one of its methods) to an invocation's own generator; returns the undo."""
    saved = []
    for module in modules:
        for name, value in list(vars(module).items()):
            method = name if getattr(value, "__self__", None) is shared and callable(value) else also.get(name)
            if method is not None:
                saved.append((module, name, value))
                module.__dict__[name] = _generator(kind, make, shared, method, name)
    return lambda: [m.__dict__.__setitem__(n, v) for m, n, v in saved]


def _route_global_random_state(random: types.ModuleType, shared: Any) -> Callable[[], None]:
    """numpy's global RandomState itself (`numpy.random.mtrand._rand`, what scikit-learn and
    SciPy draw from with `random_state=None`) becomes a RandomState whose every attribute is the
    calling invocation's own generator's, the one `numpy.random.seed` seeds; returns the undo."""

    class InvocationRandomState(random.RandomState):  # type: ignore[name-defined,misc]
        def __getattribute__(self, name: str) -> Any:
            return getattr(_own_generator("numpy", random.RandomState, shared), name)

    random.mtrand._rand = InvocationRandomState()
    return lambda: setattr(random.mtrand, "_rand", shared)


# numpy.random's functions that call the global RandomState's methods rather than being them
NUMPY_ALSO = {"seed": "seed", "ranf": "random_sample", "sample": "random_sample"}


class Figures:
    """`Gcf.figs` of pyplot: each invocation's own ordered figures, the process's elsewhere."""

    def __init__(self, shared: OrderedDict) -> None:
        self.shared = shared

    def mine(self) -> OrderedDict:
        """The figures of the calling thread's invocation (or of the process)."""
        context = current()
        if context is None:
            return self.shared
        return context.generators.setdefault("figures", OrderedDict())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mine(), name)

    def __contains__(self, key: Any) -> bool:
        return key in self.mine()

    def __len__(self) -> int:
        return len(self.mine())

    def __iter__(self) -> Any:
        return iter(self.mine())

    def __reversed__(self) -> Any:
        return reversed(self.mine())

    def __getitem__(self, key: Any) -> Any:
        return self.mine()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mine()[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.mine()[key]


class Libraries:
    """The library state routed per invocation, installed as the libraries get imported."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], Any]] = []
        self.numpy = False
        self.torch = False
        self.pyplot = False
        self.group = False  # invocations run: what only the process holds is kept in `saved`
        self._lock = threading.Lock()
        self.saved: dict[str, Any] = {}

    def install(self) -> Callable[[], None]:
        """Route what is loaded now; the rest as it gets imported (see `check`)."""
        self.undo.append(_install_warnings())
        shared = random._inst  # type: ignore[attr-defined]
        self.undo.append(_route_generator([random], "random", shared, random.Random, {}))
        self.check()
        return self.uninstall

    def uninstall(self) -> None:
        """Put every library back as it was."""
        while self.undo:
            self.undo.pop()()

    def check(self) -> None:
        """Route numpy's generator and pyplot's figures once they are imported."""
        with self._lock:
            self._check()

    def _check(self) -> None:
        if not self.numpy and loaded("numpy.random") is not None:
            self.numpy = True
            import numpy.random

            shared = numpy.random.mtrand._rand
            modules = [numpy.random, numpy.random.mtrand]
            self.undo.append(_route_generator(modules, "numpy", shared, numpy.random.RandomState, NUMPY_ALSO))
            self.undo.append(_route_global_random_state(numpy.random, shared))
        if not self.torch and loaded("torch") is not None:
            self.torch = True
            self.undo.append(torchrandom.route(loaded("torch")))
        if not self.pyplot and loaded("matplotlib._pylab_helpers") is not None:
            self.pyplot = True
            from matplotlib._pylab_helpers import Gcf

            figures = Gcf.figs
            Gcf.figs = Figures(figures)  # type: ignore[assignment]
            self.undo.append(lambda: setattr(Gcf, "figs", figures))
        if self.group:
            self.keep_libraries()

    def keep_libraries(self) -> None:
        """Keep the settings of matplotlib and torch as they are now, if they are loaded and not
        kept yet: at the group's start, or just after a script imported them."""
        matplotlib = loaded("matplotlib")
        if "rcParams" not in self.saved and hasattr(matplotlib, "rcParams"):
            self.saved["rcParams"] = dict(dict.items(matplotlib.rcParams))  # type: ignore[union-attr]
        torch = loaded("torch")
        if "torch" not in self.saved and torch is not None:
            self.saved["torch"] = torch_settings(torch)
        pandas_config = loaded("pandas._config.config")
        if "pandas" not in self.saved and pandas_config is not None:
            self.saved["pandas"] = copy.deepcopy(pandas_config._global_config)
        for library in VERBOSITIES:
            logging_module = loaded(f"{library}.utils.logging")
            if library not in self.saved and logging_module is not None:
                self.saved[library] = logging_module.get_verbosity()

    def first(self) -> None:
        """The first of overlapping invocations begins: keep what only the process can hold."""
        self.saved = {name: getattr(warnings, name) for name in WARNINGS_SHARED}
        self.saved["onceregistry"] = warnings.onceregistry
        warnings.onceregistry = {}  # "once" is once per job
        self.saved["recursionlimit"] = sys.getrecursionlimit()
        self.saved["timeout"] = socket.getdefaulttimeout()
        self.group = True
        self.keep_libraries()

    def last(self) -> None:
        """The last of overlapping invocations has ended: put back what only the process holds."""
        saved, self.saved, self.group = self.saved, {}, False
        for name in (*WARNINGS_SHARED, "onceregistry"):
            if name in saved:
                setattr(warnings, name, saved[name])
        if "recursionlimit" in saved and sys.getrecursionlimit() != saved["recursionlimit"]:
            sys.setrecursionlimit(saved["recursionlimit"])
        if "timeout" in saved:
            socket.setdefaulttimeout(saved["timeout"])
        self._reset_rcparams(saved.get("rcParams"))
        if "torch" in saved:
            restore_torch(loaded("torch"), saved["torch"])
        restore_options(saved)

    @staticmethod
    def _reset_rcparams(before: Optional[dict]) -> None:
        matplotlib = loaded("matplotlib")
        params = getattr(matplotlib, "rcParams", None)
        if params is None:
            return
        if before is None:  # imported meanwhile: as its import left them
            before = dict(dict.items(getattr(matplotlib, "rcParamsOrig", params)))
        for key, value in before.items():
            if key != "backend" and dict.get(params, key) is not value:
                params._set(key, value)


def loaded(name: str) -> Any:
    """The module `name` once it is imported whole: not while another thread imports it (the
    template's setup may be importing torch while an invocation begins)."""
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


# libraries whose verbosity a script sets (`transformers.logging.set_verbosity_error()`)
VERBOSITIES = ("transformers", "datasets", "huggingface_hub")


def restore_options(saved: dict[str, Any]) -> None:
    """Put pandas' options (`pd.set_option`) and the libraries' verbosities back as they were."""
    pandas_config = loaded("pandas._config.config")
    if "pandas" in saved and pandas_config is not None and pandas_config._global_config != saved["pandas"]:
        pandas_config._global_config.clear()
        pandas_config._global_config.update(saved["pandas"])
    for library in VERBOSITIES:
        logging_module = loaded(f"{library}.utils.logging")
        if library in saved and logging_module is not None and logging_module.get_verbosity() != saved[library]:
            logging_module.set_verbosity(saved[library])


def torch_settings(torch: Any) -> dict[str, Any]:
    """torch's process-wide settings a script may change (CUDA's only where it is initialised)."""
    settings = {
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
        "matmul": torch.get_float32_matmul_precision(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        settings["cuda_rng"] = torch.cuda.get_rng_state_all()
    return settings


def restore_torch(torch: Any, saved: dict[str, Any]) -> None:
    """Put torch's process-wide settings back as `torch_settings` found them."""
    now = torch_settings(torch)
    if now["threads"] != saved["threads"]:
        set_torch_threads(torch, saved["threads"])
    if now["dtype"] != saved["dtype"]:
        torch.set_default_dtype(saved["dtype"])
    if now["matmul"] != saved["matmul"]:
        torch.set_float32_matmul_precision(saved["matmul"])
    if now["deterministic"] != saved["deterministic"]:
        torch.use_deterministic_algorithms(saved["deterministic"][0], warn_only=saved["deterministic"][1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved["cudnn"]
    if not torch.equal(now["rng"], saved["rng"]):
        torch.set_rng_state(saved["rng"])
    if "cuda_rng" in saved:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def begin(context: InvocationContext) -> None:
    """A fresh process's warning registries."""
    warnings._filters_mutated()  # type: ignore[attr-defined]


def end(context: InvocationContext) -> None:
    """Close the invocation's figures, as its process's exit would."""
    figures = context.generators.get("figures")
    if figures:
        import matplotlib.pyplot as plt

        plt.close("all")
    if context.viewed(warnings) is not None:
        warnings._filters_mutated()  # type: ignore[attr-defined]
    torchrandom.end(context)
    torch = loaded("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)  # the thread's: the next invocation in it starts as a fresh one
