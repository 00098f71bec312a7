"""Benchmark ``memory``: the capacity memory model against measured training memory, every family.

Usage::

    python -m fedmoe_app.tools.bench memory [--models cnn-moe,transformer-moe,tiny-mixtral,tiny-qwen2-moe]
                                            [--experts 1,2,4,8] [--batch-size 32] [--steps 5]
                                            [--repeats 3] [--mmap-threshold 0]

For every model of :data:`MODELS` and every number ``k`` of held experts (values above the
model's experts are dropped; ``8`` is all of them at the defaults), a *fresh* spawned process

1. imports torch (and ``transformers`` for ``hf``) and trains a tiny model of the same family
   for a few steps (so that lazily loaded kernels, thread pools and allocator arenas are
   already there),
2. makes the random training data and reads its resident set size (RSS),
3. builds the ``k``-expert model and trains it ``--steps`` batches with
   :func:`fedmoe_app.training.train` (the client's own loop: fused SGD with momentum, the
   balance loss, the feedback sums), and
4. reports ``peak RSS - RSS before the model`` (peak from ``getrusage(RUSAGE_SELF)``).

The table compares that growth with :meth:`fedmoe_app.capacity.MemoryModel.predict_training_bytes`
of the model's :func:`fedmoe_app.models.model_costs` (median over ``--repeats`` processes), and
the growth from the smallest to the largest ``k``, which is what decides capacities (criterion:
both within ``--tolerance``, default 30 %). The ``*-wide`` variants make the experts large
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
from dataclasses import replace
from typing import Any

import psutil
import torch

from fedmoe_app.capacity import MIB, MemoryModel
from fedmoe_app.config import RunConfig
from fedmoe_app.data import Split
from fedmoe_app.data.text import TextSplit
from fedmoe_app.models import (
    REFERENCE_SPEC,
    AnySpec,
    HFSpec,
    ModelSpec,
    TransformerSpec,
    build_model,
    model_costs,
)
from fedmoe_app.training import train

from ...capacity.probe import usable_cpus
from .common import environ, int_list, name_list

_TEXT = {"dataset": "fortunes"}
_WIDE_TEXT = {"d-model": 128, "expert-hidden": 1024}
_TINY_TEXT = {"d-model": 8, "num-heads": 2, "expert-hidden": 8}
#: Benchmark model -> run-config overrides (text models) or a CNN :class:`ModelSpec`.
MODELS: dict[str, ModelSpec | dict[str, Any]] = {
    "cnn-moe": REFERENCE_SPEC,
    "cnn-wide": replace(REFERENCE_SPEC, feature_dim=256, expert_hidden=1024),
    "cnn-cifar": replace(REFERENCE_SPEC, in_channels=3, image_size=32, num_classes=10),
    "transformer-moe": {**_TEXT, "model": "transformer-moe"},
    "transformer-wide": {**_TEXT, "model": "transformer-moe", **_WIDE_TEXT},
    "tiny-mixtral": {**_TEXT, "model": "hf", "hf-config": "tiny-mixtral"},
    "tiny-qwen2-moe": {**_TEXT, "model": "hf", "hf-config": "tiny-qwen2-moe"},
    "tiny-mixtral-wide": {**_TEXT, "model": "hf", "hf-config": "tiny-mixtral", **_WIDE_TEXT},
}
DEFAULT_MODELS = ["cnn-moe", "transformer-moe", "tiny-mixtral", "tiny-qwen2-moe"]
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
_BYTES = argparse.Namespace(vocab_size=256)


def bench_spec(name: str, tiny: bool = False) -> AnySpec:
    """Spec of benchmark model ``name`` (``tiny``: the same family at minimal sizes, for warm-up)."""
    entry = MODELS[name]
    if isinstance(entry, ModelSpec):
        return replace(entry, stem_channels=1, feature_dim=1, expert_hidden=1) if tiny else entry
    cfg = RunConfig.from_run_config({**entry, **(_TINY_TEXT if tiny else {})})
    if cfg.model == "hf":
        return HFSpec.from_config(cfg, _BYTES)
    return TransformerSpec.from_config(cfg, _BYTES)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


def random_data(spec: AnySpec, n: int) -> Split | TextSplit:
    """``n`` random training examples for ``spec``: images and labels, or windows of bytes."""
    gen = torch.Generator().manual_seed(0)
    if isinstance(spec, ModelSpec):
        images = torch.randn((n, spec.in_channels, spec.image_size, spec.image_size), generator=gen)
        return Split(images, torch.randint(0, spec.num_classes, (n,), generator=gen))
    tokens = torch.randint(0, 256, (n, spec.context_length + 1), generator=gen, dtype=torch.uint8)
    return TextSplit(tokens, torch.zeros(n, dtype=torch.long))


def _train_steps(spec: AnySpec, n_experts: int, data: Split | TextSplit, batch_size: int) -> None:
    model = build_model(spec, list(range(n_experts)), seed=0)
    knobs = RunConfig().train_kwargs() | {"epochs": 1, "batch_size": batch_size, "route_weight": 0.0}
    train(model, data, **knobs, device="cpu", seed=0, max_samples=None)


def measure_growth(name: str, n_experts: int, batch_size: int, steps: int) -> dict[str, int]:
    """Peak RSS growth of training ``n_experts`` experts of ``name``; run it in a fresh process.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    n_experts : int
        Experts the model holds.
    batch_size : int
        Batch size.
    steps : int
        Training steps (batches).

    Returns
    -------
    dict
        ``growth`` (peak RSS minus RSS before the model, bytes), ``base`` (that RSS) and
        ``warm_peak`` (peak RSS after the warm-up; above ``base + growth`` the
        measurement would be hidden by the warm-up).

    """
    spec, tiny = bench_spec(name), bench_spec(name, tiny=True)
    for n in sorted({1, min(2, spec.num_experts)}):
        _train_steps(tiny, n, random_data(tiny, 2 * batch_size), batch_size)
    data = random_data(spec, steps * batch_size)
    gc.collect()
    warm_peak = _peak_rss_bytes()
    base = psutil.Process().memory_info().rss
    _train_steps(spec, n_experts, data, batch_size)
    return {"growth": _peak_rss_bytes() - base, "base": base, "warm_peak": warm_peak}


def _in_fresh_process(
    name: str, n_experts: int, batch_size: int, steps: int, mmap_threshold: int
) -> dict[str, int]:
    # glibc reads the threshold when the spawned interpreter starts
    env = {_MMAP_ENV: str(mmap_threshold)} if mmap_threshold > 0 else {}
    with environ(env), multiprocessing.get_context("spawn").Pool(processes=1) as pool:
        return pool.apply(measure_growth, (name, n_experts, batch_size, steps))


def add_models_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--models`` (names of :data:`MODELS`) to a benchmark's ``parser``."""
    parser.add_argument(
        "--models",
        type=name_list(MODELS, "models"),
        default=DEFAULT_MODELS,
        help=f"comma-separated models from {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``memory`` to ``parser``, its ``argparse`` subparser."""
    add_models_argument(parser)
    parser.add_argument("--experts", type=int_list, default=[1, 2, 4, 8], help="held experts k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="training steps per measurement")
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


def _verdict(ratio: float, tolerance: float) -> str:
    return "within" if abs(ratio - 1) <= tolerance else "OUTSIDE"


def bench_memory(args: argparse.Namespace) -> int:
    """Compare predicted and measured training memory; write a table to stdout.

    Parameters
    ----------
    args : argparse.Namespace
        ``models``, ``experts``, ``batch_size``, ``steps``, ``repeats``, ``tolerance``,
        ``mmap_threshold`` (see :func:`add_arguments`).

    Returns
    -------
    int
        Exit status (0; the verdict on ``--tolerance`` is printed, not returned).

    """
    out = sys.stdout
    out.write(
        f"# memory model vs measured peak RSS growth: batch {args.batch_size}, "
        f"{args.steps} training steps, median of {args.repeats} fresh processes per k, "
        f"malloc mmap threshold {args.mmap_threshold or 'glibc default (dynamic)'}\n"
        f"# machine: {_machine()}\n"
    )
    for name in args.models:
        spec = bench_spec(name)
        ks = sorted({k for k in args.experts if k <= spec.num_experts})
        mm = MemoryModel(model_costs(spec), args.batch_size)
        out.write(
            f"\n## {name}: {spec if not isinstance(spec, HFSpec) else spec.config}\n"
            f"# shared part {mm.shared_bytes() / MIB:.2f} MiB (at top-k), "
            f"per expert {mm.expert_bytes() / MIB:.3f} MiB\n"
            f"{'k':>3} | {'predicted MiB':>13} | {'measured MiB':>12} | {'ratio':>5} | runs (MiB)\n"
        )
        measured: dict[int, float] = {}
        for k in ks:
            runs: list[dict[str, Any]] = [
                _in_fresh_process(name, k, args.batch_size, args.steps, args.mmap_threshold)
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
            out.write(
                f"growth k={lo}->{hi}: predicted {pred / MIB:.2f} MiB, "
                f"measured {meas / MIB:.2f} MiB, measured/predicted {ratio:.2f} "
                f"({_verdict(ratio, args.tolerance)} +-{args.tolerance:.0%})\n"
            )
    return 0
