"""Whether a text run's experts specialise by group (language): routing share per group and expert.

:func:`group_routing` runs a global text MoE (holding every expert) over each group's held-out
windows and counts the (token, expert) routings; :func:`specialisation` condenses a share
matrix into one figure, the mutual information between group and expert as a fraction of the
expert entropy; :func:`plot_heatmaps` draws one heat map per run. ``fedmoe-routing`` uses them
for text runs (``--heatmap``), and docs/MODELS.md for the fortunes comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..data.text import TextSplit
from ..models.interface import MoEModel


@torch.no_grad()
def group_routing(model: MoEModel, data: TextSplit, num_groups: int, *, batch_size: int = 64) -> np.ndarray:
    """Count ``model``'s (token, expert) routings per group and MoE layer.

    Parameters
    ----------
    model : MoEModel
        A text model holding every expert (a run's global model).
    data : TextSplit
        Held-out windows with their group ids.
    num_groups : int
        Number of groups (rows of the result).
    batch_size : int
        Windows per forward pass.

    Returns
    -------
    np.ndarray
        ``[G, L, E]`` routings; ``L`` is 1 where the model reports its feedback summed over
        its MoE layers.

    """
    model.eval()
    num_e = model.spec.num_experts
    counts: np.ndarray | None = None
    for g in range(num_groups):
        idx = torch.nonzero(data.groups == g).flatten()
        for i in range(0, len(idx), batch_size):
            x = data.tokens[idx[i : i + batch_size], :-1]
            routed = model(x).tokens.reshape(-1, num_e).double().cpu().numpy()
            if counts is None:
                counts = np.zeros((num_groups, routed.shape[0], num_e))
            counts[g] += routed
    return counts if counts is not None else np.zeros((num_groups, 1, num_e))


def routing_share(counts: np.ndarray) -> np.ndarray:
    """``[G, E]`` share of each group's routings per expert (over layers); rows sum to 1 (0 if empty)."""
    per_group = counts.reshape(counts.shape[0], -1, counts.shape[-1]).sum(axis=1)
    total = per_group.sum(axis=1, keepdims=True)
    return np.divide(per_group, total, out=np.zeros_like(per_group), where=total > 0)


def specialisation(share: np.ndarray) -> float:
    """Mutual information between group and expert over the expert entropy, in ``[0, 1]``.

    Groups weigh equally (rows of ``share`` without routings are left out). 0: every group
    routes alike; 1: each expert serves one group only.
    """
    rows = share[share.sum(axis=1) > 0]
    if len(rows) == 0:
        return 0.0
    joint = rows / len(rows)
    p_expert = joint.sum(axis=0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    h_expert = entropy(p_expert)
    if h_expert == 0.0:
        return 0.0
    h_group = np.log(len(rows))
    return float((h_group + h_expert - entropy(joint.ravel())) / h_expert)


def plot_heatmaps(shares: Mapping[str, np.ndarray], groups: tuple[str, ...], path: Path) -> Path:
    """Draw one ``groups x experts`` heat map of routing share (%) per entry of ``shares``.

    Parameters
    ----------
    shares : Mapping of str to np.ndarray
        Panel title → ``[G, E]`` share (:func:`routing_share`).
    groups : tuple of str
        Row labels.
    path : Path
        PNG to write.

    Returns
    -------
    Path
        ``path``.

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(shares)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 0.32 * len(groups) + 1.6), squeeze=False)
    image = None
    for ax, (title, share) in zip(axes[0], shares.items()):
        image = ax.imshow(100 * share, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(f"{title}\nspecialisation {specialisation(share):.2f}", fontsize=9)
        ax.set_xticks(range(share.shape[1]), [f"e{e}" for e in range(share.shape[1])], fontsize=7)
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        for (r, c), v in np.ndenumerate(share):
            color = "w" if v < 0.5 else "k"
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color=color)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="routing share (%)", shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
