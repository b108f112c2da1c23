"""Modules of the workflow's own folders, and `__main__`, are each invocation's own.

In a fresh job a script's `import helper` runs `helper.py` anew, and two scripts in different
folders each get their own `helper`. In a resident worker the installed packages (torch,
transformers, what the template imports) stay loaded, which is what makes an invocation cheap;
modules found in the workflow's folders do not: each invocation loads its own copies, which end
with it. `sys.modules` holds a router under each such name (and under `__main__`) that answers
with the calling thread's invocation's module, so pickling a function defined in a script or a
helper (`multiprocessing.Pool.map(f, ...)`) finds it; a child forked by the script keeps the
invocation, and a child that starts Python anew runs the script's file with its preamble, as a
child of a fresh job does.
"""

from __future__ import annotations

import ast
import builtins
import importlib.machinery
import importlib.util
import multiprocessing.spawn
import os
import pickle
import sys
import threading
import types
from importlib._bootstrap import _calc___package__, _handle_fromlist, _resolve_name  # type: ignore
from typing import Any, Callable, Optional

from .context import InvocationContext, current

_real_import = __import__
_PREFIXES = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
_published: dict[str, int] = {}  # names routed in sys.modules: how many invocations hold one
_lock = threading.Lock()
_worker_main: Optional[types.ModuleType] = None


