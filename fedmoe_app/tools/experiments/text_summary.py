"""The summary of a text grid (``fortunes``, ``text``): bits per byte, overall and per group.

Text runs record ``bpb`` (central held-out text, full model) and ``bpb_<group>`` per group
(language) every round, and ``client_bpb`` (bits per byte of the clients' own experts on
their local held-out text, weighted by its bytes). :func:`text_table` renders the last-``n``
means over seeds of both views and of every group; :func:`with_client_bpb` fills
``client_bpb`` for older byte-level rows so the accuracy plots can draw it. Lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .metrics import FinishedRun, last_n_mean, round_mean
from .summary import DASH, markdown_table, run_groups


def is_text(results: Sequence[FinishedRun]) -> bool:
    """Whether the runs are text runs (their rounds carry ``bpb``)."""
    return any("bpb" in row for r in results for row in r.rounds)


def with_client_bpb(results: Sequence[FinishedRun]) -> list[FinishedRun]:
    """Copy ``results`` with ``client_bpb`` in every row that has a loss.

    Rows carry the clients' own ``client_bpb``; rows of byte-level runs written before it was
    recorded get ``client_loss / ln 2`` (bits per byte when a token is a byte).
    """
    out = []
    for r in results:
        rows = []
        for row in r.rounds:
            loss = row.get("client_loss")
            if "client_bpb" in row or not isinstance(loss, (int, float)):
                rows.append(row)  # the clients' own bits per byte (any tokenizer), or no loss
            else:  # byte-level runs recorded before the clients reported bits per byte
                rows.append({**row, "client_bpb": loss / math.log(2)})
        out.append(replace(r, rounds=rows))
    return out


def group_names(results: Sequence[FinishedRun]) -> list[str]:
    """Group names of the runs' per-group ``bpb_<group>`` keys, sorted."""
    return sorted({k[4:] for r in results for row in r.rounds for k in row if k.startswith("bpb_")})


def _cell(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return DASH
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"


def text_table(
    results: Sequence[FinishedRun],
    *,
    last_n: int = 5,
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
) -> str:
    """Last-``last_n`` mean bits per byte per (setting, policy), mean ± std over seeds.

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished text runs.
    last_n : int
        Rounds averaged at the end of each run.
    settings, policies : sequence of str, optional
        Row order.

    Returns
    -------
    str
        A Markdown table: global bpb, personalized bpb, one column per group, MB down per
        round (and dense's).

    """
    results = with_client_bpb(results)
    groups = group_names(results)
    header = ["setting", "policy", "runs", "global bpb", "personalized bpb", *groups, "MB down/round (dense)"]
    rows = []
    for s, p, runs in run_groups(results, settings, policies):
        cells = [s, p, str(len(runs))]
        for key in ("bpb", "client_bpb", *(f"bpb_{g}" for g in groups)):
            cells.append(_cell([last_n_mean(r.rounds, last_n, key) for r in runs]))
        down = [round_mean(r.rounds, "bytes_down") for r in runs]
        dense = [round_mean(r.rounds, "dense_bytes_down") for r in runs]
        mb = [v / 1e6 for v in down if v is not None]
        dense_mb = [v / 1e6 for v in dense if v is not None]
        cells.append(f"{np.mean(mb):.2f} ({np.mean(dense_mb):.2f})" if mb and dense_mb else DASH)
        rows.append(cells)
    return markdown_table(header, rows)
