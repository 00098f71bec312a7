"""Micro-benchmarks for fedmoe.

Usage::

    python -m fedmoe_app.bench alignment [--sizes 1000,10000,100000] [--experts 64] [--repeats 3]
    python -m fedmoe_app.bench experts [--experts 8,16,32,64] [--batch-size 32] [--threads 1]
    python -m fedmoe_app.bench dispatch [--experts 8,16,32,64] [--batch-sizes 32,64]
    python -m fedmoe_app.bench overhead [--clients 10 --rounds 3 --dataset fashion-mnist|synthetic]

``experts`` times local training per sample as the number of experts grows (criterion:
E=64 within 1.5x of E=8); ``dispatch`` times the expert layer alone (forward + backward)
for each dispatch method under balanced and skewed routing; ``overhead`` runs the same
federated training as a plain PyTorch loop and through the app (``flwr run`` in local
simulation) and prints both times and their ratio (criterion: app <= 1.25x plain).
See ``docs/PERFORMANCE.md`` for results.

Each benchmark is a subcommand (``argparse`` subparsers): add one with a ``bench_<name>(args)``
function and a parser in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import alignment
from .alignment import POLICIES, AlignmentState, load_cv
from .config import RunConfig

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
        ``skew``, ``load_slack``, ``full_network`` (solve ``load_balanced`` without candidate
        pruning, for comparison).

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
        f"skew={args.skew}, load_slack={args.load_slack}, load_balanced solver: {network}\n"
    )
    out.write(f"# machine: {machine_summary()}\n")
    out.write(f"{'clients':>8} {'policy':>14} {'median ms':>10} {'min ms':>9} {'load CV':>8}\n")
    for size in args.sizes:
        rng = np.random.default_rng(args.seed)
        state = AlignmentState(args.experts, load_slack=args.load_slack, seed=args.seed)
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


ROOT = Path(__file__).resolve().parents[1]
DISPATCH_CHOICES = ("auto", "grouped", "gather", "all")


def _median_min(values: Sequence[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


def _set_threads(threads: int) -> int:
    """Set torch's intra-op threads (``threads`` > 0) and return the count in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _worker_niceness(value: int | None) -> str:
    """Describe the Ray worker niceness of the app: ``value``, the environment's, or launch's."""
    from .launch import WORKER_NICENESS

    if value is not None:
        return str(value)
    env = os.environ.get("RAY_worker_niceness")
    return f"{env} (environment)" if env is not None else f"{WORKER_NICENESS} (fedmoe_app.launch default)"


def _methods(choice: str) -> list[str]:
    return ["grouped", "gather"] if choice == "all" else [choice]


def bench_experts(args: argparse.Namespace) -> int:
    """Time local training per sample (top-k routing) as the number of experts grows.

    The client holds every expert; expert size, batch and data are the same for every E.
    Each cell trains one epoch over ``--samples`` random images with
    :func:`fedmoe_app.training.train` (forward, backward, fused SGD step, feedback); cells
    are interleaved round-robin over ``--repeats`` passes after one warm-up pass, and the
    median and minimum over passes are printed, with process CPU time (robust to other
    load on a single thread) beside wall time.

    Parameters
    ----------
    args : argparse.Namespace
        ``experts`` (list of int), ``batch_size``, ``samples``, ``top_k``, ``threads``,
        ``repeats``, ``dispatch``, ``image_size``, ``channels``, ``seed``.

    Returns
    -------
    int
        0 when the largest E is within ``--max-ratio`` of the smallest (CPU time), else 1.

    """
    import torch

    from .data import Split
    from .model import ModelSpec, build_model
    from .training import train

    out = sys.stdout
    threads = _set_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.samples, args.channels, args.image_size, args.image_size)
    data = Split(torch.randn(*shape, generator=gen), torch.randint(0, 10, (args.samples,), generator=gen))
    cells = [(e, m) for e in args.experts for m in _methods(args.dispatch)]
    wall: dict[tuple[int, str], list[float]] = {c: [] for c in cells}
    cpu: dict[tuple[int, str], list[float]] = {c: [] for c in cells}
    used: dict[tuple[int, str], str] = {}
    for rep in range(args.repeats + 1):  # pass 0 warms up
        for e, method in cells:
            spec = ModelSpec(args.channels, args.image_size, 10, num_experts=e, top_k=args.top_k)
            model = build_model(spec, seed=args.seed)
            model.experts.dispatch = method
            used[(e, method)] = model.experts.method(data.images[:1])
            c0 = time.process_time()
            res = train(model, data, epochs=1, batch_size=args.batch_size, lr=0.02, seed=rep)
            if rep:
                wall[(e, method)].append(1e6 * res.train_time_s / args.samples)
                cpu[(e, method)].append(1e6 * (time.process_time() - c0) / args.samples)
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
    for method in _methods(args.dispatch):
        base_w = statistics.median(wall[(args.experts[0], method)])
        base_c = statistics.median(cpu[(args.experts[0], method)])
        for e in args.experts:
            (mw, lw), (mc, lc) = _median_min(wall[(e, method)]), _median_min(cpu[(e, method)])
            out.write(
                f"{e:>4} {used[(e, method)]:>8} {mw:>8.0f} {lw:>6.0f} {mc:>7.0f} {lc:>6.0f} "
                f"{mw / base_w:>8.2f} {mc / base_c:>7.2f}\n"
            )
        ratio = statistics.median(cpu[(args.experts[-1], method)]) / base_c
        ok = ratio <= args.max_ratio
        verdict |= 0 if ok else 1
        out.write(
            f"# {used[(args.experts[-1], method)]}: E={args.experts[-1]} / E={args.experts[0]} = "
            f"{ratio:.2f} (cpu time) -> {'PASS' if ok else 'FAIL'} (criterion <= {args.max_ratio})\n"
        )
    return verdict


