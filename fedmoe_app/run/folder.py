"""The run folder ``<output-dir>/<run-name>``: where a run writes, and whether it may resume there."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..alignment import alignment_from_state_dict
from ..config import RunConfig
from ..tensors import Arrays, check_same_tensors
from .checkpoint import checkpoint_path, load_checkpoint

#: Run-config keys a resumed run may change: how long it runs and where its files go.
RESUMABLE_KEYS = (
    "num-server-rounds",
    "resume",
    "round-timeout-s",
    "run-name",
    "output-dir",
    "device",
    "tracking",
    "tracking-dir",
)


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (name, reuse, resume)."""


def output_dir(cfg: RunConfig) -> Path:
    """``<output-dir>/<run-name>``; a relative output-dir is taken from ``$FEDMOE_OUTPUT_ROOT`` or cwd.

    Raises
    ------
    RunFolderError
        If ``run-name`` is not a plain folder name (no separators, not ``.`` or ``..``).

    """
    root = Path(cfg.output.output_dir)
    if not root.is_absolute():
        root = Path(os.environ.get("FEDMOE_OUTPUT_ROOT", os.getcwd())) / root
    name = cfg.output.run_name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
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
    if not cfg.output.resume:
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


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint holds to resume a run: the model, the strategy's state, the rounds done."""

    arrays: Arrays
    strategy: dict[str, Any]
    round: int
    history: list[dict[str, Any]]


def resumed_arrays(resumed: Resumed, model: Mapping[str, np.ndarray | tuple[int, ...]], out: Path) -> Arrays:
    """Return the checkpoint's arrays if they are ``model``'s tensors (names, and shapes or tensors).

    Raises
    ------
    RunFolderError
        Naming the checkpoint and the first tensors that differ.

    """
    try:
        check_same_tensors(resumed.arrays, model, "the checkpoint")
    except ValueError as exc:
        raise RunFolderError(f"checkpoint {checkpoint_path(out)}: {exc}") from None
    return dict(resumed.arrays)


def open_run_folder(cfg: RunConfig) -> tuple[Path, Resumed | None]:
    """Return the run folder and, with ``resume = true``, what its checkpoint holds.

    Raises
    ------
    RunFolderError
        If the folder cannot be used (see :func:`check_run_folder`) or the run config changed
        since the checkpoint in keys other than :data:`RESUMABLE_KEYS` (naming them, both values).

    """
    out = output_dir(cfg)
    saved = check_run_folder(out, cfg)
    if saved is None:
        return out, None
    arrays, state = saved
    check_resume_state(checkpoint_path(out), state, cfg)
    changed = config_changes(state["config"], cfg)
    if changed:
        detail = ", ".join(f"'{k}': {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise RunFolderError(f"cannot resume {out}: the run config changed ({detail})")
    return out, Resumed(arrays, state["strategy"], state["round"], state["history"])


def check_resume_state(path: Path, state: dict[str, Any], cfg: RunConfig) -> None:
    """Check a checkpoint's state document before a run resumes from it.

    ``round`` is a whole number from 1 to ``num-server-rounds`` (a run may resume once it has
    finished: it then does nothing), ``history`` a list of round rows, ``config`` a mapping, and
    the strategy's alignment state (fitness, usage) is finite and of consistent shapes.

    Raises
    ------
    RunFolderError
        Naming the file ``path``, the key and its value.

    """
    rnd = state.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= cfg.num_server_rounds:
        raise RunFolderError(
            f"checkpoint {path}: key 'round' = {rnd!r}; allowed: a whole number from 1 to "
            f"num-server-rounds = {cfg.num_server_rounds}"
        )
    for key, kind in (("config", dict), ("strategy", dict), ("history", list)):
        if not isinstance(state.get(key), kind):
            raise RunFolderError(f"checkpoint {path}: key {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(row, dict) for row in state["history"]):
        raise RunFolderError(f"checkpoint {path}: key 'history' holds entries that are not round rows")
    try:
        alignment_from_state_dict(state["strategy"]["alignment"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunFolderError(f"checkpoint {path}: key 'strategy.alignment' is invalid ({err})") from None
