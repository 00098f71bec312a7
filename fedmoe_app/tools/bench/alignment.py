"""Benchmark ``alignment``: time :meth:`AlignmentState.plan` per policy for C clients x E experts.

Usage::

    python -m fedmoe_app.tools.bench alignment [--sizes 1000,10000,100000] [--experts 64] [--repeats 3]

See ``docs/ALIGNMENT.md`` for results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from fedmoe_app.alignment import POLICIES, AlignmentState, load_cv, solver
from fedmoe_app.alignment.state import KNOBS
from fedmoe_app.config import RunConfig

from .common import int_list, machine_summary, median_min, name_list

ALIGNMENT_POLICIES: tuple[str, ...] = ("random", "greedy", "load_balanced")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``alignment`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=[1000, 10000, 100000],
        help="comma-separated client counts (default 1000,10000,100000)",
    )
    parser.add_argument("--experts", type=int, default=64, help="number of experts (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instance")
    parser.add_argument(
        "--policies",
        type=name_list(POLICIES, "policies"),
        default=list(ALIGNMENT_POLICIES),
        help="comma-separated subset of " + ",".join(POLICIES),
    )
    slack = RunConfig().load_slack
    parser.add_argument(
        "--load-slack",
        type=float,
        default=slack,
        help=f"load_balanced bounds: mean x (1 +- slack) (default {slack}, the app's)",
    )
    parser.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="fraction of clients that strongly prefer experts 0 and 1 (default 0)",
    )
    parser.add_argument(
        "--approx-min-clients",
        type=int,
        default=RunConfig().approx_min_clients,
        help="load_balanced: fast approximate plan from this many clients on; 0: exact (the app's default)",
    )
    parser.add_argument(
        "--gap",
        action="store_true",
        help="load_balanced: also solve exactly and print the plan's optimality gap (relative)",
    )
    parser.add_argument(
        "--full-network",
        action="store_true",
        help="solve load_balanced on the full C x E network (no pruning), for comparison",
    )


def bench_alignment(args: argparse.Namespace) -> int:
    """Time ``AlignmentState.plan`` per policy for C clients x E experts.

    Random fitness in ``[0, 1)`` (plus 1 on experts 0 and 1 for a ``--skew`` fraction of the
    clients), random usage, capacities uniform in 1..8; the other alignment settings are the
    app's defaults (:meth:`RunConfig.alignment_kwargs`). Prints the median plan time over
    ``--repeats`` runs (after one warm-up) and the load CV of the plan.

    Parameters
    ----------
    args : argparse.Namespace
        ``sizes`` (list of int), ``experts``, ``repeats``, ``seed``, ``policies``,
        ``skew``, ``load_slack``, ``approx_min_clients``, ``gap`` (also solve exactly and
        print the relative optimality gap of the plan), ``full_network`` (solve
        ``load_balanced`` without candidate pruning, for comparison).

    Returns
    -------
    int
        Exit status (0).

    """
    out = sys.stdout
    if args.full_network:  # comparison only: disable candidate pruning in the solver
        solver.PRUNE_MIN_ARCS = 1 << 62
    network = "full network" if args.full_network else "pruned + certified"
    out.write(
        f"# alignment benchmark: E={args.experts}, capacities 1-8, repeats={args.repeats}, "
        f"skew={args.skew}, load_slack={args.load_slack}, load_balanced solver: {network}, "
        f"approx_min_clients={args.approx_min_clients}\n"
    )
    out.write(f"# machine: {machine_summary()}\n")
    gap_head = f" {'gap':>9}" if args.gap else ""
    out.write(f"{'clients':>8} {'policy':>14} {'median ms':>10} {'min ms':>9} {'load CV':>8}{gap_head}\n")
    cfg = dataclasses.replace(
        RunConfig(), load_slack=args.load_slack, seed=args.seed, approx_min_clients=args.approx_min_clients
    )
    for size in args.sizes:
        rng = np.random.default_rng(args.seed)
        state = AlignmentState(args.experts, **cfg.alignment_kwargs())
        ids = [f"client-{i}" for i in range(size)]
        state.index(ids)
        state.fitness[:] = rng.random((size, args.experts))
        if args.skew > 0:  # a fraction of clients strongly prefers experts 0 and 1
            fans = rng.random(size) < args.skew
            state.fitness[fans, :2] += 1.0
        state.usage[:] = rng.random(args.experts) * size
        capacity = rng.integers(1, 9, size)
        for policy in args.policies:
            times = []
            plan = state.plan(ids, capacity, policy, np.random.default_rng(0))  # warm-up
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                plan = state.plan(ids, capacity, policy, np.random.default_rng(rep))
                times.append(time.perf_counter() - t0)
            median, least = median_min(times)
            gap = f" {optimality_gap(state, ids, capacity, plan):>9.2e}" if args.gap else ""
            if args.gap and policy != "load_balanced":
                gap = f" {'-':>9}"
            out.write(
                f"{size:>8} {policy:>14} {1e3 * median:>10.1f} {1e3 * least:>9.1f} "
                f"{load_cv(plan.sum(axis=0)):>8.4f}{gap}\n"
            )
            out.flush()
    return 0


def optimality_gap(state: AlignmentState, ids: list[str], capacity: np.ndarray, plan: np.ndarray) -> float:
    """Relative desirability gap of ``plan`` to the exact ``load_balanced`` plan of ``state``."""
    knobs = {name: getattr(state, name) for name in KNOBS}
    exact_state = AlignmentState(state.num_experts, **{**knobs, "approx_min_clients": 0})
    exact_state.index(ids)
    exact_state.fitness = state.fitness[state.index(ids)]
    exact_state.usage = state.usage.copy()
    exact = exact_state.plan(ids, capacity, "load_balanced", np.random.default_rng(0))
    d = state.desirability(ids)
    best = float((d * exact).sum())
    return (best - float((d * plan).sum())) / abs(best) if best else 0.0
