"""How a run's global MoE routes the official test set, and what better routing would give.

``fedmoe-routing outputs/<run-name>`` (or ``python -m fedmoe_app.tools.routing``) loads the
run's ``final_model.npz`` and ``config.json`` and reports, per class of the test set:

* the share of the gate's top-k choices that goes to each expert;
* each expert's accuracy on the class when it alone answers;
* the accuracy of the experts the gate picks (share-weighted) against the best expert's;

and for the whole test set: the global model's accuracy and the oracle's (a sample counts if
any expert alone gets it right). A large gap between the routed and the best expert, with an
oracle far above the global accuracy, says the experts are good and the gate sends samples to
the wrong ones (docs/RESULTS.md uses it to explain the global model's lag).

For a text run (``fortunes``, ``text``) it reports instead the share of each group's
(language's) routings per expert on the held-out text, with the specialisation figure of
:mod:`fedmoe_app.tools.routing_text`; ``--heatmap FILE.png`` draws it. ``--grid EXP_DIR``
does this for every finished text run of an experiment grid (``fedmoe-experiments``): the
specialisation per policy (mean ± std over seeds) and one heat map per policy (share
averaged over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import TEXT_DATASETS, RunConfig
from ..data import Split
from ..data.source import server_split
from ..models import ModelSpec, MoEClassifier, build_model, load_arrays, model_spec
from ..run.checkpoint import load_model
from .experiments import ExperimentGrid, run_dir
from .routing_text import group_routing, plot_heatmaps, routing_share, specialisation


@dataclass(frozen=True)
class RoutingReport:
    """Routing of a global MoE on a test set (fractions in ``[0, 1]``)."""

    accuracy: float  # the global model (gate top-k mix)
    oracle: float  # some expert alone is right
    share: np.ndarray  # [classes, E]: share of the gate's top-k choices per expert
    expert_accuracy: np.ndarray  # [E, classes]: each expert alone
    routed_accuracy: np.ndarray  # [classes]: share-weighted accuracy of the chosen experts
    best_accuracy: np.ndarray  # [classes]: the best single expert

    def format(self) -> str:
        """Render the report as text tables (percentages)."""
        pct = np.vectorize(lambda v: f"{100 * v:4.0f}")
        classes, num_e = self.share.shape
        head = "class " + " ".join(f"e{e:<3d}" for e in range(num_e))
        lines = [
            f"global accuracy {100 * self.accuracy:.2f} %, "
            f"oracle (any expert right) {100 * self.oracle:.2f} %",
            "",
            "routing share of the gate's top-k choices (%):",
            head,
            *(f"{c:5d} " + " ".join(pct(self.share[c])) for c in range(classes)),
            "",
            "accuracy of each expert alone (%):",
            head,
            *(f"{c:5d} " + " ".join(pct(self.expert_accuracy[:, c])) for c in range(classes)),
            "",
            "class  routed  best",
            *(
                f"{c:5d} {100 * self.routed_accuracy[c]:6.0f} {100 * self.best_accuracy[c]:5.0f}"
                for c in range(classes)
            ),
        ]
        return "\n".join(lines) + "\n"


@torch.no_grad()
def routing_report(model: MoEClassifier, data: Split, num_classes: int) -> RoutingReport:
    """Measure how ``model`` (holding every expert) routes ``data``; see :class:`RoutingReport`."""
    model.eval()
    x, y = data.images, data.labels
    feats = model.stem(x)
    k = model.top_k
    chosen = model.gate(feats).topk(k, dim=1).indices  # [N, k]
    num_e = model.spec.num_experts
    outs = torch.stack([model.experts(feats, torch.full((len(y),), e)) for e in range(num_e)], dim=1)
    right = (outs.argmax(-1) == y[:, None]).numpy()  # [N, E]
    labels, chosen = y.numpy(), chosen.numpy()
    share = np.zeros((num_classes, num_e))
    expert_acc = np.zeros((num_e, num_classes))
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            share[c] = np.bincount(chosen[sel].ravel(), minlength=num_e) / (k * sel.sum())
            expert_acc[:, c] = right[sel].mean(axis=0)
    accuracy = float((model(x).logits.argmax(1) == y).float().mean())
    return RoutingReport(
        accuracy=accuracy,
        oracle=float(right.any(axis=1).mean()),
        share=share,
        expert_accuracy=expert_acc,
        routed_accuracy=(share * expert_acc.T).sum(axis=1),
        best_accuracy=expert_acc.max(axis=0),
    )


def _load_final(run_dir: Path, model: torch.nn.Module) -> None:
    load_arrays(model, load_model(run_dir / "final_model.npz"))


def load_run(run_dir: Path) -> tuple[MoEClassifier, Split, int]:
    """Return a run's final global model, its test set and the number of classes."""
    cfg = RunConfig.from_run_config(json.loads((run_dir / "config.json").read_text()))
    if cfg.model != "cnn-moe":
        raise ValueError(f"{run_dir}: the routing report covers model 'cnn-moe' only, not {cfg.model!r}")
    test, info = server_split(replace(cfg, central_eval_samples=0))  # the whole test set
    model = build_model(ModelSpec.from_config(cfg, info))
    _load_final(run_dir, model)
    return model, test, info.num_classes


