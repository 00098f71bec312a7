"""A lower bound on trainers per expert: no expert is planned to fewer than ``m`` trainers.

Under differential privacy (docs/PRIVACY.md) expert ``e``'s average over its ``n_e`` trainers
gets noise of standard deviation ``z * clip / n_e``: an expert trained by a single client is
that client's update plus noise, with a weak guarantee. :func:`enforce_min_trainers` is a
post-pass over any policy's plan (random, greedy, load_balanced, dense): it leaves the plan
alone where every planned expert has ``m`` trainers or more, and otherwise

1. drops, one at a time, the planned expert with the fewest trainers while some expert has
   ``0 < n_e < m`` (dropping it can only lower other counts, never raise them, so the loop
   ends with every planned expert at ``m`` or more, or with none planned);
2. if no expert is left, plans to every trainer the expert the clients prefer most in total
   (``n_e`` = all trainers, at least ``m`` by the caller's check);
3. refills each trainer that lost an expert, up to what it held, with the kept experts it
   prefers most (refilling only raises counts of kept experts, so the bound still holds).

A post-pass rather than a lower bound in the min-cost-flow solver: the bound must hold for
every policy, and in the flow an expert's lower bound is only natural once the solver may
also leave the expert out (a semi-continuous load ``n_e in {0} U [m, C]``), which min-cost
flow cannot express.
"""

from __future__ import annotations

import numpy as np


def enforce_min_trainers(
    assignment: np.ndarray, trainers: np.ndarray, preference: np.ndarray, min_trainers: int
) -> np.ndarray:
    """Return a plan in which every expert has 0 or at least ``min_trainers`` trainers.

    Parameters
    ----------
    assignment : np.ndarray
        bool ``[C, E]``, a policy's plan.
    trainers : np.ndarray
        bool ``[C]``: rows that train (and return) their experts; other rows (read-only
        holders) are left as they are and not counted.
    preference : np.ndarray
        float ``[C, E]``, higher is preferred (the alignment state's desirability); ties go to
        the lower expert id.
    min_trainers : int
        The bound ``m`` (>= 1; 1 leaves every plan unchanged).

    Returns
    -------
    np.ndarray
        bool ``[C, E]``; trainer rows hold no more experts than they did, and at least one.

    Raises
    ------
    ValueError
        If ``min_trainers`` exceeds the number of trainer rows (no expert can be planned).

    """
    out = np.array(assignment, dtype=bool, copy=True)
    rows = np.flatnonzero(trainers)
    if min_trainers <= 1 or rows.size == 0:
        return out
    if min_trainers > rows.size:
        raise ValueError(f"{rows.size} trainer(s) this round cannot give an expert {min_trainers} trainers")
    plan = out[rows]
    held_before = plan.sum(axis=1)
    counts = plan.sum(axis=0)
    while True:
        small = np.flatnonzero((counts > 0) & (counts < min_trainers))
        if small.size == 0:
            break
        plan[:, small[np.argmin(counts[small])]] = False
        counts = plan.sum(axis=0)
    pref = np.asarray(preference, dtype=np.float64)[rows]
    if not counts.any():
        plan[:, int(np.argmax(pref.sum(axis=0)))] = True
    kept = plan.any(axis=0)
    for i in np.flatnonzero(plan.sum(axis=1) < held_before):
        candidates = np.flatnonzero(kept & ~plan[i])
        order = candidates[np.argsort(-pref[i, candidates], kind="stable")]
        plan[i, order[: held_before[i] - plan[i].sum()]] = True
    out[rows] = plan
    return out
