"""ServerApp logic: build the strategy from the run config, run it, record and save the results."""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid

from ..config import RunConfig
from ..federation.strategy import FedMoE
from ..models import build_model, load_arrays, model_spec, model_to_arrays
from ..tensors import Arrays
from ..text import TextSplit, server_split
from ..training import evaluate, evaluate_text, resolve_device
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .results import RunRecorder

#: Run-config keys a resumed run may change: how long it runs and where its files go.
RESUMABLE_KEYS = ("num-server-rounds", "resume", "round-timeout-s", "run-name", "output-dir", "device")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (name, reuse, resume)."""


def output_dir(cfg: RunConfig) -> Path:
    """``<output-dir>/<run-name>``; a relative output-dir is taken from ``$FEDMOE_OUTPUT_ROOT`` or cwd.

    Raises
    ------
    RunFolderError
        If ``run-name`` is not a plain folder name (no separators, not ``.`` or ``..``).

    """
    root = Path(cfg.output_dir)
    if not root.is_absolute():
        root = Path(os.environ.get("FEDMOE_OUTPUT_ROOT", os.getcwd())) / root
    name = cfg.run_name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    if name in (".", "..") or Path(name).name != name or "\\" in name:
        raise RunFolderError(f"run-config key 'run-name' = {name!r} is invalid; allowed: a plain folder name")
    return root / name


def check_run_folder(out: Path, cfg: RunConfig) -> dict | None:
    """Decide whether ``out`` may be used; return the checkpoint state to resume from (or None).

    A new run needs a folder without a checkpoint (a folder whose run never finished a round
    may be reused); ``resume = true`` needs a checkpoint whose run config matches this one
    except for :data:`RESUMABLE_KEYS`.

    Raises
    ------
    RunFolderError
        Naming the folder, and for a mismatch the keys with both values.

    """
    ckpt = checkpoint_path(out)
    if not cfg.resume:
        if ckpt.exists():
            raise RunFolderError(
                f"run folder {out} already holds a run; choose another 'run-name', or set resume=true"
            )
        return None
    if not ckpt.is_file():
        raise RunFolderError(f"run-config key 'resume' = True but {ckpt} does not exist: nothing to resume")
    return load_checkpoint(ckpt)


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple]:
    """Run-config keys whose value differs from the checkpoint's (resumable keys left out).

    A key the checkpoint does not know (added to the app after the run started) counts as
    unchanged while it keeps its default: the run behaves as it did.
    """
    now, default = cfg.to_dict(), RunConfig().to_dict()
    was = {k: saved.get(k, default[k]) for k in now}
    return {k: (saved.get(k), now[k]) for k in now if k not in RESUMABLE_KEYS and was[k] != now[k]}


def text_metrics(loss: float, acc: float, per_group: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Central metrics of a text run: loss (nats/byte), accuracy, bits per byte overall and per group."""
    out = {"accuracy": acc, "loss": loss, "bpb": loss / math.log(2)}
    out.update({f"bpb_{name}": float(v) / math.log(2) for name, v in zip(names, per_group)})
    return out


def run_server(grid: Grid, run_config: dict) -> Path:
    """Run a whole fedmoe job on ``grid``; return the output folder."""
    cfg = RunConfig.from_run_config(run_config)
    test, info = server_split(cfg)
    spec = model_spec(cfg, info)
    strategy = FedMoE(cfg, spec, model_to_arrays(build_model(spec, seed=cfg.seed)))
    out = output_dir(cfg)
    ckpt = checkpoint_path(out)
    start_round, history = 1, []
    saved = check_run_folder(out, cfg)
    if saved is not None:
        arrays, state = saved
        changed = config_changes(state.get("config", {}), cfg)
        if changed:
            detail = ", ".join(f"'{k}': {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise RunFolderError(f"cannot resume {out}: the run config changed ({detail})")
        try:
            strategy.load(arrays, state["strategy"])
        except ValueError as exc:
            raise RunFolderError(f"checkpoint {ckpt}: {exc}") from None
        start_round, history = int(state["round"]) + 1, state["history"]
        log(INFO, "Resuming run %s after round %d", out.name, start_round - 1)
    recorder = RunRecorder(out, cfg.to_dict(), history)
    eval_model = build_model(spec)
    device = resolve_device(cfg.device)

    def central_eval(server_round: int, arrays: Arrays) -> dict[str, float]:
        load_arrays(eval_model, arrays)
        if isinstance(test, TextSplit):
            per = evaluate_text(eval_model, test, batch_size=64, device=device, precision=cfg.precision)
            return text_metrics(*per, info.groups)
        loss, acc = evaluate(eval_model, test, device=device, precision=cfg.precision)
        return {"accuracy": acc, "loss": loss}

    def on_round(row: dict[str, Any]) -> None:
        recorder.add(row)
        if row["round"] > 0:
            t0 = time.perf_counter()
            state = {
                "round": row["round"],
                "config": cfg.to_dict(),
                "strategy": strategy.state_dict(),
                "history": recorder.rounds,
            }
            save_checkpoint(ckpt, strategy.global_arrays, state)
            log(
                INFO,
                "fedmoe: checkpoint of round %d: %d bytes, %d clients seen, saved in %.4f s",
                row["round"],
                ckpt.stat().st_size,
                len(strategy.alignment.client_ids),
                time.perf_counter() - t0,
            )

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
