"""Per-run figures behind docs/RESULTS.md's per-seed tables, from an experiment folder.

    python scripts/result_windows.py OUT TARGET [--setting alpha0.1]

Prints, per run: final and last-5 accuracy, mean accuracy over round windows, the first
round at or above TARGET (%) for a single round and for the 5-round moving average, the
mean token-load CV, and the mean share of tokens per expert.
"""

import argparse
import json
from pathlib import Path

import numpy as np

WINDOWS = ((11, 20), (21, 30), (31, 45), (46, 60))


def first_at(values: np.ndarray, target: float, offset: int) -> int | None:
    """Return the round (index + ``offset``) where ``values`` first reach ``target``, or None."""
    hits = np.flatnonzero(values >= target)
    return int(hits[0]) + offset if hits.size else None


def main() -> None:
    """Print the figures of every run of one setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("target", type=float, help="target accuracy in %%")
    parser.add_argument("--setting", default="alpha0.1")
    args = parser.parse_args()
    for run in sorted((args.out / "runs").glob(f"{args.setting}-*")):
        rows = [r for r in json.loads((run / "metrics.json").read_text()) if r["round"] > 0]
        acc = np.array([100 * r["accuracy"] for r in rows])
        ma5 = np.convolve(acc, np.ones(5) / 5, "valid")
        win = " ".join(f"r{a}-{b} {acc[a - 1 : b].mean():.1f}" for a, b in WINDOWS if len(acc) >= b)
        load = np.array([r["expert_load"] for r in rows], dtype=float)
        share = (load / load.sum(1, keepdims=True)).mean(0)
        hit, hit5 = first_at(acc, args.target, 1), first_at(ma5, args.target, 5)
        print(
            f"{run.name}: final {acc[-1]:.1f} last-5 {acc[-5:].mean():.1f} | {win} | "
            f"first >= target {hit} (5-round mean: {hit5}) | "
            f"token CV {np.mean([r['token_load_cv'] for r in rows]):.2f} | "
            f"token share {np.round(share, 3).tolist()}"
        )


if __name__ == "__main__":
    main()
