"""torch's default generator, per invocation side by side (`slots` above 1).

torch draws from one generator per process and device. With `slots: 1` it is put back after
each invocation (libraries.py), so `torch.manual_seed(i)` then a draw gives a fresh job's
numbers. Side by side two scripts would draw from the one generator in turns. So there, a script
that seeds torch (`torch.manual_seed`, `torch.seed`, `torch.set_rng_state`) gets a CPU generator
of its own, and its thread draws from it: a torch function mode, which belongs to the thread,
hands that generator to every random function on the CPU that takes one (`torch.rand`,
`randn`, `randint`, `randperm`, `normal`, `bernoulli`, `multinomial`, `poisson`, the in-place
`uniform_` and kin, `torch.nn.init`). The mode is entered only by scripts that seed, so other
invocations and the template pay nothing. What takes no generator (dropout) and the GPU's
generators stay the process's.
"""

from __future__ import annotations

import threading
import types
from typing import Any, Callable

from .context import InvocationContext, current

RANDOM = frozenset(
    ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson")
    + ("uniform_", "normal_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_", "bernoulli_")
    + ("uniform", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
    + ("orthogonal_", "sparse_")
)


def _on_cpu(torch: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the call draws on the CPU: its tensor is there, or it makes one there."""
    first = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
    if isinstance(first, torch.Tensor):
        return first.device.type == "cpu"
    device = kwargs.get("device")
    if device is None:
        return torch.get_default_device().type == "cpu"
    return torch.device(device).type == "cpu"


def _mode(torch: Any, generator: Any) -> Any:
    from torch.overrides import TorchFunctionMode

    class OwnGenerator(TorchFunctionMode):
        """The invocation's thread draws from its own generator."""

        def __torch_function__(self, func: Any, types_: Any, args: tuple = (), kwargs: Any = None) -> Any:
            kwargs = dict(kwargs or {})
            if getattr(func, "__name__", "") in RANDOM and kwargs.get("generator") is None:
                if _on_cpu(torch, args, kwargs):
                    kwargs["generator"] = generator
            return func(*args, **kwargs)

    return OwnGenerator()


def own_generator(torch: Any, context: InvocationContext) -> Any:
    """The invocation's own generator, its thread drawing from it from now on."""
    generator = context.generators.get("torch")
    if generator is None:
        generator = context.generators["torch"] = torch.Generator()
        mode = _mode(torch, generator)
        mode.__enter__()
        context.generators["torch mode"] = (mode, threading.get_ident())
    return generator


def _seeding(torch: Any, real: Callable, method: str) -> Callable:
    def seeding(*args: Any, **kwargs: Any) -> Any:
        context = current()
        if context is None or context.slots == 1 or not context.owns_caller():
            return real(*args, **kwargs)
        generator = own_generator(torch, context)
        result = getattr(generator, method)(*args, **kwargs)
        return generator if method == "manual_seed" else result

    seeding.__name__, seeding.__doc__ = real.__name__, real.__doc__
    return seeding


def _reading(real: Callable, method: str) -> Callable:
    def reading(*args: Any, **kwargs: Any) -> Any:
        context = current()
        generator = None if context is None else context.generators.get("torch")
        return real(*args, **kwargs) if generator is None else getattr(generator, method)(*args, **kwargs)

    reading.__name__, reading.__doc__ = real.__name__, real.__doc__
    return reading


SEEDING = {"manual_seed": "manual_seed", "seed": "seed", "set_rng_state": "set_state"}
READING = {"get_rng_state": "get_state", "initial_seed": "initial_seed"}


def route(torch: Any) -> Callable[[], None]:
    """Route torch's seeding and reading of its default generator per invocation; the undo."""
    saved: list[tuple[types.ModuleType, str, Any]] = []
    for module in (torch, torch.random):
        for name, method in SEEDING.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _seeding(torch, getattr(module, name), method))
        for name, method in READING.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _reading(getattr(module, name), method))
    return lambda: [setattr(m, n, v) for m, n, v in saved]


def end(context: InvocationContext) -> None:
    """Leave the invocation's generator, in the thread that entered it (a thread the script
    started that seeded torch has ended, and its modes with it)."""
    entered = context.generators.pop("torch mode", None)
    if entered is not None and entered[1] == threading.get_ident():
        entered[0].__exit__(None, None, None)
