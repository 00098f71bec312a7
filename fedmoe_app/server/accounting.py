"""Privacy accounting per aggregated group with Opacus's RDP accountant.

Each group -- the shared part and every expert -- is its own Gaussian mechanism per round
(:mod:`.privacy`), so each gets its own accountant and its own epsilon at ``dp-delta``:

* ``central``: a round is one step of the subsampled Gaussian mechanism with noise multiplier
  ``z`` for every group released in it, at the **shared** sampling rate ``q = n_s / K`` (``n_s``
  replies averaged into the shared part, ``K`` clients in the federation), experts included:
  the planner may assign a client an expert every time it is sampled, so that client takes
  part in the expert's mechanism at the shared rate, not at the average ``n_e / K`` (which
  would understate the worst client's epsilon). Opacus's analysis
  (``opacus.accountants.RDPAccountant``) assumes Poisson sampling; fedmoe samples a
  fixed-size set, so the amplification by subsampling is an assumption, not a proof
  (docs/PRIVACY.md).
* ``local``: a client's reply is itself a Gaussian mechanism (``q = 1``: the server sees who
  replies), composed over the rounds the client took part in; a group's epsilon is that of the
  client that trained the group in the most rounds.

**Neighbouring relation.** ``dp_epsilon_*`` are for *add/remove one client* (the relation of
Opacus's Poisson-sampling analysis): one client's clipped update moves a group's sum by at
most ``C``, so the noise ``z · C`` is multiplier ``z``. Under *replace one client* (swap; the
natural relation of fixed-size sampling) the sum moves by up to ``2C``: the same noise is
multiplier ``z / 2``, reported as ``dp_epsilon_swap_*``. A local-DP client's reply can change
arbitrarily within its clip ball (``2C``), so local epsilons are always at ``z / 2``.

A group that never had a trainer has epsilon 0. The accountant is the library's
(``opacus.accountants``, the optional extra ``fedmoe[dp]``), imported only when DP is on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ..config import ConfigError


def _rdp_accountant() -> Any:
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError(
            "run-config key 'dp' needs Opacus's accountant: pip install 'fedmoe[dp]' (or opacus)"
        ) from None
    return RDPAccountant()


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one step of the subsampled Gaussian mechanism at its default orders."""
    acc = _rdp_accountant()
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=acc.DEFAULT_ALPHAS)
    )


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Return Opacus's RDP epsilon at ``delta`` for ``[(noise multiplier, sample rate, steps)]``.

    What ``RDPAccountant.get_epsilon`` computes (RDP composes by summing, a step's RDP is linear
    in the steps), with each ``(z, q)``'s per-step RDP computed once and cached: a run's report
    costs a few vector sums a round instead of Opacus's series for every past round and group.
    """
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    from opacus.accountants.analysis.rdp import get_privacy_spent

    steps: Counter[tuple[float, float]] = Counter()
    for z, q, n in history:
        steps[(float(z), float(q))] += int(n)
    rdp = sum(n * _rdp_per_step(z, q) for (z, q), n in steps.items())
    eps, _ = get_privacy_spent(orders=_rdp_accountant().DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class GroupAccountant:
    """Epsilon of the shared part and of each expert, round after round.

    Parameters
    ----------
    num_experts : int
        Experts in the model.
    mode : {"central", "local"}
        Where the noise is added (module docstring).
    noise_multiplier : float
        ``z`` (``dp-noise-multiplier``).
    delta : float
        ``dp-delta``.

    """

    def __init__(self, num_experts: int, mode: str, noise_multiplier: float, delta: float) -> None:
        _rdp_accountant()  # fail at start-up when Opacus is missing
        self.num_experts, self.mode = num_experts, mode
        self.noise_multiplier, self.delta = noise_multiplier, delta
        # central: group -> [(z, q, steps)]; local: group -> client id -> rounds taken part in
        self.history: dict[str, list[tuple[float, float, int]]] = {}
        self.rounds_of: dict[str, Counter[str]] = {}

    @staticmethod
    def group_name(group: int) -> str:
        """``"shared"`` or ``"expert-<e>"``."""
        return "shared" if group < 0 else f"expert-{group}"

    def step(self, trainers: dict[int, Sequence[str]], population: int) -> None:
        """Account one round: ``trainers`` maps a group (-1: shared) to the clients averaged into it.

        Every group released is accounted at the shared part's rate (module docstring).
        """
        sampled = len(trainers.get(-1, ()))
        for group, clients in trainers.items():
            if not clients:
                continue
            name = self.group_name(group)
            if self.mode == "local":
                self.rounds_of.setdefault(name, Counter()).update(clients)
            else:
                n = max(sampled, len(clients))
                q = min(1.0, n / max(population, n))
                self.history.setdefault(name, []).append((self.noise_multiplier, q, 1))

    def epsilon(self, group: int, *, swap: bool = False) -> float:
        """Return the group's epsilon at ``delta`` after the rounds accounted so far.

        ``swap``: under replace-one-client (sensitivity ``2C``); else add/remove-one (``C``).
        Local DP is always at ``2C`` (module docstring).
        """
        name = self.group_name(group)
        scale = 0.5 if swap or self.mode == "local" else 1.0
        if self.mode == "local":
            rounds = max(self.rounds_of.get(name, Counter()).values(), default=0)
            history = [(self.noise_multiplier, 1.0, rounds)] if rounds else []
        else:
            history = self.history.get(name, [])
        return rdp_epsilon([(z * scale, q, s) for z, q, s in history], self.delta)

    def report(self, shared_trainers: int, expert_trainers: np.ndarray) -> dict[str, Any]:
        """Return the metrics-row entries of the privacy spent so far (keys ``dp_*``)."""
        experts = [self.epsilon(e) for e in range(self.num_experts)]
        swap = [self.epsilon(e, swap=True) for e in range(self.num_experts)]
        return {
            "dp_delta": self.delta,
            "dp_neighbouring": "add-remove" if self.mode == "central" else "any-change",
            "dp_epsilon_shared": self.epsilon(-1),
            "dp_epsilon_experts": experts,
            "dp_epsilon_max_expert": max(experts, default=0.0),
            "dp_epsilon_swap_shared": self.epsilon(-1, swap=True),
            "dp_epsilon_swap_max_expert": max(swap, default=0.0),
            "dp_trainers_shared": int(shared_trainers),
            "dp_trainers_experts": [int(n) for n in expert_trainers],
        }

    def state_dict(self) -> dict[str, Any]:
        """Return what resuming needs (JSON-serializable)."""
        return {
            "history": {k: [list(h) for h in v] for k, v in self.history.items()},
            "rounds_of": {k: dict(v) for k, v in self.rounds_of.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.history = {
            k: [(float(z), float(q), int(s)) for z, q, s in v] for k, v in state["history"].items()
        }
        self.rounds_of = {k: Counter(v) for k, v in state["rounds_of"].items()}
