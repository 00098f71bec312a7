"""Benchmark ``compute``: the capacity model's training-time estimate against measured samples/s.

Usage::

    python -m fedmoe_app.tools.bench compute [--models cnn-moe,transformer-moe,tiny-mixtral]
                                             [--experts 1,2,8] [--samples 2048] [--repeats 3]

Until a client has reported its measured ``samples-per-s``, :func:`fedmoe_app.capacity.round_time_s`
estimates its training time from the model's FLOPs (:func:`fedmoe_app.models.model_costs`,
``flops_shared`` + ``flops_experts`` per sample), the client's dense-matmul speed
(:func:`fedmoe_app.capacity.probe.matmul_gflops`, what a client profiles) and the family's
``efficiency`` (:data:`fedmoe_app.capacity.COMPUTE_EFFICIENCY`). For every model of
:data:`fedmoe_app.tools.bench.memory.MODELS` and every number ``k`` of held experts this
trains ``--samples`` random examples with :func:`fedmoe_app.training.train` (the client's
loop, one untimed epoch first), takes the best of ``--repeats`` epochs' ``samples_per_s`` (as
a client reports it) and prints it next to the estimate; ``predicted / measured`` above 1
means the estimate is optimistic (a deadline then admits more than a client can do).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from fedmoe_app.capacity import ModelCosts, round_time_s
from fedmoe_app.capacity.probe import matmul_gflops
from fedmoe_app.config import RunConfig
from fedmoe_app.models import build_model, model_costs
from fedmoe_app.training import train

from .common import int_list, machine_summary
from .memory import add_models_argument, bench_spec, random_data


def predicted_samples_per_s(costs: ModelCosts, k: int, gflops: float) -> float:
    """Samples/s that :func:`fedmoe_app.capacity.round_time_s` assumes for ``k`` held experts."""
    return 1.0 / float(round_time_s(k, gflops, np.inf, np.inf, costs=costs, samples=1.0))


def measured_samples_per_s(name: str, k: int, samples: int, batch_size: int, repeats: int) -> float:
    """Best training throughput of ``repeats`` epochs of ``samples`` random examples, ``k`` experts."""
    spec = bench_spec(name)
    model = build_model(spec, list(range(k)), seed=0)
    data = random_data(spec, samples)
    knobs = RunConfig().train_kwargs() | {"epochs": 1, "batch_size": batch_size}
    runs = [train(model, data, **knobs, device="cpu", seed=r, max_samples=None) for r in range(repeats + 1)]
    return max(r.samples_per_s for r in runs[1:])  # the first epoch warms up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``compute`` to ``parser``, its ``argparse`` subparser."""
    add_models_argument(parser)
    parser.add_argument("--experts", type=int_list, default=[1, 2, 8], help="held experts k")
    parser.add_argument("--samples", type=int, default=2048, help="training examples per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per k (best)")


def bench_compute(args: argparse.Namespace) -> int:
    """Compare estimated and measured training throughput; write a table to stdout.

    Parameters
    ----------
    args : argparse.Namespace
        ``models``, ``experts``, ``samples``, ``batch_size``, ``repeats`` (see
        :func:`add_arguments`).

    Returns
    -------
    int
        Exit status (0).

    """
    out = sys.stdout
    gflops = matmul_gflops("cpu", seconds=1.0)
    out.write(
        f"# compute estimate vs measured training samples/s: {args.samples} samples per epoch, "
        f"batch {args.batch_size}, best of {args.repeats} epochs\n# machine: {machine_summary()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"matmul benchmark {gflops:.0f} GFLOP/s\n"
    )
    for name in args.models:
        spec = bench_spec(name)
        costs = model_costs(spec)
        ks = sorted({k for k in args.experts if k <= spec.num_experts})
        out.write(
            f"\n## {name}: {costs.flops_shared / 1e6:.2f} MFLOP shared + {costs.flops_experts / 1e6:.2f} "
            f"MFLOP experts per sample, top-k {costs.top_k}, efficiency {costs.efficiency}\n"
            f"{'k':>3} | {'measured/s':>10} | {'predicted/s':>11} | {'pred/meas':>9}\n"
        )
        ratios = []
        for k in ks:
            measured = measured_samples_per_s(name, k, args.samples, args.batch_size, args.repeats)
            pred = predicted_samples_per_s(costs, k, gflops)
            ratios.append(pred / measured)
            out.write(f"{k:>3} | {measured:>10.0f} | {pred:>11.0f} | {ratios[-1]:>9.2f}\n")
            out.flush()
        out.write(f"predicted / measured: {min(ratios):.2f}..{max(ratios):.2f}\n")
    return 0
