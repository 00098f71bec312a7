"""Pretrain the run's MoE centrally on the public share, for a federated run to fine-tune from.

``fedmoe-pretrain`` (``python -m fedmoe_app.tools.pretrain``):

1. reads the run config from ``--set key=value`` items (parsed as ``fedmoe-experiments``
   does; every other key at its default). ``public-fraction`` must be above 0: the tool trains
   on the public share of the training set (:func:`fedmoe_app.data.source.public_split`), the
   examples every client partition of a run with that config leaves out, the same whatever
   the run's seed;
2. builds the model the server would start from (``build_model(spec, seed)``, the run's
   ``seed``), every expert held, and trains it with the app's local training
   (:func:`fedmoe_app.training.train`: the model's own top-k routing and its balance loss
   weighted by ``aux-loss-weight``, the run config's optimizer) for ``--epochs`` passes over
   the public share at ``--lr`` and ``--batch-size``; each epoch is one call, so SGD's momentum
   or AdamW's moments start afresh every epoch, as a client's do every round;
3. evaluates it on the server's test set after every epoch with the server's own central
   evaluation (:func:`fedmoe_app.run.evaluation.central_evaluator`), and measures how
   specialised its experts are: the routes of every test class to every expert
   (:func:`expert_class_load`) and two summaries (:func:`specialisation`);
4. writes ``--out`` (a ``.safetensors`` file of the global arrays under the app's names, read
   back through the check a run's ``init-weights`` does) and beside it ``<out>.json``: the
   arguments, the run config, the loss and accuracy of every epoch, the final test figures,
   the expert load per class and the specialisation figures.

A run with the same model keys, ``public-fraction`` and ``init-weights = <out>`` starts from
the pretrained model: its round 0 central accuracy is the ``test_accuracy`` reported here.
Training is seeded (``seed``) and deterministic on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..data import Split
from ..data.source import public_split, server_split
from ..files import atomic_write
from ..models import MoEModel, build_model, model_spec, model_to_arrays
from ..models.export import family_of, spec_document
from ..run.evaluation import central_evaluator
from ..run.init_weights import read_init_weights, write_init_weights
from ..run.server import initial_arrays
from ..training import resolve_device, train
from .experiments.grid import parse_set

log = logging.getLogger(__name__)

#: Run-config keys the tool refuses in ``--set``: pretraining starts from the run's seeded model.
REFUSED_KEYS = ("init-weights",)


@dataclass(frozen=True)
class PretrainArgs:
    """The tool's own arguments (the run config aside)."""

    epochs: int
    lr: float
    batch_size: int
    out: Path


# --------------------------------------------------------------------------- specialisation
@torch.no_grad()
def expert_class_load(
    model: MoEModel, data: Split, num_classes: int, device: torch.device, batch_size: int = 512
) -> np.ndarray:
    """Routes of every class to every expert: float64 ``[L, C, E]`` (MoE layer, class, expert).

    ``load[l, c, e]`` counts the (example, expert) routes of the model's own top-k routing in
    MoE layer ``l`` that send an example of class ``c`` to expert ``e`` (each example makes
    ``top-k`` routes per layer); the model is run in evaluation mode class by class.
    """
    model.to(device).eval()
    fmt = model.memory_format(device)
    num_layers, num_experts = model.layer_held.shape
    load = np.zeros((num_layers, num_classes, num_experts))
    for c in range(num_classes):
        rows = torch.nonzero(data.labels == c).flatten()
        for i in range(0, len(rows), batch_size):
            x = data.images[rows[i : i + batch_size]].to(device=device, memory_format=fmt)
            load[:, c] += model(x).layer_tokens.double().cpu().numpy()
    model.to(memory_format=torch.contiguous_format)
    return load


def specialisation(load: np.ndarray) -> dict[str, float]:
    """Summaries of how specialised experts are, from their class load ``[L, C, E]``.

    Returns
    -------
    dict
        ``mean_max_class_share``: over the experts that received routes (every layer), the
        mean share of an expert's routes coming from its most frequent class (1: every expert
        serves one class); ``chance_max_class_share``: the same for routing blind to the class
        (the largest class's share of all routes); ``class_expert_nmi``: the normalized mutual
        information between an example's class and the expert a route goes to,
        ``2 I(C; E) / (H(C) + H(E))`` (0: independent, 1: the class names the expert), the mean
        over MoE layers.

    """
    load = np.asarray(load, dtype=np.float64)
    per_expert = load.sum(axis=1)  # [L, E]
    used = per_expert > 0
    share = np.divide(load.max(axis=1), per_expert, out=np.zeros_like(per_expert), where=used)
    classes = load.sum(axis=(0, 2))
    nmi = []
    for layer in load:
        total = layer.sum()
        if total <= 0:
            continue
        p = layer / total
        pc, pe = p.sum(axis=1), p.sum(axis=0)
        outer = pc[:, None] * pe[None, :]
        nz = p > 0
        mutual = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
        h_c = -float((pc[pc > 0] * np.log(pc[pc > 0])).sum())
        h_e = -float((pe[pe > 0] * np.log(pe[pe > 0])).sum())
        nmi.append(2 * mutual / (h_c + h_e) if h_c + h_e > 0 else 0.0)
    return {
        "mean_max_class_share": float(share[used].mean()) if used.any() else 0.0,
        "chance_max_class_share": float(classes.max() / classes.sum()) if classes.sum() else 0.0,
        "class_expert_nmi": float(np.mean(nmi)) if nmi else 0.0,
    }