def routing_slots(batch: int, n: int, k: int, skewed: bool, gen: Any) -> Any:
    """Expert slots of ``batch`` samples, each routed to ``k`` distinct experts of ``n``.

    Balanced: uniform. Skewed: expert ``i`` drawn with weight ``2**-i`` (experts 0 and 1
    get most rows), the worst case for padded per-expert batches.
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
    """Alternative (benchmark only): padded when ``n x max_count <= 2 x rows``, else gather."""
    from .model import dispatch_gather

    n = w1.shape[0]
    cap = int(slots.bincount(minlength=n).max())
    if n * cap <= 2 * len(slots):
        return dispatch_padded(x, slots, w1, b1, w2, b2, cap)
    return dispatch_gather(x, slots, w1, b1, w2, b2)


def dispatch_loop(x: Any, slots: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> Any:
    """Alternative (benchmark only): sort rows by slot, one ``addmm`` pair per non-empty expert."""
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


ALTERNATIVES: dict[str, Callable[..., Any]] = {
    "padded": dispatch_padded,
    "hybrid": dispatch_hybrid,
    "loop": dispatch_loop,
}


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

    from .model import Experts

    out = sys.stdout
    threads = _set_threads(args.threads)
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
                cpu: dict[str, list[float]] = {m: [] for m in methods}

                def call(
                    method: str,
                    layer: Experts = layer,
                    weights: tuple[Any, ...] = weights,
                    slots: Any = slots,
                    x: Any = x,
                    grad: Any = grad,
                ) -> None:
                    if method in ALTERNATIVES:
                        ALTERNATIVES[method](x, slots, *weights).backward(grad)
                    else:
                        layer.dispatch = method
                        layer(x, slots).backward(grad)

                for method in methods:
                    call(method)
                for _ in range(args.repeats):
                    for method in methods:
                        c0 = time.process_time()
                        for _ in range(args.iters):
                            call(method)
                        cpu[method].append(1e6 * (time.process_time() - c0) / args.iters)
                med = {m: statistics.median(v) for m, v in cpu.items()}
                out.write(
                    f"{batch:>5} {n:>4} {'skewed' if skewed else 'balanced':>8} "
                    f"{float(counts.max() / counts.mean()):>8.1f} "
                    + "".join(f"{med[m]:>8.0f}" for m in methods)
                    + f" {min(med, key=med.__getitem__):>8}\n"
                )
                out.flush()
    return 0


# --------------------------------------------------------------------------- overhead
def overhead_run_config(args: argparse.Namespace, run_name: str, output_dir: str) -> dict[str, Any]:
    """Run config shared by the app run and the plain loop (comparable work, no client eval)."""
    return {
        "dataset": args.dataset,
        "num-server-rounds": args.rounds,
        "policy": args.policy,
        "capacity": "fixed",
        "experts-per-client": args.experts_per_client,
        "num-experts": args.num_experts,
        "fraction-train": args.fraction_train,
        "min-train-nodes": 1,
        "fraction-evaluate": 0.0,
        "min-evaluate-nodes": 0,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "max-samples-per-client": args.max_samples_per_client,
        "central-eval-samples": args.central_eval_samples,
        "seed": args.seed,
        "device": args.device,
        "run-name": run_name,
        "output-dir": output_dir,
    }


def plain_loop(
    run_config: Mapping[str, Any],
    num_clients: int,
    assignments: Sequence[Mapping[str, Sequence[int]]],
    threads: int,
) -> dict[str, Any]:
    """Run the app's federated training as a plain sequential PyTorch loop in this process.

    Same run config, data partitions (:func:`fedmoe_app.data.client_data`), model, local
    training (:func:`fedmoe_app.training.train`), aggregation
    (:func:`fedmoe_app.aggregation.aggregate`) and central evaluation as the app;
    ``assignments[r]`` maps client id (= partition id) to the experts it trains in round
    ``r + 1`` (read from the app's ``metrics.json``).

    Returns
    -------
    dict
        ``setup_s`` (data loading, initial model, round-0 evaluation), ``round_s`` (per-round
        training + aggregation + central evaluation), ``accuracy`` per round, ``threads``.

    """
    t_setup = time.perf_counter()
    threads = _set_threads(threads)
    from .aggregation import ClientUpdate, aggregate
    from .data import client_data, server_test_data
    from .model import ModelSpec, build_model
    from .records import load_arrays, model_to_arrays, select
    from .training import evaluate, resolve_device, train

    cfg = RunConfig.from_run_config(dict(run_config))
    device = resolve_device(cfg.device)

    def local(cid: str) -> Any:
        return client_data(
            cfg.dataset,
            int(cid),
            num_clients,
            partitioner=cfg.partitioner,
            alpha=cfg.dirichlet_alpha,
            shards=cfg.shards_per_client,
            test_fraction=cfg.local_test_fraction,
            max_samples=cfg.max_samples_per_client,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
        )

    test, info = server_test_data(
        cfg.dataset, max_samples=cfg.central_eval_samples, data_dir=cfg.data_dir, seed=cfg.seed
    )
    local("0")  # loads the dataset and computes the partitions (cached)
    spec = ModelSpec(
        info.in_channels,
        info.image_size,
        info.num_classes,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        stem_channels=cfg.stem_channels,
        feature_dim=cfg.feature_dim,
        expert_hidden=cfg.expert_hidden,
    )
    global_arrays = model_to_arrays(build_model(spec, seed=cfg.seed))
    eval_model = build_model(spec)
    load_arrays(eval_model, global_arrays)
    evaluate(eval_model, test)  # round 0, as the app does
    setup_s = time.perf_counter() - t_setup
    round_s, accuracy = [], []
    for rnd, assignment in enumerate(assignments, start=1):
        t0 = time.perf_counter()
        updates = []
        for cid, experts in sorted(assignment.items(), key=lambda kv: int(kv[0])):
            train_split, _, _ = local(cid)
            model = build_model(spec, list(experts))
            load_arrays(model, select(global_arrays, experts))
            res = train(
                model,
                train_split,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                momentum=cfg.momentum,
                aux_weight=cfg.aux_loss_weight,
                device=device,
                seed=cfg.seed + rnd,
            )
            model.cpu()
            updates.append(ClientUpdate(model_to_arrays(model), res.num_examples, res.tokens))
        global_arrays = aggregate(global_arrays, updates)
        load_arrays(eval_model, global_arrays)
        accuracy.append(evaluate(eval_model, test)[1])
        round_s.append(time.perf_counter() - t0)
    return {"setup_s": setup_s, "round_s": round_s, "accuracy": accuracy, "threads": threads}


def _plain_worker(queue: Any, *args: Any) -> None:
    try:
        queue.put(plain_loop(*args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put({"error": repr(exc)})


def run_plain_fresh(
    run_config: Mapping[str, Any],
    num_clients: int,
    assignments: Sequence[Mapping[str, Sequence[int]]],
    threads: int,
    timeout: float | None = None,
) -> tuple[dict[str, Any], float]:
    """Run :func:`plain_loop` in a fresh spawned process; return its result and total wall time.

    The total includes interpreter start-up and imports, like the app's total does.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(
        target=_plain_worker, args=(queue, dict(run_config), num_clients, assignments, threads)
    )
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    total = time.perf_counter() - t0
    if "error" in result:
        raise RuntimeError(f"plain loop failed: {result['error']}")
    return result, total


