"""Export a run's global model as a standard folder (``<run dir>/export/`` at the end of a run).

:func:`write_export` writes the folder from the run's spec, global arrays, run config and
metrics rows: the model in its family's standard form (:mod:`fedmoe_app.models.export`: a
transformers ``save_pretrained`` folder for ``hf``, ``model.safetensors`` for the app's own
families), for ``hf`` the tokenizer files of the folder ``hf-model`` names, and
:data:`SUMMARY_FILE` plus a ``README.md`` with the run's name, rounds and final metrics.

The run calls :func:`export_finished_run` after its last round (a failure is logged, not
raised: the run's own outputs are already written); ``fedmoe-export`` calls :func:`export_run`
on a run folder, reading what the run wrote: :data:`SPEC_FILE` (the model's spec, recorded at
the start of the run; a run folder without it rebuilds the spec from ``config.json`` and the
dataset), ``final_model.npz`` (else the last ``checkpoint.npz``) and ``metrics.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..files import atomic_write
from ..models import AnySpec, model_spec
from ..models.export import (
    family_of,
    save_hf_model,
    save_native_model,
    spec_document,
    spec_from_document,
)
from ..tensors import Arrays
from .checkpoint import checkpoint_path, load_checkpoint, load_model

log = logging.getLogger(__name__)

#: The export's folder inside the run folder.
EXPORT_DIR = "export"
#: The run's model spec, written by the run at its start (``{"model": family, "spec": fields}``).
SPEC_FILE = "model_spec.json"
#: What the export holds and where it came from: run name, rounds, final metrics.
SUMMARY_FILE = "fedmoe_export.json"
FINAL_MODEL_FILE = "final_model.npz"
#: Files of a tokenizer folder copied into an ``hf`` export (glob patterns).
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
)


@dataclass(frozen=True)
class RunModel:
    """What a run folder holds to export: the spec, the global arrays, the config and the rounds."""

    spec: AnySpec
    arrays: Arrays
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    source: str


def write_run_spec(run_dir: Path, spec: AnySpec) -> Path:
    """Record the run's model spec in ``<run dir>/model_spec.json`` (for :func:`export_run`)."""
    path = Path(run_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(spec_document(spec), indent=2))
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_run(run_dir: Path) -> RunModel:
    """Read what :func:`write_export` needs from a run folder.

    Raises
    ------
    FileNotFoundError
        If the folder has no ``config.json`` or no model (``final_model.npz`` nor ``checkpoint.npz``).

    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {config_file.name} is missing")
    config = _read_json(config_file)
    rounds = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else []
    final, ckpt = run_dir / FINAL_MODEL_FILE, checkpoint_path(run_dir)
    if final.is_file():
        arrays = load_model(final)
        source = final.name
    elif ckpt.is_file():
        arrays, state = load_checkpoint(ckpt)
        rounds = rounds or list(state.get("history", []))
        source = f"{ckpt.name} (round {state.get('round')})"
    else:
        raise FileNotFoundError(f"{run_dir} holds no model: neither {final.name} nor {ckpt.name}")
    spec_file = run_dir / SPEC_FILE
    if spec_file.is_file():
        spec = spec_from_document(_read_json(spec_file))
    else:  # a run folder written before the spec was recorded: the spec as the run built it
        from ..data.text import server_split

        cfg = RunConfig.from_run_config(config)
        spec = model_spec(cfg, server_split(cfg)[1])
    return RunModel(spec, arrays, config, rounds, source)


def copy_tokenizer(source: str, folder: Path) -> list[Path]:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`) of the folder ``source`` into ``folder``.

    Nothing when ``source`` is empty or not a folder (a preset or a config file).
    """
    src = Path(source).expanduser() if source else None
    if src is None or not src.is_dir():
        return []
    copied = []
    for pattern in TOKENIZER_FILES:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and not (Path(folder) / path.name).exists():
                copied.append(Path(shutil.copy2(path, Path(folder) / path.name)))
    return copied


def write_model(folder: Path, spec: AnySpec, arrays: Arrays, config: Mapping[str, Any]) -> list[Path]:
    """Write the model files of an export into ``folder``; return them.

    ``hf``: the ``save_pretrained`` folder (for a ``peft = "lora"`` run the frozen base plus the
    PEFT folder ``adapter/``) and the tokenizer of ``hf-model``. Others: ``model.safetensors``.
    """
    if family_of(spec) != "hf":
        return save_native_model(spec, arrays, folder)
    files = save_hf_model(spec, arrays, folder)
    return files + copy_tokenizer(str(config.get("hf-model", "")), folder)


def final_metrics(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Return the numbers of the last recorded round (lists, maps and missing values left out)."""
    if not rounds:
        return {}
    last = max(rounds, key=lambda r: r.get("round", -1))
    return {
        k: v
        for k, v in last.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    }


def _readme(summary: Mapping[str, Any], folder: Path) -> str:
    if summary["model"] == "hf":
        load = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained"
    else:
        load = "from fedmoe_app.models import load_exported\nmodel = load_exported"
    load += f'("path/to/{folder.name}")'
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in summary["metrics"].items())
    return (
        f"# {summary['run']}: the global model of a fedmoe run\n\n"
        f"Model `{summary['model']}`, {summary['num_experts']} experts per MoE layer, "
        f"top-{summary['top_k']}; "
        f"exported after round {summary['rounds']} from `{summary['source']}`.\n\n"
        f"```python\n{load}\n```\n\n"
        f"Final metrics (round {summary['rounds']}):\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


def write_export(
    out: Path,
    spec: AnySpec,
    arrays: Arrays,
    config: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    *,
    run_name: str,
    source: str = FINAL_MODEL_FILE,
) -> Path:
    """Write the export folder ``out``: the model (:func:`write_model`), a summary and a README.

    The folder is written beside ``out`` and renamed into place, replacing an earlier export.

    Raises
    ------
    FileExistsError
        If ``out`` is a non-empty folder that is not an export (no :data:`SUMMARY_FILE`).

    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SUMMARY_FILE).is_file():
        raise FileExistsError(f"{out} exists and is not a fedmoe export; choose another folder")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = write_model(tmp, spec, arrays, config)
        summary = {
            "run": run_name,
            "model": family_of(spec),
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "rounds": max((int(r.get("round", 0)) for r in rounds), default=0),
            "metrics": final_metrics(rounds),
            "source": source,
            "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": sorted(str(f.relative_to(tmp)) for f in files),
        }
        atomic_write(tmp / SUMMARY_FILE, json.dumps(summary, indent=2))
        atomic_write(tmp / "README.md", _readme(summary, out))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Export the global model of the run folder ``run_dir`` into ``out`` (default ``<run dir>/export``)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    return write_export(
        Path(out) if out is not None else run_dir / EXPORT_DIR,
        run.spec,
        run.arrays,
        run.config,
        run.rounds,
        run_name=run_dir.name,
        source=run.source,
    )


def export_finished_run(
    run_dir: Path,
    spec: AnySpec,
    arrays: Arrays,
    config: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
) -> Path | None:
    """Write ``<run dir>/export`` at the end of a run; on failure log it and return None."""
    try:
        return write_export(
            Path(run_dir) / EXPORT_DIR, spec, arrays, config, rounds, run_name=Path(run_dir).name
        )
    except Exception:  # the run's outputs are written: a failed export must not fail the run
        log.exception(
            "fedmoe: exporting the model of %s failed; retry with: fedmoe-export %s", run_dir, run_dir
        )
        return None
