"""ServerApp logic: build the strategy from the run config, run it, record and save the results."""

from __future__ import annotations

import datetime as dt
import os
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid

from ..config import RunConfig
from ..data import server_test_data
from ..federation.strategy import FedMoE
from ..models import ModelSpec, build_model, load_arrays, model_to_arrays
from ..tensors import Arrays
from ..training import evaluate, resolve_device
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .results import RunRecorder


def output_dir(cfg: RunConfig) -> Path:
    """``<output-dir>/<run-name>``; a relative output-dir is taken from ``$FEDMOE_OUTPUT_ROOT`` or cwd."""
    root = Path(cfg.output_dir)
    if not root.is_absolute():
        root = Path(os.environ.get("FEDMOE_OUTPUT_ROOT", os.getcwd())) / root
    name = cfg.run_name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return root / name


def run_server(grid: Grid, run_config: dict) -> Path:
    """Run a whole fedmoe job on ``grid``; return the output folder."""
    cfg = RunConfig.from_run_config(run_config)
    test, info = server_test_data(
        cfg.dataset, max_samples=cfg.central_eval_samples, data_dir=cfg.data_dir, seed=cfg.seed
    )
    spec = ModelSpec.from_config(cfg, info)
    strategy = FedMoE(cfg, spec, model_to_arrays(build_model(spec, seed=cfg.seed)))
    out = output_dir(cfg)
    ckpt = checkpoint_path(out)
    start_round, history = 1, []
    if cfg.resume and ckpt.is_file():
        arrays, state = load_checkpoint(ckpt)
        try:
            strategy.load(arrays, state["strategy"])
        except ValueError as exc:
            raise ValueError(f"checkpoint {ckpt}: {exc}") from None
        start_round, history = int(state["round"]) + 1, state["history"]
        log(INFO, "Resuming run %s after round %d", out.name, start_round - 1)
    recorder = RunRecorder(out, cfg.to_dict(), history)
    eval_model = build_model(spec)
    device = resolve_device(cfg.device)

    def central_eval(server_round: int, arrays: Arrays) -> dict[str, float]:
        load_arrays(eval_model, arrays)
        loss, acc = evaluate(eval_model, test, device=device)
        return {"accuracy": acc, "loss": loss}

    def on_round(row: dict[str, Any]) -> None:
        recorder.add(row)
        if row["round"] > 0:
            state = {"round": row["round"], "strategy": strategy.state_dict(), "history": recorder.rounds}
            save_checkpoint(ckpt, strategy.global_arrays, state)

    log(INFO, "fedmoe: outputs in %s", out)
    strategy.start(
        grid,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout_s,
        central_eval=central_eval,
        on_round=on_round,
        start_round=start_round,
    )
    np.savez(out / "final_model.npz", **strategy.global_arrays)
    recorder.plot()
    last = recorder.rounds[-1] if recorder.rounds else {}
    log(INFO, "fedmoe: done; final accuracy %s; outputs in %s", last.get("accuracy"), out)
    return out
