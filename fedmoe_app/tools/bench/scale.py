"""Benchmark ``scale``: the app in simulation with N SuperNodes, server costs against N.

Usage::

    python -m fedmoe_app.tools.bench scale [--supernodes 100,1000] [--rounds 5] [--sampled 10]

For every N the app runs through :func:`fedmoe_app.tools.launch.launch` (a managed local
SuperLink, Ray simulation) with N SuperNodes, ``--sampled`` of them trained per round
(``discovery = "sampled"``, client evaluation off, tiny local work). It prints, per N:

* start-up: launch to the start of round 1 (SuperLink, simulation, Ray, round-0 evaluation);
* the server's own seconds per round, from ``timing_s`` in ``metrics.json``
  (``configure`` incl. ``planning``, ``aggregate``), without the time spent waiting for clients;
* peak resident memory (psutil, polled) of the SuperLink process, of the simulation process
  that runs the ServerApp, and of the Ray processes (workers and Ray's own services), each
  summed over that group;
* the checkpoint's size and save time (the ServerApp's log line after every round).

A JSON of all figures and a log-log plot against N go to ``--out``. See ``docs/SCALE.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .common import int_list, machine_summary, timed_launch, training_rounds, work_folder

#: The repository root: the Flower app's folder (its ``pyproject.toml``).
ROOT = Path(__file__).resolve().parents[3]

MARKERS: dict[str, str] = {"server app started": "Starting FedMoE", "round 1 started": "[ROUND 1/"}

CHECKPOINT_LINE = re.compile(
    r"checkpoint of round (\d+): (\d+) bytes, (\d+) clients seen, saved in ([0-9.]+) s"
)

#: Process groups whose resident memory is reported (matched on the command line).
GROUPS: tuple[str, ...] = ("superlink", "serverapp", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``scale`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument(
        "--supernodes",
        type=int_list,
        default=[100, 1000],
        help="comma-separated SuperNode counts (default 100,1000)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="server rounds per run (default 5)")
    parser.add_argument(
        "--sampled",
        type=int_list,
        default=[10],
        help="comma-separated SuperNodes trained per round; every N runs with each (default 10)",
    )
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="the app's dataset, split N ways IID (default fashion-mnist)",
    )
    parser.add_argument("--samples", type=int, default=32, help="max-samples-per-client (default 32)")
    parser.add_argument("--num-cpus", type=float, default=1, help="Ray CPUs per client (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    parser.add_argument(
        "--poll", type=float, default=0.25, help="seconds between memory samples (default 0.25)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="folder for scale.json, scale.png and the run logs (default: a temp dir)",
    )
    parser.add_argument("--seed", type=int, default=0, help="run-config seed")


def scale_run_config(
    args: argparse.Namespace, supernodes: int, sampled: int, run_name: str, output_dir: str
) -> dict[str, Any]:
    """Run config of one benchmark run: ``sampled`` of ``supernodes`` trained per round."""
    return {
        "dataset": args.dataset,
        "partitioner": "iid",
        "num-server-rounds": args.rounds,
        "fraction-train": sampled / supernodes,
        "min-train-nodes": sampled,
        "fraction-evaluate": 0.0,
        "min-evaluate-nodes": 0,
        "discovery": "sampled",
        "local-epochs": 1,
        "max-samples-per-client": args.samples,
        "central-eval-samples": 256,
        "seed": args.seed,
        "run-name": run_name,
        "output-dir": output_dir,
    }


def group_of(proc: psutil.Process) -> str | None:
    """Which of :data:`GROUPS` ``proc`` belongs to, by its command line (None: none)."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if "flower-superlink" in cmd:
        return "superlink"
    if "flwr-simulation" in cmd or "flwr-serverapp" in cmd:
        return "serverapp"
    if "ray" in cmd.lower():
        return "ray"
    return None


