"""Context managers that change a model temporarily and always put it back.

Two mechanisms, one contract (whatever happens inside the ``with`` block, the model leaves it as it
entered):

* :func:`scaled_weights` multiplies parameters in place by masks (rows of a value projection, single
  weights of a feed-forward layer, ...) and restores the saved originals on exit. It works whatever
  attention processor or kernel the model uses, so it is the robust way to switch weights off.
* :func:`output_hooks` registers forward hooks that rewrite module outputs (needed when each sample of
  a batch gets its own mask). Forward hooks silently do not fire when a processor bypasses the hooked
  module (fused QKV projections, custom kernels), so the context counts the calls and raises
  :class:`HookNotFiredError` on exit when a forward ran but a hook never fired.

Both are generic: ``diffmem.hooks.neurons`` uses them for value-projection neurons (NeMo), and any
other kind of edit (e.g. an FFN weight mask) only has to say which parameters get which multipliers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn


class HookNotFiredError(RuntimeError):
    """A forward hook was registered, the model ran, but the hooked module was never called."""


@contextlib.contextmanager
def scaled_weights(multipliers: Mapping[nn.Parameter | torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Multiply each parameter in place by its (broadcastable) multiplier; restore the originals on exit.

    ``multipliers`` maps a parameter to a tensor broadcastable to its shape (e.g. ``[out, 1]`` to scale
    rows). The original values are copied before the change and written back in a ``finally`` block,
    so an exception inside the block cannot leave the model edited. Restoring copies the saved values
    (not a division), so a multiplier of 0 is restored exactly.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for param in multipliers:
                saved.append((param, param.detach().clone()))
        multiply_weights(multipliers)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def multiply_weights(multipliers: Mapping[nn.Parameter | torch.Tensor, torch.Tensor]) -> None:
    """Multiply each parameter in place by its (broadcastable) multiplier, for good."""
    with torch.no_grad():
        for param, mult in multipliers.items():
            param.mul_(mult.to(device=param.device, dtype=param.dtype))


class _FireCounter:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}


@contextlib.contextmanager
def output_hooks(
    modules: Mapping[str, nn.Module],
    rewrite: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    root: nn.Module | None = None,
    require_fired: bool = True,
) -> Iterator[dict[str, int]]:
    """Replace each module's output by ``rewrite(name, output)`` while the block runs; remove the hooks on exit.

    Yields a dict name -> number of calls so far. When ``root`` is given and ``require_fired`` is true,
    leaving the block after ``root`` ran a forward pass while one of the hooks never fired raises
    :class:`HookNotFiredError` naming the module (e.g. fused QKV projections bypass ``to_v``).
    """
    counter = _FireCounter()
    handles = []
    root_calls = [0]

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            counter.calls[name] = counter.calls.get(name, 0) + 1
            return rewrite(name, output)

        return hook

    try:
        for name, module in modules.items():
            counter.calls[name] = 0
            handles.append(module.register_forward_hook(make_hook(name)))
        if root is not None:
            handles.append(
                root.register_forward_pre_hook(lambda *_: root_calls.__setitem__(0, root_calls[0] + 1))
            )
        yield counter.calls
    finally:
        for handle in handles:
            handle.remove()
    if require_fired and root is not None and root_calls[0] > 0:
        silent = [name for name, n in counter.calls.items() if n == 0]
        if silent:
            raise HookNotFiredError(
                f"the model ran {root_calls[0]} time(s) but the hook(s) on {', '.join(silent[:5])}"
                f"{' ...' if len(silent) > 5 else ''} never fired: the attention processor bypasses these "
                "modules (fused projections or a custom kernel?); use mode='weight' instead"
            )