#: First log line of each phase of an app run, as printed by ``flwr run --stream``.
APP_MARKERS: dict[str, str] = {
    "flwr run output": "",
    "server app started": "Starting FedMoE",
    "round 0 evaluated": "[ROUND 0]",
    "round 1 started": "[ROUND 1/",
    "rounds done, outputs saved": "fedmoe: done",
}


@contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (inherited by the app's processes)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_app_timed(
    args: argparse.Namespace, workdir: Path, run_name: str, launch_fn: Callable[..., int] | None = None
) -> dict[str, Any]:
    """Run the app with ``flwr run`` in local simulation; return its timings and assignments.

    The run's log is read through a pipe and time-stamped, which gives the time at which
    each phase of :data:`APP_MARKERS` began (seconds after the launch call).
    """
    from .launch import launch

    launch_fn = launch_fn or launch
    run_config = overhead_run_config(args, run_name, str(workdir / "outputs"))
    num_cpus = int(args.num_cpus) if float(args.num_cpus).is_integer() else args.num_cpus
    num_gpus = int(args.num_gpus) if float(args.num_gpus).is_integer() else args.num_gpus
    log_path = workdir / f"{run_name}.log"
    marks: dict[str, float] = {}
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as reader, open(log_path, "w") as log:
            for line in reader:
                now = time.perf_counter() - t0
                log.write(f"{now:8.2f} {line}")
                for name, text in APP_MARKERS.items():
                    if name not in marks and text in line:
                        marks[name] = now

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    env = {"PYTHONUNBUFFERED": "1"}
    if args.threads > 0:  # torch threads of every app process (Ray keeps a preset value)
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.worker_niceness is not None:  # launch sets 0 unless the environment says otherwise
        env["RAY_worker_niceness"] = str(args.worker_niceness)
    with os.fdopen(write_fd, "w") as stream, _environ(env):
        code = launch_fn(
            ROOT,
            num_supernodes=args.clients,
            run_config=run_config,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            output_root=workdir,
            timeout=args.timeout,
            stream_to=stream,
        )
    total = time.perf_counter() - t0
    reader.join(timeout=30)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"app run failed with exit code {code}; log tail:\n{tail}")
    rows = json.loads((workdir / "outputs" / run_name / "metrics.json").read_text())
    rounds = [r for r in rows if r["round"] >= 1]
    return {
        "total_s": total,
        "round_s": [float(r["wall_time_s"]) for r in rounds],
        "accuracy": [r.get("accuracy") for r in rounds],
        "assignments": [r["assignment"] for r in rounds],
        "run_config": run_config,
        "marks": marks,
    }


