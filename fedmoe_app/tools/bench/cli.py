"""Command line of the benchmarks: ``python -m fedmoe_app.tools.bench <name> [options]``.

Each benchmark is a subcommand (``argparse`` subparsers) served by its own module, which
provides ``add_arguments(parser)`` and ``bench_<name>(args) -> int``; add one to
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import alignment, compute, dispatch, experts, memory, overhead, scale, tokens


class Command(NamedTuple):
    """One subcommand: its help line, its options and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


#: Subcommand name -> :class:`Command`, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    "alignment": Command(
        "time AlignmentState.plan per policy", alignment.add_arguments, alignment.bench_alignment
    ),
    "experts": Command(
        "training time per sample as the number of experts grows",
        experts.add_arguments,
        experts.bench_experts,
    ),
    "dispatch": Command(
        "expert layer forward+backward per dispatch method", dispatch.add_arguments, dispatch.bench_dispatch
    ),
    "overhead": Command(
        "app (flwr run, simulation) vs plain PyTorch loop", overhead.add_arguments, overhead.bench_overhead
    ),
    "memory": Command(
        "capacity memory model vs measured peak RSS growth",
        memory.add_arguments,
        memory.bench_memory,
        memory.__doc__,
    ),
    "compute": Command(
        "capacity's training-time estimate (FLOPs, matmul GFLOP/s) vs measured samples/s",
        compute.add_arguments,
        compute.bench_compute,
        compute.__doc__,
    ),
    "tokens": Command(
        "transformer-moe training tokens/s: the app's loop vs a plain PyTorch loop",
        tokens.add_arguments,
        tokens.bench_tokens,
        tokens.__doc__,
    ),
    "scale": Command(
        "the app with N simulated SuperNodes: start-up, server time per round, peak RSS, checkpoint",
        scale.add_arguments,
        scale.bench_scale,
        scale.__doc__,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser with one subparser per benchmark.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_app.tools.bench", description="fedmoe micro-benchmarks, one per subcommand."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
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