# --------------------------------------------------------------------------- pretraining
def pretrain(cfg: RunConfig, args: PretrainArgs) -> dict[str, Any]:
    """Pretrain the run's model on its public share; write ``args.out`` and its sidecar; return the sidecar.

    Raises
    ------
    ConfigError
        Naming ``public-fraction`` when it is 0.

    """
    t0 = time.perf_counter()
    public, _ = public_split(cfg)
    test, info = server_split(cfg)
    spec = model_spec(cfg, info)  # the server's spec: from its test set's input, as a run builds it
    device = resolve_device(cfg.device)
    model = build_model(spec, seed=cfg.seed)  # the model a run would otherwise start from
    evaluate_centrally = central_evaluator(cfg, spec, test, info)
    options = {**cfg.train_kwargs(), "epochs": 1, "lr": args.lr, "batch_size": args.batch_size}
    log.info(
        "pretrain: %s on %d public examples of %s (public-fraction %s), %d test examples",
        family_of(spec),
        len(public),
        cfg.dataset,
        cfg.public_fraction,
        len(test),
    )
    epochs = []
    for epoch in range(1, args.epochs + 1):
        result = train(
            model, public, device=device, seed=cfg.seed * 10_000 + epoch, max_samples=None, **options
        )
        metrics = evaluate_centrally(epoch, model_to_arrays(model))
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": result.loss,
                "train_accuracy": result.accuracy,
                "test_loss": metrics["loss"],
                "test_accuracy": metrics["accuracy"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        log.info(
            "epoch %d: train loss %.4f, accuracy %.4f; test accuracy %.4f (%.0f s)",
            epoch,
            result.loss,
            result.accuracy,
            metrics["accuracy"],
            time.perf_counter() - t0,
        )
    arrays = model_to_arrays(model)
    meta = {"model": family_of(spec), "dataset": cfg.dataset, "public-fraction": str(cfg.public_fraction)}
    write_init_weights(args.out, arrays, meta)
    loaded = read_init_weights(args.out, initial_arrays(spec, cfg.seed))  # a run's own check
    final = evaluate_centrally(0, loaded)  # what the run's round 0 reports
    load = expert_class_load(model, test, spec.num_classes, device)
    per_expert = load.sum(axis=1, keepdims=True)
    class_share = np.divide(load, per_expert, out=np.zeros_like(load), where=per_expert > 0)
    figures = specialisation(load)
    sidecar = {
        "weights": str(args.out),
        "args": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "out": str(args.out)},
        "run_config": cfg.to_dict(),
        "model": spec_document(spec),
        "public_examples": len(public),
        "test_examples": len(test),
        "epochs": epochs,
        "test_loss": final["loss"],
        "test_accuracy": final["accuracy"],
        "specialisation": figures,
        # [layer][expert][class]: the share of the expert's routes from each class (server test set)
        "expert_class_share": np.round(class_share.transpose(0, 2, 1), 4).tolist(),
        "expert_routes": load.sum(axis=1).astype(int).tolist(),  # [layer][expert]
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write(sidecar_path(args.out), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def sidecar_path(out: Path) -> Path:
    """Return the JSON record's path beside the weights ``out`` (``model.safetensors`` -> ``model.json``)."""
    return Path(out).with_suffix(".json")


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Return the command line of ``fedmoe-pretrain``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value (public-fraction > 0 required; the model and data keys of the run)",
    )
    p.add_argument("--epochs", type=int, default=5, help="passes over the public share (default 5)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the run config's lr)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default: the run config's batch-size)"
    )
    p.add_argument("--out", type=Path, required=True, help="the weights file to write, PATH.safetensors")
    return p


def _arguments(a: argparse.Namespace, cfg: RunConfig) -> PretrainArgs:
    """Check the tool's own arguments; ``ValueError`` naming the flag."""
    lr = cfg.lr if a.lr is None else a.lr
    batch = cfg.batch_size if a.batch_size is None else a.batch_size
    if a.epochs < 1:
        raise ValueError(f"--epochs {a.epochs} is invalid; allowed: >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr {lr} is invalid; allowed: a number > 0")
    if batch < 1:
        raise ValueError(f"--batch-size {batch} is invalid; allowed: >= 1")
    if a.out.suffix != ".safetensors":
        raise ValueError(f"--out {str(a.out)!r} is invalid; allowed: a path ending in .safetensors")
    return PretrainArgs(epochs=a.epochs, lr=lr, batch_size=batch, out=a.out.expanduser())


def main(argv: Sequence[str] | None = None) -> int:
    """Pretrain and write the weights and their record; 0 on success, 2 for bad arguments or config."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    try:
        why = "is not for fedmoe-pretrain (it starts from the run's seeded model); allowed: the other keys"
        cfg = RunConfig.from_run_config(parse_set(a.overrides, REFUSED_KEYS, why))
        if not cfg.public_fraction:
            raise ConfigError(
                "run-config key 'public-fraction' = 0.0 is invalid for fedmoe-pretrain; allowed: a share "
                "in (0, 0.9] of the training set to pretrain on (e.g. --set public-fraction=0.1)"
            )
        args = _arguments(a, cfg)
    except ValueError as exc:  # ConfigError too
        log.error("error: %s", exc)
        return 2
    done = pretrain(cfg, args)
    figures = done["specialisation"]
    log.info(
        "pretrain: test accuracy %.4f after %d epochs in %.0f s; experts' mean max class share %.3f "
        "(class-blind routing: %.3f), class-expert NMI %.3f",
        done["test_accuracy"],
        args.epochs,
        done["seconds"],
        figures["mean_max_class_share"],
        figures["chance_max_class_share"],
        figures["class_expert_nmi"],
    )
    log.info("weights (run-config init-weights): %s; record: %s", args.out, sidecar_path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