def text_run_share(run_dir: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """``([G, E] routing share, group names)`` of a text run's final model on its held-out text."""
    cfg = RunConfig.from_run_config(json.loads((run_dir / "config.json").read_text()))
    test, info = server_split(cfg)
    model = build_model(model_spec(cfg, info))
    _load_final(run_dir, model)
    return routing_share(group_routing(model, test, len(info.groups))), info.groups


def format_share(share: np.ndarray, groups: Sequence[str]) -> str:
    """Render a ``[G, E]`` routing share as a text table (%), with the specialisation figure."""
    width = max(len(g) for g in groups)
    lines = [
        f"routing share per group and expert (%), specialisation {specialisation(share):.3f}:",
        " " * width + " " + " ".join(f"e{e:<3d}" for e in range(share.shape[1])),
        *(f"{g:>{width}} " + " ".join(f"{100 * v:4.0f}" for v in row) for g, row in zip(groups, share)),
    ]
    return "\n".join(lines) + "\n"


def grid_shares(exp_dir: Path) -> tuple[dict[str, list[np.ndarray]], tuple[str, ...]]:
    """Routing shares of a text grid's finished runs, per policy in grid order (one per seed)."""
    grid = ExperimentGrid.from_dict(json.loads((exp_dir / "experiment.json").read_text()))
    shares: dict[str, list[np.ndarray]] = {}
    groups: tuple[str, ...] = ()
    for run in grid.runs():
        folder = run_dir(exp_dir, run)
        if (folder / "final_model.npz").is_file():
            share, groups = text_run_share(folder)
            shares.setdefault(run.policy, []).append(share)
    return {p: shares[p] for p in grid.policies if p in shares}, groups


def format_grid(shares: dict[str, list[np.ndarray]]) -> str:
    """Render the specialisation per policy (mean ± std over seeds) as a Markdown table."""
    lines = ["| policy | runs | specialisation |", "|---|---:|---:|"]
    for policy, per_seed in shares.items():
        vals = [specialisation(s) for s in per_seed]
        std = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
        lines.append(f"| {policy} | {len(vals)} | {np.mean(vals):.3f}{std} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """Return the command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="outputs/<run-name> of a finished run")
    parser.add_argument("--grid", type=Path, help="text runs: every finished run of this experiment folder")
    parser.add_argument("--heatmap", type=Path, help="text runs: draw the routing share to this PNG")
    return parser


def grid_main(exp_dir: Path, heatmap: Path | None) -> int:
    """Print (and draw) the routing share of every finished text run of a grid."""
    shares, groups = grid_shares(exp_dir)
    print(format_grid(shares), end="")
    for policy, per_seed in shares.items():
        print(f"\n{policy}, mean over {len(per_seed)} seed(s):")
        print(format_share(np.mean(per_seed, axis=0), groups), end="")
    if heatmap and shares:
        plot_heatmaps({p: np.mean(v, axis=0) for p, v in shares.items()}, groups, heatmap)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the routing report of a run folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.grid is None) == (args.run_dir is None):
        parser.error("give a run folder or --grid EXP_DIR (one of them)")
    if args.grid is not None:
        if not (args.grid / "experiment.json").is_file():
            parser.error(f"--grid {args.grid}: no experiment.json (not an experiment folder)")
        return grid_main(args.grid, args.heatmap)
    try:
        saved = json.loads((args.run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"{args.run_dir}: no readable config.json ({exc})")
    if saved.get("dataset") in TEXT_DATASETS:
        share, groups = text_run_share(args.run_dir)
        print(format_share(share, groups), end="")
        if args.heatmap:
            plot_heatmaps({args.run_dir.name: share}, groups, args.heatmap)
        return 0
    try:
        model, test, num_classes = load_run(args.run_dir)
    except ValueError as exc:
        parser.error(str(exc))
    print(routing_report(model, test, num_classes).format(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
