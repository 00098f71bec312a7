"""Stacked MLP experts and their dispatch: each row of a batch to the expert of its slot.

Experts are stored stacked (``w1`` is ``[n_held, d, h]``). Dispatch sorts the (sample,
expert) rows by expert and runs one grouped matmul per layer
(:func:`torch.nn.functional.grouped_mm`), so its cost follows the number of rows, not the
number of experts or how skewed the routing is; a gather + ``baddbmm`` path serves devices
and dtypes without grouped matmul (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISPATCH_METHODS = ("auto", "grouped", "gather")


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _pad_dim(t: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pad dimension ``dim`` (counted from the end, ``-1`` or ``-2``) of ``t`` up to ``size``."""
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    return F.pad(t, (0, extra) if dim == -1 else (0, 0, 0, extra))


def _grouped_matmul(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """``a[rows of group g] @ w[g]`` for consecutive row groups ending at ``offs`` (int32).

    :func:`torch.nn.functional.grouped_mm` wants 16-byte aligned row strides, so the inner
    and output dimensions are zero-padded when needed (exact: padding adds zeros only).
    """
    align = max(1, 16 // a.element_size())
    k, n = w.shape[1], w.shape[2]
    kp, np_ = -(-k // align) * align, -(-n // align) * align
    out = F.grouped_mm(_pad_dim(a, -1, kp), _pad_dim(_pad_dim(w, -2, kp), -1, np_), offs=offs)
    return out[:, :n] if np_ != n else out


def grouped_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped matmul (forward and backward) works for ``device`` and ``dtype``.

    Probed once per device type and dtype with a tiny problem (empty groups included);
    ``False`` where :func:`torch.nn.functional.grouped_mm` is missing (torch < 2.8) or
    rejects the case, in which case :class:`Experts` uses its gather path.
    """
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    a = torch.ones(3, 5, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(3, 5, 6, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([1, 1, 3], device=device, dtype=torch.int32)
                    out = _grouped_matmul(a, w, offs)
                    out.backward(torch.ones_like(out))
                ok = bool(torch.allclose(out, torch.full_like(out, 5.0)))
                ok = ok and bool(torch.allclose(w.grad[1], torch.zeros_like(w.grad[1])))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def dispatch_grouped(x: Tensor, slots: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Apply expert ``slots[i]`` to row ``x[i]``: sort rows by slot, one grouped matmul per layer.

    Row ``i`` gives ``relu(x[i] @ w1[s] + b1[s]) @ w2[s] + b2[s]`` with ``s = slots[i]``.
    No host sync and no Python loop; empty experts cost nothing but their zero gradient.
    """
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots.index_select(0, order)
    offs = torch.cumsum(torch.bincount(slots, minlength=w1.shape[0]), 0).to(torch.int32)
    hid = F.relu(_grouped_matmul(x.index_select(0, order), w1, offs) + b1.index_select(0, sorted_slots))
    out = _grouped_matmul(hid, w2, offs) + b2.index_select(0, sorted_slots)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return out.index_select(0, inverse)


def dispatch_gather(x: Tensor, slots: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Compute :func:`dispatch_grouped`'s result by gathering every row's weights + ``baddbmm``.

    ``index_select`` (backward ``index_add``) copies ``rows x d x h`` floats per layer.
    """
    w1, b1 = w1.index_select(0, slots), b1.index_select(0, slots)
    w2, b2 = w2.index_select(0, slots), b2.index_select(0, slots)
    hid = F.relu(torch.baddbmm(b1.unsqueeze(1), x.unsqueeze(1), w1))
    return torch.baddbmm(b2.unsqueeze(1), hid, w2).squeeze(1)


class Experts(nn.Module):
    """``n`` two-layer MLP experts stored as stacked tensors.

    Dispatch (``dispatch`` attribute, not part of the state):

    * ``"grouped"``: sort the rows by slot, run one grouped matmul per layer over the
      sorted rows (:func:`torch.nn.functional.grouped_mm`: one op call; on CPU a C++ loop
      of one GEMM per expert) and unsort. Work is ``rows x d x h`` plus one read of the
      weights, the same for balanced and skewed routing, with no Python loop and no host
      sync.
    * ``"gather"``: gather each row's expert weights (``index_select``, backward
      ``index_add``) and run ``baddbmm``; copies ``rows x d x h`` floats per layer.
    * ``"auto"`` (default): ``grouped`` where the device and dtype support it, else
      ``gather``.

    Both give the same outputs and gradients up to float rounding.
    """

    dispatch: str = "auto"

    def __init__(self, n: int, d: int, h: int, c: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, d, h).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.b1 = nn.Parameter(torch.zeros(n, h))
        self.w2 = nn.Parameter(torch.empty(n, h, c).uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h)))
        self.b2 = nn.Parameter(torch.zeros(n, c))

    def method(self, x: Tensor) -> str:
        """Return the dispatch used for input ``x``: ``"grouped"`` or ``"gather"``."""
        if self.dispatch not in DISPATCH_METHODS:
            raise ValueError(f"Experts.dispatch = {self.dispatch!r}; allowed: {DISPATCH_METHODS}")
        if self.dispatch == "auto":
            return "grouped" if grouped_supported(x.device, x.dtype) else "gather"
        return self.dispatch

    def forward(self, x: Tensor, slots: Tensor) -> Tensor:
        """Apply expert ``slots[i]`` to row ``x[i]``; return ``[rows, c]``.

        Parameters
        ----------
        x : Tensor
            ``[rows, d]`` inputs.
        slots : Tensor
            ``[rows]`` long, local expert slot of each row (``0..n-1``).

        Returns
        -------
        Tensor
            ``[rows, c]`` expert outputs, row ``i`` from expert ``slots[i]``.

        """
        dispatch = dispatch_grouped if self.method(x) == "grouped" else dispatch_gather
        return dispatch(x, slots, self.w1, self.b1, self.w2, self.b2)
