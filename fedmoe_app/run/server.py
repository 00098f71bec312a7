"""ServerApp logic: build the strategy from the run config, run it, record and save the results."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from flwr.serverapp import Grid

from ..config import ConfigError
from ..config.run import RunConfig
from ..data.source import model_info, server_split
from ..models import AnySpec, HFSpec, build_model, model_spec, model_to_arrays
from ..models.hf_global import hf_global_arrays, hf_global_shapes
from ..server.strategy import FedMoE
from ..tensors import Arrays
from ..wire.records import from_record
from .checkpoint import checkpoint_path, save_checkpoint, save_model
from .evaluation import central_evaluator
from .export import export_finished_run, write_run_spec
from .folder import open_run_folder, resumed_arrays
from .init_weights import read_init_weights
from .results import RunRecorder
from .tracking import open_tracker, tracking_problem


def initial_arrays(spec: AnySpec, seed: int) -> Arrays:
    """Return the initial global model: an ``hf`` checkpoint's tensors in their own dtype, else built.

    An ``hf`` model with weights (``hf-model`` or ``hf-weights``) trained in full is read tensor by
    tensor (:func:`~..models.hf_global.hf_global_arrays`: a bf16 checkpoint stays bf16, never a
    whole float32 copy); under ``peft = "lora"`` the global model is the adapters, and presets and
    other models are seeded: those are built (``build_model(spec, seed)``).
    """
    if _read_from_files(spec):
        return hf_global_arrays(spec)
    return model_to_arrays(build_model(spec, seed=seed))


def initial_shapes(spec: AnySpec, seed: int) -> dict[str, tuple[int, ...]]:
    """Return the names and shapes of :func:`initial_arrays` (an ``hf`` checkpoint's: not read)."""
    if _read_from_files(spec):
        return hf_global_shapes(spec)
    return {k: tuple(v.shape) for k, v in model_to_arrays(build_model(spec, seed=seed)).items()}


def _read_from_files(spec: AnySpec) -> bool:
    """Whether the initial global model is read from an ``hf`` checkpoint (not built)."""
    return isinstance(spec, HFSpec) and bool(spec.weights) and spec.lora is None


def model_dtype(arrays: Arrays) -> str | None:
    """Return ``"bfloat16"`` if the global model holds bfloat16 tensors, else None (float32)."""
    return "bfloat16" if any(str(v.dtype) == "bfloat16" for v in arrays.values()) else None


def run_server(grid: Grid, run_config: dict) -> Path:
    """Run a whole fedmoe job on ``grid``; return the output folder."""
    cfg = RunConfig.from_run_config(run_config)
    problem = tracking_problem(cfg.tracking_section)
    if problem:
        raise ConfigError(problem)
    out, resumed = open_run_folder(cfg)
    if cfg.central_eval:
        test, info = server_split(cfg)
    else:  # the server holds no data: the model's input from the run config (or read once)
        test, info = None, model_info(cfg)
        log(INFO, "fedmoe: central-eval = false: no central evaluation; rounds record the clients' metrics")
    spec = model_spec(cfg, info)
    if resumed is None:
        arrays = initial_arrays(spec, cfg.seed)
        if cfg.init_weights:  # a pretrained model, checked against the one just built
            arrays = read_init_weights(cfg.init_weights, arrays)
            log(INFO, "fedmoe: initial model from init-weights %s", cfg.init_weights)
    else:  # the checkpoint's model, checked against the run's names and shapes (never read twice)
        arrays = resumed_arrays(resumed, initial_shapes(spec, cfg.seed), out)
        log(INFO, "Resuming run %s after round %d", out.name, resumed.round)
    # the server hands its arrays over: each round is averaged into them, one model held
    strategy = FedMoE.from_run_config(
        cfg, spec, arrays, state=resumed.strategy if resumed else None, in_place=True
    )
    ckpt = checkpoint_path(out)
    recorder = RunRecorder(out, cfg.to_dict(), resumed.history if resumed else [])
    write_run_spec(out, spec)

    tracker = open_tracker(cfg.tracking_section, out, cfg.to_dict())
    latest: list[Arrays] = []  # the model after the last round (bf16 stays bf16)

    def on_round(row: dict[str, Any], arrays: Arrays) -> None:
        latest[:] = [arrays]
        if tracker is not None:
            tracker.log_round(row)
            row = {**row, "tracking_failures": tracker.failures}
        recorder.add(row)
        recorder.refresh_plots()
        if row["round"] > 0:
            t0 = time.perf_counter()
            state = {
                "round": row["round"],
                "config": cfg.to_dict(),
                "strategy": strategy.state_dict(),
                "history": recorder.rounds,
            }
            save_checkpoint(ckpt, arrays, state)
            log(
                INFO,
                "fedmoe: checkpoint of round %d: %d bytes, %d clients seen, saved in %.4f s",
                row["round"],
                ckpt.stat().st_size,
                len(strategy.state.alignment.client_ids),
                time.perf_counter() - t0,
            )

    log(INFO, "fedmoe: outputs in %s", out)
    evaluate_centrally = (
        central_evaluator(cfg, spec, test, info, dtype=model_dtype(arrays)) if test is not None else None
    )
    try:
        result = strategy.start(
            grid,
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout_s,
            central_eval=evaluate_centrally,
            on_round=on_round,
            start_round=resumed.round + 1 if resumed else 1,
        )
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close()
        if tracker.failures:
            log(WARNING, "fedmoe: %d %s tracking failures (see above)", tracker.failures, tracker.name)
    final = latest[0] if latest else from_record(result.arrays)
    save_model(out / "final_model.npz", final)
    recorder.refresh_plots(force=True)
    exported = export_finished_run(out, spec, final, cfg.to_dict(), recorder.rounds)
    if exported is not None:
        log(INFO, "fedmoe: model exported to %s", exported)
    else:
        log(WARNING, "fedmoe: the model was not exported (error above); retry with: fedmoe-export %s", out)
    last = recorder.rounds[-1] if recorder.rounds else {}
    key = "accuracy" if cfg.central_eval else "client_accuracy"
    log(INFO, "fedmoe: done; final %s %s; outputs in %s", key.replace("_", " "), last.get(key), out)
    return out
