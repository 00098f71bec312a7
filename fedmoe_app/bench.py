"""Micro-benchmarks for fedmoe.

Usage::

    python -m fedmoe_app.bench alignment [--sizes 1000,10000,100000] [--experts 64] [--repeats 3]

Each benchmark is a subcommand (``argparse`` subparsers): add one with a ``bench_<name>(args)``
function and a parser in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from . import alignment
from .alignment import POLICIES, AlignmentState, load_cv

ALIGNMENT_POLICIES: tuple[str, ...] = ("random", "greedy", "load_balanced")


def _int_list(text: str) -> list[int]:
    """Parse ``"1000,10000"`` into ``[1000, 10000]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _policy_list(text: str) -> list[str]:
    """Parse ``"random,greedy"``, checking every name is a known policy."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in POLICIES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown}; choose from {POLICIES}")
    return values


def machine_summary() -> str:
    """Describe the machine the benchmark runs on (CPU count, processor, Python, numpy).

    Returns
    -------
    str
        One line.

    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpus} cores ({model or cpu}), Python {platform.python_version()}, numpy {np.__version__}"


def bench_alignment(args: argparse.Namespace) -> int:
    """Time ``AlignmentState.plan`` per policy for C clients x E experts.

    Random fitness in ``[0, 1)`` (plus 1 on experts 0 and 1 for a ``--skew`` fraction of the
    clients), random usage, capacities uniform in 1..8. Prints the median plan time over
    ``--repeats`` runs (after one warm-up) and the load CV of the plan.

    Parameters
    ----------
    args : argparse.Namespace
        ``sizes`` (list of int), ``experts``, ``repeats``, ``seed``, ``policies``,
        ``skew``, ``full_network`` (solve ``load_balanced`` without candidate pruning, for comparison).

    Returns
    -------
    int
        Exit status (0).

    """
    out = sys.stdout
    if args.full_network:  # comparison only: disable candidate pruning in the solver
        alignment._PRUNE_MIN_ARCS = 1 << 62
    network = "full network" if args.full_network else "pruned + certified"
    out.write(
        f"# alignment benchmark: E={args.experts}, capacities 1-8, repeats={args.repeats}, "
        f"skew={args.skew}, load_balanced solver: {network}\n"
    )
    out.write(f"# machine: {machine_summary()}\n")
    out.write(f"{'clients':>8} {'policy':>14} {'median ms':>10} {'min ms':>9} {'load CV':>8}\n")
    for size in args.sizes:
        rng = np.random.default_rng(args.seed)
        state = AlignmentState(args.experts, seed=args.seed)
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
            out.write(
                f"{size:>8} {policy:>14} {1e3 * statistics.median(times):>10.1f} "
                f"{1e3 * min(times):>9.1f} {load_cv(plan):>8.4f}\n"
            )
            out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser with one subparser per benchmark.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_app.bench", description="fedmoe micro-benchmarks, one per subcommand."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("alignment", help="time AlignmentState.plan per policy")
    p.add_argument(
        "--sizes",
        type=_int_list,
        default=[1000, 10000, 100000],
        help="comma-separated client counts (default 1000,10000,100000)",
    )
    p.add_argument("--experts", type=int, default=64, help="number of experts (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random instance")
    p.add_argument(
        "--policies",
        type=_policy_list,
        default=list(ALIGNMENT_POLICIES),
        help="comma-separated subset of " + ",".join(POLICIES),
    )
    p.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="fraction of clients that strongly prefer experts 0 and 1 (default 0)",
    )
    p.add_argument(
        "--full-network",
        action="store_true",
        help="solve load_balanced on the full C x E network (no pruning), for comparison",
    )
    p.set_defaults(func=bench_alignment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark named by the first argument.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        Exit status.

    """
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
