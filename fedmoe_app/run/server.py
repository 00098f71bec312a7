"""ServerApp logic: build the strategy from the run config, run it, record and save the results."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid

from ..config.run import RunConfig
from ..models import build_model, model_spec, model_to_arrays
from ..server.strategy import FedMoE
from ..tensors import Arrays
from ..text import server_split
from ..wire.records import from_record
from .checkpoint import checkpoint_path, save_checkpoint
from .evaluation import central_evaluator
from .folder import RunFolderError, open_run_folder
from .results import RunRecorder


def run_server(grid: Grid, run_config: dict) -> Path:
    """Run a whole fedmoe job on ``grid``; return the output folder."""
    cfg = RunConfig.from_run_config(run_config)
    out, resumed = open_run_folder(cfg)
    test, info = server_split(cfg)
    spec = model_spec(cfg, info)
    strategy = FedMoE(cfg, spec, model_to_arrays(build_model(spec, seed=cfg.seed)))
    ckpt = checkpoint_path(out)
    arrays = None
    if resumed is not None:
        try:
            arrays = strategy.restore(resumed.arrays, resumed.strategy)
        except ValueError as exc:
            raise RunFolderError(f"checkpoint {ckpt}: {exc}") from None
        log(INFO, "Resuming run %s after round %d", out.name, resumed.round)
    recorder = RunRecorder(out, cfg.to_dict(), resumed.history if resumed else [])

    def on_round(row: dict[str, Any], arrays: Arrays) -> None:
        recorder.add(row)
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
    result = strategy.start(
        grid,
        initial_arrays=arrays,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout_s,
        central_eval=central_evaluator(cfg, spec, test, info),
        on_round=on_round,
        start_round=resumed.round + 1 if resumed else 1,
    )
    np.savez(out / "final_model.npz", **from_record(result.arrays))
    recorder.plot()
    last = recorder.rounds[-1] if recorder.rounds else {}
    log(INFO, "fedmoe: done; final accuracy %s; outputs in %s", last.get("accuracy"), out)
    return out
