"""Benchmark ``overhead``: the same federated training through the app and as a plain PyTorch loop.

Usage::

    python -m fedmoe_app.tools.bench overhead [--clients 10 --rounds 3 --dataset fashion-mnist|synthetic]

The app runs with ``flwr run`` in local simulation (:func:`fedmoe_app.tools.launch.launch`),
the plain loop (:mod:`.plain`) replays its per-round assignment; both times and their
ratio are printed (criterion: app <= 1.25x plain). See ``docs/PERFORMANCE.md`` for results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .common import environ, machine_summary, timed_launch, training_rounds, work_folder
from .plain import overhead_run_config, run_plain_fresh

#: The repository root: the Flower app's folder (its ``pyproject.toml``).
ROOT = Path(__file__).resolve().parents[3]


def _worker_niceness(value: int | None) -> str:
    """Describe the Ray worker niceness of the app: ``value``, the environment's, or launch's."""
    from fedmoe_app.tools.launch import WORKER_NICENESS

    if value is not None:
        return str(value)
    env = os.environ.get("RAY_worker_niceness")
    return (
        f"{env} (environment)" if env is not None else f"{WORKER_NICENESS} (fedmoe_app.tools.launch default)"
    )


#: First log line of each phase of an app run, as printed by ``flwr run --stream``.
APP_MARKERS: dict[str, str] = {
    "flwr run output": "",
    "server app started": "Starting FedMoE",
    "round 0 evaluated": "[ROUND 0]",
    "round 1 started": "[ROUND 1/",
    "rounds done, outputs saved": "fedmoe: done",
}


def run_app_timed(
    args: argparse.Namespace, workdir: Path, run_name: str, launch_fn: Callable[..., int] | None = None
) -> dict[str, Any]:
    """Run the app with ``flwr run`` in local simulation; return its timings and assignments.

    The run's log is read through a pipe and time-stamped, which gives the time at which
    each phase of :data:`APP_MARKERS` began (seconds after the launch call).

    Parameters
    ----------
    args : argparse.Namespace
        Options of ``python -m fedmoe_app.tools.bench overhead``.
    workdir : pathlib.Path
        Where the run's log (``<run_name>.log``) and outputs (``outputs/<run_name>``) go.
    run_name : str
        The run's ``run-name``.
    launch_fn : callable, optional
        Replaces :func:`fedmoe_app.tools.launch.launch` (same signature).

    Returns
    -------
    dict
        ``total_s``, per-round ``round_s``, ``accuracy`` and ``assignments`` (from the run's
        ``metrics.json``), the ``run_config`` and the phase ``marks`` (name -> seconds).

    Raises
    ------
    RuntimeError
        When the run exits with a non-zero code.

    """
    from fedmoe_app.tools.launch import launch, whole_if_integral

    launch_fn = launch_fn or launch
    run_config = overhead_run_config(args, run_name, str(workdir / "outputs"))
    num_cpus, num_gpus = whole_if_integral(args.num_cpus), whole_if_integral(args.num_gpus)
    log_path = workdir / f"{run_name}.log"
    env = {"PYTHONUNBUFFERED": "1"}
    if args.threads > 0:  # torch threads of every app process (Ray keeps a preset value)
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.worker_niceness is not None:  # launch sets 0 unless the environment says otherwise
        env["RAY_worker_niceness"] = str(args.worker_niceness)
    with environ(env):
        code, total, marks = timed_launch(
            launch_fn,
            log_path,
            APP_MARKERS,
            app_dir=ROOT,
            num_supernodes=args.clients,
            run_config=run_config,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            output_root=workdir,
            timeout=args.timeout,
        )
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"app run failed with exit code {code}; log tail:\n{tail}")
    rounds = training_rounds(workdir, run_name)
    return {
        "total_s": total,
        "round_s": [float(r["wall_time_s"]) for r in rounds],
        "accuracy": [r.get("accuracy") for r in rounds],
        "assignments": [r["assignment"] for r in rounds],
        "run_config": run_config,
        "marks": marks,
    }


def _median(values: Sequence[float]) -> float:
    """Median of ``values`` without NaN (a phase marker that never appeared); NaN if none is left."""
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _mark(app: dict[str, Any], name: str) -> float:
    """Seconds after the launch at which phase ``name`` of an app run began (NaN if never)."""
    return float(app["marks"].get(name, float("nan")))


def _run_pairs(
    args: argparse.Namespace, threads: int
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], float]]]:
    """Run ``--repeats`` app runs, each followed by the plain loop replaying its assignment.

    Returns the app runs' figures (:func:`run_app_timed`) and the plain loops' results with
    their total wall seconds (:func:`~.plain.run_plain_fresh`), in run order.
    """
    apps: list[dict[str, Any]] = []
    plains: list[tuple[dict[str, Any], float]] = []
    with work_folder(args.workdir, "fedmoe-overhead-") as workdir:
        for rep in range(args.repeats):
            app = run_app_timed(args, workdir, f"overhead-{os.getpid()}-{rep}")
            apps.append(app)
            plains.append(
                run_plain_fresh(app["run_config"], args.clients, app["assignments"], threads, args.timeout)
            )
    return apps, plains


def _write_header(out: TextIO, args: argparse.Namespace, threads: int, plain_threads: int) -> None:
    """Write the report's lines on the settings, the app's and the plain loop's, and the machine."""
    actors = max(1, int((os.cpu_count() or 1) // max(float(args.num_cpus), 1e-9)))
    app_threads = str(args.threads) if args.threads > 0 else f"Ray default (floor(num-cpus) = {threads})"
    out.write(
        f"# overhead benchmark: {args.dataset}, {args.clients} clients, {args.rounds} rounds, "
        f"fraction-train {args.fraction_train}, policy {args.policy}, {args.num_experts} experts "
        f"({args.experts_per_client} per client unless dense), {args.local_epochs} local epoch(s), "
        f"batch {args.batch_size}, device {args.device}, client evaluation off, repeats={args.repeats} "
        "(median)\n"
    )
    out.write(
        f"# app: flwr run, simulation, client-resources num-cpus={args.num_cpus} num-gpus={args.num_gpus} "
        f"(up to {actors} client(s) at a time), torch threads per process {app_threads}, Ray worker "
        f"niceness {_worker_niceness(args.worker_niceness)}; "
        f"plain loop: one process, clients one after another, torch threads={plain_threads}\n"
    )
    out.write(f"# machine: {machine_summary()}\n")


def _app_phases(apps: Sequence[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """Return where each app run's total went: (phase, seconds of every run) from its markers."""
    return [
        (
            "launch -> ServerApp started (SuperLink, flwr run, FAB, Ray)",
            [_mark(a, "server app started") for a in apps],
        ),
        (
            "ServerApp start -> round 0 evaluated (data, model, eval)",
            [_mark(a, "round 0 evaluated") - _mark(a, "server app started") for a in apps],
        ),
        ("rounds 1..R (wall_time_s, round 1 incl. client start-up)", [sum(a["round_s"]) for a in apps]),
        (
            "checkpoints between rounds, final model, plots",
            [
                _mark(a, "rounds done, outputs saved") - _mark(a, "round 1 started") - sum(a["round_s"])
                for a in apps
            ],
        ),
        (
            "shutdown (stop SuperLink, reap Ray)",
            [a["total_s"] - _mark(a, "rounds done, outputs saved") for a in apps],
        ),
    ]


def _write_times(
    out: TextIO,
    args: argparse.Namespace,
    apps: Sequence[dict[str, Any]],
    plains: Sequence[tuple[dict[str, Any], float]],
) -> tuple[float, float]:
    """Write the app-vs-plain table, the app's phases and every repeat; return the rounds medians."""
    steady = args.rounds > 1
    app_rounds = _median([sum(a["round_s"]) for a in apps])
    plain_rounds = _median([sum(p["round_s"]) for p, _ in plains])
    rows = [
        ("rounds: train + aggregate + central eval (sum over rounds)", app_rounds, plain_rounds),
        (
            "steady rounds (2..R, after warm-up)",
            _median([sum(a["round_s"][1:]) for a in apps]) if steady else float("nan"),
            _median([sum(p["round_s"][1:]) for p, _ in plains]) if steady else float("nan"),
        ),
        (
            "total wall incl. start-up (SuperLink/Ray | python+data)",
            _median([a["total_s"] for a in apps]),
            _median([t for _, t in plains]),
        ),
    ]
    out.write(f"{'what':<60} {'app s':>8} {'plain s':>8} {'ratio':>6}\n")
    for label, a, p in rows:
        out.write(f"{label:<60} {a:>8.1f} {p:>8.1f} {a / p if p else float('nan'):>6.2f}\n")
    out.write("# where the app's total goes (median, s):\n")
    for label, values in _app_phases(apps):
        out.write(f"#   {label:<62} {_median(values):>7.1f}\n")
    plain_setup = _median([p["setup_s"] for p, _ in plains])
    out.write(
        f"# plain loop: start-up (python, imports, data, partitions, round-0 eval) {plain_setup:.1f} s\n"
    )
    for i, (a, (p, t)) in enumerate(zip(apps, plains)):
        out.write(
            f"# repeat {i}: app rounds {[round(x, 1) for x in a['round_s']]} total {a['total_s']:.1f} s | "
            f"plain rounds {[round(x, 1) for x in p['round_s']]} total {t:.1f} s | "
            f"final accuracy app {a['accuracy'][-1]} plain {p['accuracy'][-1]:.4f}\n"
        )
    return app_rounds, plain_rounds


def bench_overhead(args: argparse.Namespace) -> int:
    """Compare the same federated training through the app and as a plain PyTorch loop.

    The app runs first (``flwr run`` via :func:`fedmoe_app.tools.launch.launch`, client
    evaluation off, fixed capacity); the plain loop then replays the app's exact
    per-round assignment (same clients, same experts) sequentially in a fresh process.
    Repeats alternate app and plain runs; medians are reported.

    Parameters
    ----------
    args : argparse.Namespace
        See ``python -m fedmoe_app.tools.bench overhead --help``.

    Returns
    -------
    int
        0 when the median round-time ratio is within ``--max-ratio``, else 1.

    """
    out = sys.stdout
    threads = args.threads or max(1, int(float(args.num_cpus)))
    apps, plains = _run_pairs(args, threads)
    _write_header(out, args, threads, plains[0][0]["threads"])
    app_rounds, plain_rounds = _write_times(out, args, apps, plains)
    ratio = app_rounds / plain_rounds if plain_rounds else float("inf")
    ok = ratio <= args.max_ratio
    out.write(f"# criterion (rounds ratio <= {args.max_ratio}): {ratio:.2f} -> {'PASS' if ok else 'FAIL'}\n")
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``overhead`` to ``parser``, its ``argparse`` subparser."""
    p = parser
    p.add_argument("--clients", type=int, default=10, help="simulated clients (SuperNodes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", choices=("fashion-mnist", "synthetic", "cifar10"), default="fashion-mnist")
    p.add_argument("--policy", choices=("random", "dense"), default="random")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--experts-per-client", type=int, default=2)
    p.add_argument("--fraction-train", type=float, default=0.5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples-per-client", type=int, default=0, help="0: whole partition")
    p.add_argument("--central-eval-samples", type=int, default=0, help="0: whole test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument(
        "--num-cpus", type=float, default=2, help="client-resources num-cpus of the app (default 2)"
    )
    p.add_argument("--num-gpus", type=float, default=0, help="client-resources num-gpus of the app")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per training process, app (OMP_NUM_THREADS) and plain loop alike "
        "(default 1; 0: Ray's default for the app, = --num-cpus, and --num-cpus for the plain loop)",
    )
    p.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="RAY_worker_niceness of the app's clients (default: launch's 0; Ray's own default is 15)",
    )
    p.add_argument("--repeats", type=int, default=1, help="app + plain pairs (medians reported)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--workdir", default="", help="keep logs and outputs here (default: temporary)")
    p.add_argument("--max-ratio", type=float, default=1.25, help="criterion on the rounds ratio")
