"""Benchmark ``experts``: local training time per sample as the number of experts grows.

Usage::

    python -m fedmoe_app.tools.bench experts [--experts 8,16,32,64] [--batch-size 32] [--threads 1]

Criterion: E=64 within 1.5x of E=8. See ``docs/PERFORMANCE.md`` for results.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from .common import int_list, machine_summary, median_min, set_threads

DISPATCH_CHOICES: tuple[str, ...] = ("auto", "grouped", "gather", "all")


def dispatch_methods(choice: str) -> list[str]:
    """Expand a ``--dispatch`` choice into the dispatch methods to time.

    Parameters
    ----------
    choice : str
        One of :data:`DISPATCH_CHOICES`.

    Returns
    -------
    list of str
        ``["grouped", "gather"]`` for ``"all"``, else ``[choice]``.

    """
    return ["grouped", "gather"] if choice == "all" else [choice]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``experts`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument("--experts", type=int_list, default=[8, 16, 32, 64], help="default 8,16,32,64")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1024, help="training samples per timed epoch")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up pass")
    parser.add_argument("--dispatch", choices=DISPATCH_CHOICES, default="auto", help="expert dispatch")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ratio", type=float, default=1.5, help="criterion on largest/smallest E")


#: A timed cell: (number of experts, dispatch method).
_Cell = tuple[int, str]


def _time_cells(
    args: argparse.Namespace, data: Any, methods: Sequence[str]
) -> tuple[dict[_Cell, list[float]], dict[_Cell, list[float]], dict[_Cell, str]]:
    """Train one epoch per (E, dispatch) cell, round-robin over one warm-up and ``--repeats`` passes.

    Returns wall and process CPU microseconds per sample of every timed pass, and the
    dispatch path each cell's model used, all keyed by ``(E, method)``.
    """
    from fedmoe_app.config import RunConfig
    from fedmoe_app.models import REFERENCE_SPEC, build_model
    from fedmoe_app.training import train

    cfg = RunConfig()
    cells = [(e, m) for e in args.experts for m in methods]
    wall: dict[_Cell, list[float]] = {c: [] for c in cells}
    cpu: dict[_Cell, list[float]] = {c: [] for c in cells}
    used: dict[_Cell, str] = {}
    for rep in range(args.repeats + 1):  # pass 0 warms up
        for e, method in cells:
            spec = dataclasses.replace(
                REFERENCE_SPEC,
                in_channels=args.channels,
                image_size=args.image_size,
                num_classes=10,
                num_experts=e,
                top_k=args.top_k,
            )
            model = build_model(spec, seed=args.seed)
            model.experts.dispatch = method
            used[(e, method)] = model.experts.method(data.images[:1])
            c0 = time.process_time()
            knobs = cfg.train_kwargs() | {"epochs": 1, "batch_size": args.batch_size}
            res = train(model, data, **knobs, device="cpu", seed=rep, max_samples=None)
            if rep:
                wall[(e, method)].append(1e6 * res.train_time_s / args.samples)
                cpu[(e, method)].append(1e6 * (time.process_time() - c0) / args.samples)
    return wall, cpu, used


def bench_experts(args: argparse.Namespace) -> int:
    """Time local training per sample (top-k routing) as the number of experts grows.

    The client holds every expert; expert size, batch and data are the same for every E
    (the app's default model, :data:`fedmoe_app.models.REFERENCE_SPEC`, with ``--channels``,
    ``--image-size``, E and ``--top-k``). Each cell trains one epoch over ``--samples``
    random images with :func:`fedmoe_app.training.train` (forward, backward, fused SGD
    step, feedback; the app's default lr, momentum and auxiliary loss weight); cells are
    interleaved round-robin over ``--repeats`` passes after one warm-up pass, and the median
    and minimum over passes are printed, with process CPU time (robust to other load on a
    single thread) beside wall time.

    Parameters
    ----------
    args : argparse.Namespace
        ``experts`` (list of int), ``batch_size``, ``samples``, ``top_k``, ``threads``,
        ``repeats``, ``dispatch``, ``image_size``, ``channels``, ``seed``, ``max_ratio``.

    Returns
    -------
    int
        0 when the largest E is within ``--max-ratio`` of the smallest (CPU time), else 1.

    """
    import torch

    from fedmoe_app.data import Split

    out = sys.stdout
    threads = set_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.samples, args.channels, args.image_size, args.image_size)
    data = Split(torch.randn(*shape, generator=gen), torch.randint(0, 10, (args.samples,), generator=gen))
    methods = dispatch_methods(args.dispatch)
    wall, cpu, used = _time_cells(args, data, methods)
    out.write(
        f"# experts benchmark: training per sample, top-{args.top_k}, batch {args.batch_size}, "
        f"{args.samples} samples {args.channels}x{args.image_size}x{args.image_size}, client holds all "
        f"experts, torch threads={threads}, repeats={args.repeats} (median, min over passes)\n"
    )
    out.write(f"# machine: {machine_summary()}, torch {torch.__version__}\n")
    out.write(
        f"{'E':>4} {'dispatch':>8} {'wall us':>8} {'min':>6} {'cpu us':>7} {'min':>6} "
        f"{'wall/E0':>8} {'cpu/E0':>7}\n"
    )
    verdict = 0
    first, last = args.experts[0], args.experts[-1]
    for method in methods:
        base_w = statistics.median(wall[(first, method)])
        base_c = statistics.median(cpu[(first, method)])
        for e in args.experts:
            (mw, lw), (mc, lc) = median_min(wall[(e, method)]), median_min(cpu[(e, method)])
            out.write(
                f"{e:>4} {used[(e, method)]:>8} {mw:>8.0f} {lw:>6.0f} {mc:>7.0f} {lc:>6.0f} "
                f"{mw / base_w:>8.2f} {mc / base_c:>7.2f}\n"
            )
        ratio = statistics.median(cpu[(last, method)]) / base_c
        ok = ratio <= args.max_ratio
        verdict |= 0 if ok else 1
        out.write(
            f"# {used[(last, method)]}: E={last} / E={first} = "
            f"{ratio:.2f} (cpu time) -> {'PASS' if ok else 'FAIL'} (criterion <= {args.max_ratio})\n"
        )
    return verdict