class RoutedModule(types.ModuleType):
    """A name in `sys.modules` whose module is the calling invocation's own."""

    def __getattribute__(self, attr: str) -> Any:
        return getattr(_target(self), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(_target(self), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(_target(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_target(self))

    def __repr__(self) -> str:
        name = types.ModuleType.__getattribute__(self, "__name__")
        return f"<module {name!r}, each invocation's own>"


def _target(proxy: RoutedModule) -> types.ModuleType:
    name = types.ModuleType.__getattribute__(proxy, "__name__")
    context = current()
    if name == "__main__":
        return _worker_main if context is None else context.main  # type: ignore[return-value]
    if context is not None:
        module = context.modules.get(name)
        if module is None and find_own(context, name.partition(".")[0]) is not None:
            module = load_own(context, name)
        if module is not None:
            return module
    raise AttributeError(f"module {name!r} belongs to the workflow: each invocation has its own; this thread runs none")


def is_own_file(path: str, roots: tuple[str, ...]) -> bool:
    """Whether a module file lies in the workflow's folders, outside any installed environment."""
    path = os.path.realpath(path)
    if not path.startswith(roots) or path.startswith(_PREFIXES):
        return False
    parts = path.split(os.sep)
    return not any(p in ("site-packages", "dist-packages", ".snakemake") for p in parts)


def find_own(context: InvocationContext, top: str) -> Any:
    """The spec of top-level module `top` if the invocation loads it as its own, else None."""
    found = context.found.get(top, False)
    if found is False:
        found = None
        entry = sys.modules.get(top)
        if top != "__main__" and (entry is None or type(entry) is RoutedModule):
            spec = importlib.machinery.PathFinder.find_spec(top, context.path)
            if spec is not None and is_own_file(_location(spec), context.roots):
                found = spec
        context.found[top] = found
    return found


def _location(spec: Any) -> str:
    if spec.origin and spec.has_location:
        return spec.origin
    return next(iter(spec.submodule_search_locations or []), "")


def load_own(context: InvocationContext, fullname: str) -> types.ModuleType:
    """The invocation's own module `fullname` (and its parents), loaded on first use."""
    module = context.modules.get(fullname)
    if module is not None:
        return module
    parent_name, _, child = fullname.rpartition(".")
    parent = load_own(context, parent_name) if parent_name else None
    if parent is None:
        spec = find_own(context, fullname)
    elif hasattr(parent, "__path__"):
        spec = importlib.machinery.PathFinder.find_spec(fullname, list(parent.__path__))
    else:
        raise ModuleNotFoundError(f"No module named {fullname!r}; {parent_name!r} is not a package", name=fullname)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
    module = importlib.util.module_from_spec(spec)
    module.__builtins__ = context.builtins  # type: ignore[attr-defined]
    context.modules[fullname] = module
    if spec.has_location and spec.origin:
        context.files.add(spec.origin)
    _publish(fullname)
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        del context.modules[fullname]
        _unpublish(fullname)
        raise
    if parent is not None:
        setattr(parent, child, module)
    return module


def invocation_import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> types.ModuleType:
    """`__import__` of an invocation's script and own modules."""
    context = current()
    absolute = name
    if context is not None and level:
        package = _calc___package__(globals if globals is not None else {})
        absolute = _resolve_name(name, package, level) if package in context.modules else ""
    top = absolute.partition(".")[0]
    if context is None or not top or (top not in context.modules and find_own(context, top) is None):
        module = _real_import(name, globals, locals, fromlist, level)
        for hook in IMPORT_HOOKS:
            hook()
        return module
    module = load_own(context, absolute)
    if not fromlist:
        if level == 0:
            return context.modules[top]
        if not name:
            return module
        cut = len(name) - len(name.partition(".")[0])
        return context.modules[module.__name__[: len(module.__name__) - cut]]
    if hasattr(module, "__path__"):
        return _handle_fromlist(module, fromlist, lambda n: load_own(context, n))
    return module


# Called after each import of an installed module by a script (see libraries.py).
IMPORT_HOOKS: list[Callable[[], None]] = []


class OwnModuleFinder:
    """Finds the invocation's own modules for `importlib.import_module` and the like."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        """A spec whose loader loads the invocation's own module, or None."""
        context = current()
        if context is None:
            return None
        top = fullname.partition(".")[0]
        if top not in context.modules and find_own(context, top) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _OwnLoader(context))


class _OwnLoader:
    def __init__(self, context: InvocationContext) -> None:
        self.context = context

    def create_module(self, spec: Any) -> types.ModuleType:
        load_own(self.context, spec.name)
        return sys.modules[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # loaded by create_module


def _publish(name: str) -> None:
    with _lock:
        if type(sys.modules.get(name)) is not RoutedModule:
            sys.modules[name] = RoutedModule(name)
        _published[name] = _published.get(name, 0) + 1


def _unpublish(name: str) -> None:
    with _lock:
        left = _published.get(name, 1) - 1
        if left:
            _published[name] = left
            return
        _published.pop(name, None)
        if type(sys.modules.get(name)) is RoutedModule:
            del sys.modules[name]


def begin(context: InvocationContext) -> list[str]:
    """The invocation's builtins import its own modules; returns the names loaded before it."""
    context.builtins = types.ModuleType("builtins")
    context.builtins.__dict__.update(vars(builtins))
    context.builtins.__dict__["__import__"] = invocation_import
    for name in ("exit", "quit"):
        if name in context.builtins.__dict__:
            context.builtins.__dict__[name] = Quitter(name)
    return list(sys.modules)


class Quitter:
    """`exit()` and `quit()` in a script: they end it with SystemExit as the site module's do, but
    leave the standard input open (the worker's, which a fresh process would close with itself)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Use {self.name}() or Ctrl-D (i.e. EOF) to exit"

    def __call__(self, code: Any = None) -> None:
        raise SystemExit(code)


def end(context: InvocationContext, before: list[str]) -> None:
    """Forget the invocation's own modules, and those of the workflow's folders loaded by hand
    into `sys.modules` meanwhile (`spec.loader.exec_module` after `sys.modules[name] = m`)."""
    for name in context.modules:
        _unpublish(name)
    context.modules.clear()
    if len(sys.modules) != len(before):
        known = set(before)
        for name in [n for n in list(sys.modules) if n not in known]:
            module = sys.modules.get(name)
            path = getattr(module, "__file__", None) if type(module) is not RoutedModule else None
            if path and is_own_file(path, context.roots):
                sys.modules.pop(name, None)
    if context.script_copy and context.cleanup_script:
        try:
            os.remove(context.script_copy)
        except FileNotFoundError:
            pass


def spawn_main(context: InvocationContext) -> str:
    """The main a spawned or forkserver child runs: the script's copy; where the invocation has an
    environment of its own (slots above 1), a copy of it that first makes that environment the
    child's, as a child of a fresh job inherits the job's."""
    overlay = dict(context.env_overlay) if context.slots > 1 else {}
    if not overlay:
        return context.script_copy or ""
    path = write_script_copy(context, overlay)
    context.cleanup.append(lambda: os.path.exists(path) and context.cleanup_script and os.remove(path))
    return path


def write_script_copy(context: InvocationContext, environment: Optional[dict] = None) -> str:
    """The script as Snakemake's runner writes it before it runs it: under `.snakemake/scripts`
    of the working directory, named `tmp<random>.<script's name>`, Snakemake's preamble (the
    `snakemake` object) then the script. Its path is the script's `__real_file__`, and a new
    Python started from the invocation (a spawned or forkserver child) runs it as its
    `__main__`, as in a fresh job. It goes at the invocation's end unless Snakemake runs with
    `--skip-script-cleanup`."""
    head, body = _script_parts(context.script)
    blob = pickle.dumps(context.main.__dict__["snakemake"], protocol=4)
    environ = ""
    if environment:  # a spawned child's: the invocation's variables set, its removals removed
        environ = (
            f"import os as _os; _os.environ.update({ {k: v for k, v in environment.items() if v is not None}!r}); "
            f"[_os.environ.pop(_k, None) for _k in {[k for k, v in environment.items() if v is None]!r}]; del _os; "
        )
    preamble = environ + (
        f"import sys; import pickle; snakemake = pickle.loads({blob!r}); "
        "from snakemake.logging import logger; from snakemake.iocontainers import Snakemake; "
        f"__real_file__ = __file__; __file__ = {context.main.__dict__['__file__']!r};\n"
    )
    folder = os.path.join(context.workdir, ".snakemake", "scripts")
    if folder not in _folders:
        os.makedirs(folder, exist_ok=True)
        _folders.add(folder)
    content = head + preamble.encode() + body
    suffix = "." + os.path.basename(context.script)
    while True:
        path = os.path.join(folder, f"tmp{os.urandom(5).hex()}{suffix}")
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # one name in 2**40 taken: another
            continue
        break
    try:
        os.write(handle, content)
    finally:
        os.close(handle)
    if environment is None:
        context.script_copy = path
    return path


_folders: set[str] = set()  # `.snakemake/scripts` folders made
_parts: dict[str, tuple[tuple[float, int], bytes, bytes]] = {}
# Python 3.11's parser is not safe in several threads at once ("AST constructor recursion depth
# mismatch" when invocations side by side parse or compile their script together): one at a time.
PARSING = threading.Lock()


def _script_parts(script: str) -> tuple[bytes, bytes]:
    """The script's `from __future__` imports and its rest, which the preamble goes between;
    read once per version of the file."""
    stat = os.stat(script)
    version = (stat.st_mtime, stat.st_size)
    cached = _parts.get(script)
    if cached is None or cached[0] != version:
        with PARSING:
            cached = _parts.get(script)
            if cached is None or cached[0] != version:
                with open(script, encoding="utf-8") as f:
                    source = f.read()
                lines = source.splitlines(keepends=True)
                cut = _after_future_imports(source)
                cached = (version, "".join(lines[:cut]).encode(), "".join(lines[cut:]).encode())
                _parts[script] = cached
    return cached[1], cached[2]


def _after_future_imports(source: str) -> int:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return 0
    ends = [n.end_lineno or 0 for n in body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    return max(ends, default=0)


def install() -> Callable[[], None]:
    """Route `__main__` per invocation, find the invocations' own modules, and give new Pythons
    started from an invocation its script as their main; returns the undo."""
    global _worker_main
    _worker_main = sys.modules.get("__main__")
    sys.modules["__main__"] = RoutedModule("__main__")
    sys.meta_path.insert(0, OwnModuleFinder)  # type: ignore[arg-type]
    original = multiprocessing.spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        context = current()
        if context is not None and context.script_copy:
            data.pop("init_main_from_name", None)
            data["init_main_from_path"] = spawn_main(context)
        return data

    multiprocessing.spawn.get_preparation_data = preparation_data

    def undo() -> None:
        multiprocessing.spawn.get_preparation_data = original
        if OwnModuleFinder in sys.meta_path:
            sys.meta_path.remove(OwnModuleFinder)  # type: ignore[arg-type]
        if _worker_main is not None:
            sys.modules["__main__"] = _worker_main

    return undo
