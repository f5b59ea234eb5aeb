"""The optimizers a diffmem fine-tune can use, by name: AdamW, bitsandbytes' 8-bit AdamW, and plain SGD.

``"adamw8bit"`` (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022) keeps both
Adam moments in 8 bits with per-block scales: 2 bytes of optimizer state per parameter instead of 8,
5.1 GiB less for a full fine-tune of SD-1.5's UNet (860M parameters). It needs the ``bitsandbytes``
package (``pip install 'diffmem[train8bit]'``), which runs on CUDA and, since 0.45, on the CPU.
Its state is plain tensors, so checkpoints (safetensors) and exact resumes work as with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OPTIMIZERS", "TouchedRowsAdamW", "make_optimizer"]

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    *,
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (``"adamw"``), bitsandbytes' ``AdamW8bit`` (``"adamw8bit"``) or plain SGD (``"sgd"``: no momentum,
    ``theta -= lr * (g + weight_decay * theta)``; linear in the gradient, so runs that split a step differently
    can be compared to float rounding) over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'diffmem[train8bit]'"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")


class TouchedRowsAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that updates only the rows of its ``row_sparse`` parameters (embedding tables)
    that have ever had a non-zero gradient, to the same bits as the stock optimizer.

    With weight decay 0, AdamW leaves a row whose gradient and both moments are all zero exactly as it
    is (both moments stay 0 and the step is ``0 / (0 + eps) = 0``), so skipping it changes nothing; the
    rows that were ever touched go through the stock single-tensor update, gathered into a smaller
    tensor, and are written back. A text encoder's token embedding is the case: organism v4's 49,408 x
    128 table is 47 % of the parameters it trains, and its captions touch 272 rows (at step 5,000), so
    the stock update spent about half its time, and two 25 MB temporaries a step, on rows it never
    changes. The state (full-size moments) and its ``state_dict`` are the stock optimizer's, so
    checkpoints of either resume in the other. The first step of a fresh run is the stock (dense) one.
    """

    def __init__(self, params, lr: float = 1e-3, *, row_sparse=(), **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self._row_sparse = list(row_sparse)
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for p in self._row_sparse:
            if id(p) not in known or p.dim() < 2:
                raise ValueError("row_sparse: parameters of this optimizer with one row per index expected")
        for group in self.param_groups:
            exact = not any(group[k] for k in ("amsgrad", "maximize", "foreach", "fused", "differentiable"))
            if self._row_sparse and (group["weight_decay"] != 0 or group["capturable"] or not exact):
                raise ValueError(
                    "row_sparse: only AdamW's plain single-tensor update with weight_decay=0 leaves untouched "
                    "rows unchanged"
                )
        self._touched: dict[int, torch.Tensor] = {}  # id(param) -> rows ever touched (bool)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._touched.clear()  # recomputed from the loaded moments

    def _rows(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        touched = self._touched.get(id(p))
        if touched is None:  # after a (re)start: the rows whose moments are not all zero
            touched = state["exp_avg"].ne(0).flatten(1).any(1) | state["exp_avg_sq"].ne(0).flatten(1).any(1)
            self._touched[id(p)] = touched
        touched |= p.grad.ne(0).flatten(1).any(1)
        return touched.nonzero().squeeze(1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = {id(p) for p in self._row_sparse}
        swapped = []  # (group, index, param, its gathered rows, the rows)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if id(p) not in sparse or p.grad is None or not state:
                    continue
                rows = self._rows(p, state)
                sub = p[rows]
                sub.grad = p.grad[rows]
                self.state[sub] = {
                    "step": state["step"],  # the same tensor: the stock update counts it once
                    "exp_avg": state["exp_avg"][rows],
                    "exp_avg_sq": state["exp_avg_sq"][rows],
                }
                group["params"][i] = sub
                swapped.append((group, i, p, sub, rows))
        try:
            super().step()
        finally:
            for group, i, p, sub, rows in swapped:
                group["params"][i] = p
                done = self.state.pop(sub)
                state = self.state[p]
                p.index_copy_(0, rows, sub)
                state["exp_avg"].index_copy_(0, rows, done["exp_avg"])
                state["exp_avg_sq"].index_copy_(0, rows, done["exp_avg_sq"])
        return loss