def bench_overhead(args: argparse.Namespace) -> int:
    """Compare the same federated training through the app and as a plain PyTorch loop.

    The app runs first (``flwr run`` via :func:`fedmoe_app.launch.launch`, client
    evaluation off, fixed capacity); the plain loop then replays the app's exact
    per-round assignment (same clients, same experts) sequentially in a fresh process.
    Repeats alternate app and plain runs; medians are reported.

    Parameters
    ----------
    args : argparse.Namespace
        See ``python -m fedmoe_app.bench overhead --help``.

    Returns
    -------
    int
        0 when the median round-time ratio is within ``--max-ratio``, else 1.

    """
    out = sys.stdout
    threads = args.threads or max(1, int(float(args.num_cpus)))
    apps: list[dict[str, Any]] = []
    plains: list[tuple[dict[str, Any], float]] = []
    with tempfile.TemporaryDirectory(prefix="fedmoe-overhead-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for rep in range(args.repeats):
            app = run_app_timed(args, workdir, f"overhead-{os.getpid()}-{rep}")
            apps.append(app)
            plains.append(
                run_plain_fresh(app["run_config"], args.clients, app["assignments"], threads, args.timeout)
            )

    def med(values: Sequence[float]) -> float:
        values = [v for v in values if v == v]  # drop NaN (a phase marker that never appeared)
        return statistics.median(values) if values else float("nan")

    def mark(app: dict[str, Any], name: str) -> float:
        return float(app["marks"].get(name, float("nan")))

    steady = args.rounds > 1
    app_rounds = med([sum(a["round_s"]) for a in apps])
    app_steady = med([sum(a["round_s"][1:]) for a in apps]) if steady else float("nan")
    app_total = med([a["total_s"] for a in apps])
    plain_rounds = med([sum(p["round_s"]) for p, _ in plains])
    plain_steady = med([sum(p["round_s"][1:]) for p, _ in plains]) if steady else float("nan")
    plain_total = med([t for _, t in plains])
    plain_setup = med([p["setup_s"] for p, _ in plains])
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
        f"plain loop: one process, clients one after another, torch threads={plains[0][0]['threads']}\n"
    )
    out.write(f"# machine: {machine_summary()}\n")
    out.write(f"{'what':<60} {'app s':>8} {'plain s':>8} {'ratio':>6}\n")
    rows = [
        ("rounds: train + aggregate + central eval (sum over rounds)", app_rounds, plain_rounds),
        ("steady rounds (2..R, after warm-up)", app_steady, plain_steady),
        ("total wall incl. start-up (SuperLink/Ray | python+data)", app_total, plain_total),
    ]
    for label, a, p in rows:
        out.write(f"{label:<60} {a:>8.1f} {p:>8.1f} {a / p if p else float('nan'):>6.2f}\n")
    out.write("# where the app's total goes (median, s):\n")
    phases = [
        (
            "launch -> ServerApp started (SuperLink, flwr run, FAB, Ray)",
            [mark(a, "server app started") for a in apps],
        ),
        (
            "ServerApp start -> round 0 evaluated (data, model, eval)",
            [mark(a, "round 0 evaluated") - mark(a, "server app started") for a in apps],
        ),
        ("rounds 1..R (wall_time_s, round 1 incl. client start-up)", [sum(a["round_s"]) for a in apps]),
        (
            "checkpoints between rounds, final model, plots",
            [
                mark(a, "rounds done, outputs saved") - mark(a, "round 1 started") - sum(a["round_s"])
                for a in apps
            ],
        ),
        (
            "shutdown (stop SuperLink, reap Ray)",
            [a["total_s"] - mark(a, "rounds done, outputs saved") for a in apps],
        ),
    ]
    for label, values in phases:
        out.write(f"#   {label:<62} {med(values):>7.1f}\n")
    out.write(
        f"# plain loop: start-up (python, imports, data, partitions, round-0 eval) {plain_setup:.1f} s\n"
    )
    for i, (a, (p, t)) in enumerate(zip(apps, plains)):
        out.write(
            f"# repeat {i}: app rounds {[round(x, 1) for x in a['round_s']]} total {a['total_s']:.1f} s | "
            f"plain rounds {[round(x, 1) for x in p['round_s']]} total {t:.1f} s | "
            f"final accuracy app {a['accuracy'][-1]} plain {p['accuracy'][-1]:.4f}\n"
        )
    ratio = app_rounds / plain_rounds if plain_rounds else float("inf")
    ok = ratio <= args.max_ratio
    out.write(f"# criterion (rounds ratio <= {args.max_ratio}): {ratio:.2f} -> {'PASS' if ok else 'FAIL'}\n")
    return 0 if ok else 1


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
    slack = RunConfig().load_slack
    p.add_argument(
        "--load-slack",
        type=float,
        default=slack,
        help=f"load_balanced bounds: mean x (1 +- slack) (default {slack}, the app's)",
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

    p = sub.add_parser("experts", help="training time per sample as the number of experts grows")
    p.add_argument("--experts", type=_int_list, default=[8, 16, 32, 64], help="default 8,16,32,64")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=1024, help="training samples per timed epoch")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch default)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up pass")
    p.add_argument("--dispatch", choices=DISPATCH_CHOICES, default="auto", help="expert dispatch")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ratio", type=float, default=1.5, help="criterion on largest/smallest E")
    p.set_defaults(func=bench_experts)

    p = sub.add_parser("dispatch", help="expert layer forward+backward per dispatch method")
    p.add_argument("--experts", type=_int_list, default=[8, 16, 32, 64])
    p.add_argument("--batch-sizes", type=_int_list, default=[32, 64])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch default)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=bench_dispatch)

    p = sub.add_parser("overhead", help="app (flwr run, simulation) vs plain PyTorch loop")
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
    p.set_defaults(func=bench_overhead)
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
