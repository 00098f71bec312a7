"""Benchmark ``dispatch``: the expert layer alone (forward + backward) per dispatch method.

Usage::

    python -m fedmoe_app.tools.bench dispatch [--experts 8,16,32,64] [--batch-sizes 32,64]

Times the model's ``grouped`` and ``gather`` paths
(:mod:`fedmoe_app.models.experts`) and the benchmark-only alternatives of
:data:`ALTERNATIVES` under balanced and skewed routing. See ``docs/PERFORMANCE.md`` for
results.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .common import int_list, machine_summary, set_threads


def routing_slots(batch: int, n: int, k: int, skewed: bool, gen: Any) -> Any:
    """Expert slots of ``batch`` samples, each routed to ``k`` distinct experts of ``n``.

    Balanced: uniform. Skewed: expert ``i`` drawn with weight ``2**-i`` (experts 0 and 1
    get most rows), the worst case for padded per-expert batches.

    Parameters
    ----------
    batch : int
        Samples.
    n : int
        Experts.
    k : int
        Experts per sample (at most ``n``).
    skewed : bool
        Skewed instead of balanced routing.
    gen : torch.Generator
        Randomness.

    Returns
    -------
    torch.Tensor
        int64 ``[batch * min(k, n)]``: the expert of each (sample, choice) row.

    """
    import torch

    k = min(k, n)
    weights = torch.tensor([0.5**i for i in range(n)]) if skewed else torch.ones(n)
    return torch.multinomial(weights.expand(batch, n), k, replacement=False, generator=gen).reshape(-1)


def _sorted_by_slot(slots: Any, n: int) -> tuple[Any, Any, Any]:
    import torch

    order = torch.argsort(slots, stable=True)
    return order, slots.index_select(0, order), torch.bincount(slots, minlength=n)


def dispatch_padded(x: Any, slots: Any, w1: Any, b1: Any, w2: Any, b2: Any, cap: int | None = None) -> Any:
    """Alternative (benchmark only): sort rows by slot into a padded ``[n, cap, d]`` batch + ``bmm``.

    Work is ``n x max_count x d x h``: fast for balanced routing, up to ``n`` times the
    useful work when routing is skewed; needs the max count on the host (a sync on GPU).

    Parameters
    ----------
    x : torch.Tensor
        ``[rows, d]`` inputs.
    slots : torch.Tensor
        ``[rows]`` expert of each row.
    w1, b1, w2, b2 : torch.Tensor
        Stacked expert weights ``[n, d, h]``, ``[n, h]``, ``[n, h, c]``, ``[n, c]``.
    cap : int, optional
        Rows per expert in the padded batch; the largest count when omitted.

    Returns
    -------
    torch.Tensor
        ``[rows, c]`` outputs, row ``i`` through expert ``slots[i]``.

    """
    import torch
    import torch.nn.functional as F

    n = w1.shape[0]
    order, sorted_slots, counts = _sorted_by_slot(slots, n)
    cap = int(counts.max()) if cap is None else cap
    pos = torch.arange(len(slots)) - (torch.cumsum(counts, 0) - counts).index_select(0, sorted_slots)
    buf = x.new_zeros(n, cap, x.shape[1]).index_put((sorted_slots, pos), x.index_select(0, order))
    hid = F.relu(torch.baddbmm(b1.unsqueeze(1), buf, w1))
    out = torch.baddbmm(b2.unsqueeze(1), hid, w2)[sorted_slots, pos]
    return torch.zeros_like(out).index_copy(0, order, out)


def dispatch_hybrid(x: Any, slots: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> Any:
    """Alternative (benchmark only): padded when ``n x max_count <= 2 x rows``, else gather.

    Arguments and result as for :func:`dispatch_padded`.
    """
    from fedmoe_app.models.experts import dispatch_gather

    n = w1.shape[0]
    cap = int(slots.bincount(minlength=n).max())
    if n * cap <= 2 * len(slots):
        return dispatch_padded(x, slots, w1, b1, w2, b2, cap)
    return dispatch_gather(x, slots, w1, b1, w2, b2)


def dispatch_loop(x: Any, slots: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> Any:
    """Alternative (benchmark only): sort rows by slot, one ``addmm`` pair per non-empty expert.

    Arguments and result as for :func:`dispatch_padded`.
    """
    import torch
    import torch.nn.functional as F

    order, _, counts = _sorted_by_slot(slots, w1.shape[0])
    sizes = counts.tolist()
    outs = [
        torch.addmm(b2[e], F.relu(torch.addmm(b1[e], part, w1[e])), w2[e])
        for e, part in enumerate(torch.split(x.index_select(0, order), sizes))
        if sizes[e]
    ]
    out = torch.cat(outs)
    return torch.zeros_like(out).index_copy(0, order, out)


#: Benchmark-only dispatch methods, timed beside the model's own.
ALTERNATIVES: dict[str, Callable[..., Any]] = {
    "padded": dispatch_padded,
    "hybrid": dispatch_hybrid,
    "loop": dispatch_loop,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dispatch`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument("--experts", type=int_list, default=[8, 16, 32, 64])
    parser.add_argument("--batch-sizes", type=int_list, default=[32, 64])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)


def _forward_backward(
    method: str, layer: Any, weights: tuple[Any, ...], slots: Any, x: Any, grad: Any
) -> None:
    """Run the expert layer once, forward and backward, by dispatch ``method``.

    ``method`` is a key of :data:`ALTERNATIVES` (called on ``weights``) or one of the
    model's own paths (set on ``layer``, an :class:`~fedmoe_app.models.experts.Experts`).
    """
    if method in ALTERNATIVES:
        ALTERNATIVES[method](x, slots, *weights).backward(grad)
    else:
        layer.dispatch = method
        layer(x, slots).backward(grad)


def _median_cpu_us(
    call: Callable[[str], None], methods: Sequence[str], repeats: int, iters: int
) -> dict[str, float]:
    """Return the median process CPU microseconds per ``call(method)`` of every method.

    One warm-up call per method, then ``repeats`` passes over the methods in turn, each
    timing ``iters`` calls.
    """
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        call(method)
    for _ in range(repeats):
        for method in methods:
            c0 = time.process_time()
            for _ in range(iters):
                call(method)
            cpu[method].append(1e6 * (time.process_time() - c0) / iters)
    return {m: statistics.median(v) for m, v in cpu.items()}


def bench_dispatch(args: argparse.Namespace) -> int:
    """Time the expert layer alone (forward + backward) per dispatch method and routing.

    Methods: the model's ``grouped`` (chosen) and ``gather`` paths and the benchmark-only
    alternatives in :data:`ALTERNATIVES`. For every batch size, number of experts and
    routing (balanced, skewed: see :func:`routing_slots`) the methods are timed in turn,
    ``--repeats`` times ``--iters`` calls each; the median process CPU time per call is
    printed (robust to other load with one thread; with more threads it sums them).

    Parameters
    ----------
    args : argparse.Namespace
        ``experts``, ``batch_sizes``, ``top_k``, ``threads``, ``repeats``, ``iters``, ``seed``
        and the expert shape ``feature_dim``, ``expert_hidden``, ``classes``.

    Returns
    -------
    int
        Exit status (0).

    """
    import torch

    from fedmoe_app.models.experts import Experts

    out = sys.stdout
    threads = set_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    methods = ("grouped", "gather", *ALTERNATIVES)
    out.write(
        f"# dispatch benchmark: expert layer forward+backward, top-{args.top_k}, d={args.feature_dim}, "
        f"h={args.expert_hidden}, c={args.classes}, torch threads={threads}, median of {args.repeats} "
        f"x {args.iters} calls, CPU microseconds per call\n"
    )
    out.write(f"# machine: {machine_summary()}, torch {torch.__version__}\n")
    out.write(
        f"{'batch':>5} {'E':>4} {'routing':>8} {'max/mean':>8} "
        + "".join(f"{m:>8}" for m in methods)
        + f" {'best':>8}\n"
    )
    for batch in args.batch_sizes:
        for n in args.experts:
            for skewed in (False, True):
                layer = Experts(n, args.feature_dim, args.expert_hidden, args.classes)
                weights = (layer.w1, layer.b1, layer.w2, layer.b2)
                slots = routing_slots(batch, n, args.top_k, skewed, gen)
                x = torch.randn(len(slots), args.feature_dim, generator=gen, requires_grad=True)
                grad = torch.randn(len(slots), args.classes, generator=gen)
                counts = torch.bincount(slots, minlength=n).float()
                call = functools.partial(
                    _forward_backward, layer=layer, weights=weights, slots=slots, x=x, grad=grad
                )
                med = _median_cpu_us(call, methods, args.repeats, args.iters)
                out.write(
                    f"{batch:>5} {n:>4} {'skewed' if skewed else 'balanced':>8} "
                    f"{float(counts.max() / counts.mean()):>8.1f} "
                    + "".join(f"{med[m]:>8.0f}" for m in methods)
                    + f" {min(med, key=med.__getitem__):>8}\n"
                )
                out.flush()
    return 0
