"""The ``overhead`` benchmark's baseline: the app's federated training as a plain PyTorch loop.

:func:`plain_loop` replays the per-round assignment of an app run with the app's own data
partitions, model, local training, aggregation and central evaluation, sequentially in one
process; :func:`run_plain_fresh` runs it in a fresh spawned process, so that its total
includes interpreter start-up and imports like the app's does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedmoe_app.config import RunConfig

from .common import set_threads


def overhead_run_config(args: argparse.Namespace, run_name: str, output_dir: str) -> dict[str, Any]:
    """Run config shared by the app run and the plain loop (comparable work, no client eval).

    Parameters
    ----------
    args : argparse.Namespace
        Options of ``python -m fedmoe_app.tools.bench overhead``.
    run_name : str
        The app run's ``run-name``.
    output_dir : str
        The app run's ``output-dir``.

    Returns
    -------
    dict
        Flower run config (``key-with-dashes`` -> value).

    """
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


def _train_clients(
    cfg: RunConfig,
    spec: Any,
    global_arrays: Any,
    assignment: Mapping[str, Sequence[int]],
    local: Callable[[str], Any],
    device: Any,
    rnd: int,
) -> list[Any]:
    """Train the clients of one round one after another, as the app's clients would.

    Parameters
    ----------
    cfg : RunConfig
        The run's config.
    spec : ModelSpec
        The model.
    global_arrays : dict
        The global model's arrays at the start of the round.
    assignment : mapping
        Client id (= partition id) -> experts it trains.
    local : callable
        Client id -> its ``(train, test, info)`` data.
    device : torch.device
        Where to train.
    rnd : int
        The round (1-based): client seeds are ``cfg.seed + rnd``.

    Returns
    -------
    list of ClientUpdate
        One per client, in order of client id.

    """
    from fedmoe_app.maths.aggregation import ClientUpdate
    from fedmoe_app.models import build_model
    from fedmoe_app.models.arrays import load_arrays, model_to_arrays
    from fedmoe_app.tensors import select
    from fedmoe_app.training import train

    updates = []
    for cid, experts in sorted(assignment.items(), key=lambda kv: int(kv[0])):
        train_split, _, _ = local(cid)
        model = build_model(spec, list(experts))
        load_arrays(model, select(global_arrays, experts))
        # max_samples=None: client_data already capped the partition
        res = train(
            model, train_split, **cfg.train_kwargs(), device=device, seed=cfg.seed + rnd, max_samples=None
        )
        model.cpu()
        updates.append(ClientUpdate(model_to_arrays(model), res.num_examples, res.tokens))
    return updates


def plain_loop(
    run_config: Mapping[str, Any],
    num_clients: int,
    assignments: Sequence[Mapping[str, Sequence[int]]],
    threads: int,
) -> dict[str, Any]:
    """Run the app's federated training as a plain sequential PyTorch loop in this process.

    Same run config, data partitions (:func:`fedmoe_app.data.client_data`), model, local
    training (:func:`fedmoe_app.training.train`), aggregation
    (:func:`fedmoe_app.maths.aggregation.aggregate`) and central evaluation as the app;
    ``assignments[r]`` maps client id (= partition id) to the experts it trains in round
    ``r + 1`` (read from the app's ``metrics.json``).

    Parameters
    ----------
    run_config : mapping
        Flower run config (see :func:`overhead_run_config`).
    num_clients : int
        Partitions (the app's SuperNodes).
    assignments : sequence of mapping
        Per round, client id -> experts it trains.
    threads : int
        Torch threads (0: torch's default).

    Returns
    -------
    dict
        ``setup_s`` (imports, data loading, initial model, round-0 evaluation), ``round_s``
        (per-round training + aggregation + central evaluation), ``accuracy`` per round,
        ``threads``.

    """
    t_setup = time.perf_counter()  # the imports below count as start-up
    threads = set_threads(threads)
    from fedmoe_app.data import client_data, server_test_data
    from fedmoe_app.maths.aggregation import aggregate
    from fedmoe_app.models import ModelSpec, build_model
    from fedmoe_app.models.arrays import load_arrays, model_to_arrays
    from fedmoe_app.training import evaluate, resolve_device

    cfg = RunConfig.from_run_config(dict(run_config))
    device = resolve_device(cfg.device)

    def local(cid: str) -> Any:
        return client_data(cfg.dataset, int(cid), num_clients, cfg.split)

    test, info = server_test_data(
        cfg.dataset, max_samples=cfg.central_eval_samples, data_dir=cfg.data_dir, seed=cfg.seed
    )
    local("0")  # loads the dataset and computes the partitions (cached)
    spec = ModelSpec.from_config(cfg, info)
    global_arrays = model_to_arrays(build_model(spec, seed=cfg.seed))
    eval_model = build_model(spec)
    load_arrays(eval_model, global_arrays)
    evaluate(eval_model, test)  # round 0, as the app does
    setup_s = time.perf_counter() - t_setup
    round_s, accuracy = [], []
    for rnd, assignment in enumerate(assignments, start=1):
        t0 = time.perf_counter()
        updates = _train_clients(cfg, spec, global_arrays, assignment, local, device, rnd)
        global_arrays = aggregate(global_arrays, updates, gate_from_all=cfg.gate_from_all)
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

    Parameters
    ----------
    run_config, num_clients, assignments, threads
        As for :func:`plain_loop`.
    timeout : float, optional
        Seconds to wait for the result.

    Returns
    -------
    tuple
        ``(result of plain_loop, total wall seconds)``.

    Raises
    ------
    RuntimeError
        When the loop failed in the child process.

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
