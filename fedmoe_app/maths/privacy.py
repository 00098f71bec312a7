"""Differential privacy for sparse expert updates: clipping, per-group means and Gaussian noise.

A client's update is its delta from the global model it received, ``Δ = w_client − w_global``,
over everything it returns (the shared tensors and its experts, taken together). With
``dp = "central"`` the server

1. clips every update to the norm bound ``C`` (``dp-clip-norm``): ``Δ <- Δ · min(1, C / ‖Δ‖)``;
2. averages each *group* over its trainers -- the shared part (every non-expert tensor, the
   gate included) over all ``n_s`` replies, expert ``e`` over the ``n_e`` clients that
   returned it -- with an **unweighted** mean of the clipped deltas (weighting by examples or
   tokens would let one client's claimed count scale its influence past ``C``: the
   sensitivity of a group's sum must be ``C`` whoever the client is);
3. adds Gaussian noise of standard deviation ``z · C / n_g`` to every coordinate of group
   ``g``'s mean (``z`` = ``dp-noise-multiplier``): noise ``z · C`` on the sum, the Gaussian
   mechanism with noise multiplier ``z`` per group, as in DP-FedAvg (McMahan et al., 2018).

With ``dp = "local"`` each client clips its own update and adds noise of std ``z · C`` to
every coordinate before replying (:func:`privatize`); the server then takes the same
unweighted per-group means, adding no noise, and clips each reply at the norm an honest noised
reply of ``d`` coordinates stays under (:func:`local_reply_bound`: ``C · (1 + z · (sqrt(d) +
6))``, exceeded with probability below 1e-8): an honest reply is left as it is, a reply of 1e30
weighs no more than an honest one. Clipping what a client already privatized is
post-processing: it costs no privacy.

Noise is drawn from a generator seeded by the operating system, never from the run's seed:
anyone who knows the seed (it is in ``config.json``) could otherwise regenerate and subtract
it. DP runs are therefore not bit-reproducible. :mod:`.accounting` turns the per-group
trainer counts into epsilons. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..tensors import Arrays, parse_expert_key

SHARED = -1  # group id of the shared part (experts are 0..E-1)


def group_of(key: str) -> int:
    """Return the group of a tensor: its expert id, or :data:`SHARED`."""
    parsed = parse_expert_key(key)
    return SHARED if parsed is None else parsed[0]


def update_delta(global_arrays: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Return ``arrays − global_arrays`` (float64) over the keys of ``arrays``."""
    return {k: v.astype(np.float64) - global_arrays[k] for k, v in arrays.items()}


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Return the Euclidean norm of all tensors of ``delta`` taken together."""
    return float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values())))


def clip_delta(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Arrays, bool]:
    """Scale ``delta`` onto the ball of radius ``clip_norm``; also say whether it was scaled."""
    norm = delta_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: d * factor for k, d in delta.items()}, factor < 1.0


def privatize(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> Arrays:
    """Local DP on a client: ``received + clip(trained − received) + N(0, (z·C)²)``, dtypes kept.

    Parameters
    ----------
    received : Mapping[str, np.ndarray]
        The global tensors the client was sent (every key of ``trained``).
    trained : Mapping[str, np.ndarray]
        What it would reply without DP.
    clip_norm, noise_multiplier : float
        ``C`` and ``z``.
    rng : np.random.Generator
        Source of the noise (an unseeded one in the app).

    """
    clipped, _ = clip_delta(update_delta(received, trained), clip_norm)
    sigma = noise_multiplier * clip_norm
    return {
        k: (received[k] + d + rng.normal(0.0, sigma, d.shape)).astype(trained[k].dtype)
        for k, d in clipped.items()
    }


def local_reply_bound(delta_size: int, clip_norm: float, noise_multiplier: float) -> float:
    """Norm bound on an honest local-DP reply's delta of ``delta_size`` coordinates.

    The clipped update (norm ``<= C``) plus Gaussian noise of std ``z · C`` per coordinate, whose
    norm exceeds ``z · C · (sqrt(d) + t)`` with probability at most ``exp(-t² / 2)``; ``t = 6``.
    """
    return clip_norm * (1.0 + noise_multiplier * (float(np.sqrt(delta_size)) + 6.0))


@dataclass(frozen=True)
class PrivateMean:
    """One round's DP aggregation: the new model and who was averaged into each group."""

    arrays: Arrays
    shared_trainers: int
    expert_trainers: np.ndarray  # int64 [E]: n_e
    clipped: int  # replies whose update the server scaled down


def private_mean(
    global_arrays: Mapping[str, np.ndarray],
    replies: Sequence[Mapping[str, np.ndarray]],
    num_experts: int,
    *,
    clip_norm: float | Sequence[float] | None,
    noise_std: float,
    rng: np.random.Generator,
    min_trainers: int = 1,
) -> PrivateMean:
    """Per-group unweighted mean of (clipped) deltas plus noise of std ``noise_std / n_g``.

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        The model every reply started from (all tensors).
    replies : sequence of Mapping
        Each reply's tensors (shared + the experts it returned).
    num_experts : int
        Experts in the model.
    clip_norm : float, sequence of float, or None
        Clip each reply's whole delta to this norm (central DP: ``C``), or reply ``i``'s to
        ``clip_norm[i]`` (local DP: :func:`local_reply_bound`); None: do not clip.
    noise_std : float
        ``z · C``, the noise std on a group's *sum* (0: no noise, local DP).
    rng : np.random.Generator
        Noise source.
    min_trainers : int
        An expert returned by fewer replies (planned to more, some replies lost or rejected)
        keeps its value and counts 0 trainers: it is not released this round.

    Returns
    -------
    PrivateMean
        Groups without trainers keep their values.

    """
    deltas, clipped = [], 0
    for i, arrays in enumerate(replies):
        delta = update_delta(global_arrays, arrays)
        if clip_norm is not None:
            delta, was = clip_delta(delta, clip_norm if np.isscalar(clip_norm) else clip_norm[i])
            clipped += was
        deltas.append(delta)
    out = {k: np.array(v, copy=True) for k, v in global_arrays.items()}
    trainers = np.zeros(num_experts, dtype=np.int64)
    for key, old in global_arrays.items():
        held = [d[key] for d in deltas if key in d]
        if not held:
            continue
        n = len(held)
        group = group_of(key)
        if group != SHARED:
            if n < min_trainers:
                continue
            trainers[group] = n
        mean = np.mean(np.stack(held), axis=0)
        if noise_std > 0:
            mean = mean + rng.normal(0.0, noise_std / n, old.shape)
        out[key] = (old + mean).astype(old.dtype)
    return PrivateMean(out, shared_trainers=len(deltas), expert_trainers=trainers, clipped=clipped)