class PeakRss:
    """Poll the resident memory of this process's descendants, per :data:`GROUPS`, in a thread.

    Parameters
    ----------
    interval : float
        Seconds between samples.

    Attributes
    ----------
    peak : dict
        Group -> the largest sum of resident bytes over that group's processes seen in one sample.

    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.peak = dict.fromkeys(GROUPS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = dict.fromkeys(GROUPS, 0)
            for proc in me.children(recursive=True):
                group = group_of(proc)
                if group is None:
                    continue
                try:
                    total[group] += proc.memory_info().rss
                except psutil.Error:
                    continue
            for group, rss in total.items():
                self.peak[group] = max(self.peak[group], rss)
            self._stop.wait(self.interval)


def run_one(args: argparse.Namespace, supernodes: int, sampled: int, workdir: Path) -> dict[str, Any]:
    """Run the app once: ``supernodes`` SuperNodes, ``sampled`` per round; its figures (module docstring)."""
    from fedmoe_app.tools.launch import launch, whole_if_integral

    run_name = f"scale-{supernodes}-{sampled}"
    run_config = scale_run_config(args, supernodes, sampled, run_name, str(workdir / "outputs"))
    log_path = workdir / f"{run_name}.log"
    cpus = whole_if_integral(args.num_cpus)
    with PeakRss(args.poll) as rss:
        code, total, marks = timed_launch(
            launch,
            log_path,
            MARKERS,
            app_dir=ROOT,
            num_supernodes=supernodes,
            run_config=run_config,
            num_cpus=cpus,
            output_root=workdir,
            timeout=args.timeout,
        )
    text = log_path.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(
            f"run with {supernodes} SuperNodes failed (exit code {code}); log tail:\n{text[-3000:]}"
        )
    rows = training_rounds(workdir, run_name)
    ckpts = [(int(b), int(c), float(s)) for _, b, c, s in CHECKPOINT_LINE.findall(text)]

    def med(key: str) -> float:
        return statistics.median(float(r["timing_s"][key]) for r in rows)

    return {
        "supernodes": supernodes,
        "sampled_per_round": sampled,
        "rounds": len(rows),
        "total_s": total,
        "startup_s": marks.get("round 1 started", float("nan")),
        "server_round_s": statistics.median(
            float(r["timing_s"]["configure"] + r["timing_s"]["aggregate"]) for r in rows
        ),
        "configure_s": med("configure"),
        "planning_s": med("planning"),
        "aggregate_s": med("aggregate"),
        "clients_s": med("clients"),
        "wall_round_s": statistics.median(float(r["wall_time_s"]) for r in rows),
        "peak_rss_bytes": dict(rss.peak),
        "checkpoint_bytes": ckpts[-1][0] if ckpts else None,
        "checkpoint_clients_seen": ckpts[-1][1] if ckpts else None,
        "checkpoint_save_s": max(s for _, _, s in ckpts) if ckpts else None,
        "run_config": run_config,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Write log-log plots of the figures against N (one line per ``sampled``) and against ``sampled``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, Any]] = [
        ("start-up (s)", "supernodes", lambda r: {"launch to round 1": r["startup_s"]}),
        (
            "server time per round (s)",
            "supernodes",
            lambda r: {k: r[f"{k}_s"] for k in ("configure", "planning", "aggregate")},
        ),
        ("peak RSS (MB)", "supernodes", lambda r: {g: r["peak_rss_bytes"][g] / 1e6 for g in GROUPS}),
        (
            "checkpoint",
            "supernodes",
            lambda r: {
                "size (MB)": (r["checkpoint_bytes"] or 0) / 1e6,
                "save (s)": r["checkpoint_save_s"] or 0,
            },
        ),
        (
            "server time per round (s)",
            "sampled_per_round",
            lambda r: {"configure + aggregate": r["server_round_s"]},
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6))
    for ax, (title, x_key, values) in zip(axes, panels):
        other = "sampled_per_round" if x_key == "supernodes" else "supernodes"
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            for label, y in values(r).items():
                name = f"{label}, {'sampled' if other == 'sampled_per_round' else 'N'} {r[other]}"
                lines.setdefault(name, []).append((r[x_key], max(float(y), 1e-6)))
        for name, points in lines.items():
            if len({x for x, _ in points}) > 1 or len(results) == 1:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("simulated SuperNodes" if x_key == "supernodes" else "SuperNodes trained per round")
        ax.set_title(title)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench_scale(args: argparse.Namespace) -> int:
    """Run the app with each SuperNode count of ``args.supernodes``; print and save the figures.

    Parameters
    ----------
    args : argparse.Namespace
        See ``python -m fedmoe_app.tools.bench scale --help``.

    Returns
    -------
    int
        Exit status: 0 when every run completed (a failed run raises).

    """
    out = sys.stdout
    with work_folder(args.out, "fedmoe-scale-") as folder:
        out.write(
            f"# scale benchmark: {args.rounds} rounds, {','.join(map(str, args.sampled))} SuperNodes "
            "trained per round, "
            f"dataset {args.dataset} (IID), {args.samples} samples per client, discovery sampled\n"
        )
        out.write(f"# machine: {machine_summary()}\n")
        out.write(
            f"{'nodes':>7} {'sampled':>7} {'start s':>8} {'server s':>9} {'config s':>9} {'plan s':>8} "
            f"{'aggr s':>8} {'link MB':>8} {'app MB':>8} {'ray MB':>8} {'ckpt kB':>8} {'save s':>7}\n"
        )
        results = []
        for n in args.supernodes:
            for sampled in sorted({min(k, n) for k in args.sampled}):
                t0 = time.perf_counter()
                res = run_one(args, n, sampled, folder)
                results.append(res)
                peak = res["peak_rss_bytes"]
                out.write(
                    f"{n:>7} {sampled:>7} {res['startup_s']:>8.1f} {res['server_round_s']:>9.3f} "
                    f"{res['configure_s']:>9.3f} {res['planning_s']:>8.4f} {res['aggregate_s']:>8.3f} "
                    f"{peak['superlink'] / 1e6:>8.0f} {peak['serverapp'] / 1e6:>8.0f} "
                    f"{peak['ray'] / 1e6:>8.0f} "
                    f"{(res['checkpoint_bytes'] or 0) / 1e3:>8.1f} {res['checkpoint_save_s'] or 0:>7.3f}"
                    f"   ({time.perf_counter() - t0:.0f} s)\n"
                )
                out.flush()
                (folder / "scale.json").write_text(json.dumps(results, indent=1))
        plot(results, folder / "scale.png")
        out.write(f"# figures: {folder / 'scale.json'}, plot: {folder / 'scale.png'}\n")
    return 0
