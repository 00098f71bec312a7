"""Benchmark ``memory``: the capacity memory model against measured training memory.

Usage::

    python -m fedmoe_app.tools.bench memory [--specs default,wide] [--experts 1,2,4,8]
                                            [--batch-size 32] [--steps 5] [--repeats 3]

For every spec and every number ``k`` of held experts, a *fresh* spawned process

1. imports torch and trains a tiny model of the same architecture for a few steps (so
   that lazily loaded kernels, thread pools and allocator arenas are already there),
2. reads its resident set size (RSS),
3. builds the ``k``-expert model and trains it ``--steps`` SGD-momentum steps on random
   batches, exactly as ``fedmoe_app.training.train`` does, and
4. reports ``peak RSS - RSS before the model`` (peak from ``getrusage(RUSAGE_SELF)``).

The table compares that growth with :meth:`fedmoe_app.capacity.MemoryModel.predict_training_bytes`
(median over ``--repeats`` processes), and the growth from the smallest to the largest
``k`` predicted vs measured, which is what decides capacities (criterion: within
``--tolerance``, default 30%). Spec ``default`` is the app's default model on
Fashion-MNIST; ``wide`` (feature_dim 256, expert_hidden 1024) makes expert memory large
against the process's noise.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import platform
import resource
import statistics
import sys
from dataclasses import asdict, replace
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from fedmoe_app.capacity import MIB, MemoryModel
from fedmoe_app.models import REFERENCE_SPEC, ModelSpec, build_model, model_costs

from ...capacity.probe import usable_cpus
from .common import environ, int_list, name_list

#: Model specs to measure: the app's default model on Fashion-MNIST, a wide variant and
#: the default model on CIFAR-10's 3 x 32 x 32 images.
SPECS: dict[str, ModelSpec] = {
    "default": REFERENCE_SPEC,
    "wide": replace(REFERENCE_SPEC, feature_dim=256, expert_hidden=1024),
    "cifar": replace(REFERENCE_SPEC, in_channels=3, image_size=32, num_classes=10),
}
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


def _train_steps(spec: ModelSpec, n_experts: int, batch_size: int, steps: int) -> None:
    model = build_model(spec, list(range(n_experts)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    shape = (batch_size, spec.in_channels, spec.image_size, spec.image_size)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen)
        y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen)
        out = model(x, y)
        loss = F.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def measure_growth(
    spec_fields: dict[str, int], n_experts: int, batch_size: int, steps: int
) -> dict[str, int]:
    """Peak RSS growth of training ``n_experts`` experts; run it in a fresh process.

    Parameters
    ----------
    spec_fields : dict
        ``dataclasses.asdict`` of the :class:`ModelSpec`.
    n_experts : int
        Experts the model holds.
    batch_size : int
        Batch size.
    steps : int
        SGD steps to train.

    Returns
    -------
    dict
        ``growth`` (peak RSS minus RSS before the model, bytes), ``base`` (that RSS) and
        ``warm_peak`` (peak RSS after the warm-up; above ``base + growth`` the
        measurement would be hidden by the warm-up).

    """
    spec = ModelSpec(**spec_fields)
    tiny = replace(spec, stem_channels=1, feature_dim=1, expert_hidden=1)
    for n in sorted({1, min(2, spec.num_experts)}):
        _train_steps(tiny, n, batch_size, 2)
    gc.collect()
    warm_peak = _peak_rss_bytes()
    base = psutil.Process().memory_info().rss
    _train_steps(spec, n_experts, batch_size, steps)
    return {"growth": _peak_rss_bytes() - base, "base": base, "warm_peak": warm_peak}


def _in_fresh_process(
    spec: ModelSpec, n_experts: int, batch_size: int, steps: int, mmap_threshold: int
) -> dict[str, int]:
    # glibc reads the threshold when the spawned interpreter starts
    env = {_MMAP_ENV: str(mmap_threshold)} if mmap_threshold > 0 else {}
    with environ(env), multiprocessing.get_context("spawn").Pool(processes=1) as pool:
        return pool.apply(measure_growth, (asdict(spec), n_experts, batch_size, steps))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``memory`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument(
        "--specs",
        type=name_list(SPECS, "specs"),
        default=["default", "wide"],
        help=f"comma-separated model specs from {', '.join(SPECS)} (default: default,wide)",
    )
    parser.add_argument("--experts", type=int_list, default=[1, 2, 4, 8], help="held experts k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="SGD steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per k (median)")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed relative error")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the measured processes, e.g. 131072: a fixed "
        "threshold makes every allocation of that size or more an mmap that is returned on free, "
        "so RSS follows live tensors; 0 (default): the allocator's own dynamic threshold",
    )


def _machine() -> str:
    return (
        f"{usable_cpus()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def bench_memory(args: argparse.Namespace) -> int:
    """Compare predicted and measured training memory; write a table to stdout.

    Parameters
    ----------
    args : argparse.Namespace
        ``specs``, ``experts``, ``batch_size``, ``steps``, ``repeats``, ``tolerance``,
        ``mmap_threshold`` (see :func:`add_arguments`).

    Returns
    -------
    int
        Exit status (0; the verdict on ``--tolerance`` is printed, not returned).

    """
    out = sys.stdout
    out.write(
        f"# memory model vs measured peak RSS growth: batch {args.batch_size}, "
        f"{args.steps} SGD-momentum steps, median of {args.repeats} fresh processes per k, "
        f"malloc mmap threshold {args.mmap_threshold or 'glibc default (dynamic)'}\n"
        f"# machine: {_machine()}\n"
    )
    for name in args.specs:
        spec = SPECS[name]
        ks = sorted({k for k in args.experts if k <= spec.num_experts})
        mm = MemoryModel(model_costs(spec), args.batch_size)
        out.write(
            f"\n## spec {name}: {spec}\n"
            f"# shared part {mm.shared_bytes() / MIB:.2f} MiB (at top-k), "
            f"per expert {mm.expert_bytes() / MIB:.3f} MiB\n"
            f"{'k':>3} | {'predicted MiB':>13} | {'measured MiB':>12} | {'ratio':>5} | runs (MiB)\n"
        )
        measured: dict[int, float] = {}
        for k in ks:
            runs: list[dict[str, Any]] = [
                _in_fresh_process(spec, k, args.batch_size, args.steps, args.mmap_threshold)
                for _ in range(args.repeats)
            ]
            growth = [r["growth"] for r in runs]
            measured[k] = statistics.median(growth)
            predicted = mm.predict_training_bytes(k)
            hidden = any(r["warm_peak"] >= r["base"] + r["growth"] for r in runs)
            out.write(
                f"{k:>3} | {predicted / MIB:>13.2f} | {measured[k] / MIB:>12.2f} | "
                f"{measured[k] / predicted:>5.2f} | "
                + ", ".join(f"{g / MIB:.1f}" for g in growth)
                + (" (warm-up peak hides part)" if hidden else "")
                + "\n"
            )
            out.flush()
        if len(ks) >= 2:
            lo, hi = ks[0], ks[-1]
            pred = mm.predict_training_bytes(hi) - mm.predict_training_bytes(lo)
            meas = measured[hi] - measured[lo]
            ratio = meas / pred if pred else float("nan")
            verdict = "within" if abs(ratio - 1) <= args.tolerance else "OUTSIDE"
            out.write(
                f"growth k={lo}->{hi}: predicted {pred / MIB:.2f} MiB, "
                f"measured {meas / MIB:.2f} MiB, measured/predicted {ratio:.2f} "
                f"({verdict} +-{args.tolerance:.0%})\n"
            )
    return 0
