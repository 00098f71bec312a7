"""Privacy accounting per aggregated group with Opacus's RDP accountant.

Each group -- the shared part and every expert -- is its own Gaussian mechanism per round
(:mod:`.privacy`), so each gets its own accountant and its own epsilon at ``dp-delta``:

* ``central``: a round in which group ``g`` has ``n_g`` trainers out of the ``K`` clients of
  the federation is one step of the subsampled Gaussian mechanism with noise multiplier ``z``
  and sampling rate ``q_g = n_g / K`` (``opacus.accountants.RDPAccountant.step``). Opacus's
  analysis assumes Poisson sampling (each client in independently with probability ``q``);
  fedmoe samples a fixed-size set and the planner's expert assignment is not random at all,
  so the amplification by subsampling is an assumption, not a proof (docs/PRIVACY.md). The
  same accountant with ``q = 1`` is the bound without it.
* ``local``: a client's reply is itself a Gaussian mechanism with noise multiplier ``z``
  (``q = 1``: the server sees who replies), composed over the rounds the client took part
  in. A group's epsilon is that of the client that trained the group in the most rounds.

A group that never had a trainer has epsilon 0. The accountant is the library's
(``opacus.accountants``, the optional extra ``fedmoe[dp]``), imported only when DP is on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
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


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Return Opacus's RDP epsilon at ``delta`` for ``[(noise multiplier, sample rate, steps)]``."""
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    acc = _rdp_accountant()
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history]
    return float(acc.get_epsilon(delta=delta))


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
        """Account one round: ``trainers`` maps a group (-1: shared) to the clients averaged into it."""
        for group, clients in trainers.items():
            if not clients:
                continue
            name = self.group_name(group)
            if self.mode == "local":
                self.rounds_of.setdefault(name, Counter()).update(clients)
            else:
                q = min(1.0, len(clients) / max(population, len(clients)))
                self.history.setdefault(name, []).append((self.noise_multiplier, q, 1))

    def epsilon(self, group: int) -> float:
        """Return the group's epsilon at ``delta`` after the rounds accounted so far."""
        name = self.group_name(group)
        if self.mode == "local":
            rounds = max(self.rounds_of.get(name, Counter()).values(), default=0)
            history = [(self.noise_multiplier, 1.0, rounds)] if rounds else []
        else:
            history = self.history.get(name, [])
        return rdp_epsilon(history, self.delta)

    def report(self, shared_trainers: int, expert_trainers: np.ndarray) -> dict[str, Any]:
        """Return the metrics-row entries of the privacy spent so far (keys ``dp_*``)."""
        experts = [self.epsilon(e) for e in range(self.num_experts)]
        return {
            "dp_delta": self.delta,
            "dp_epsilon_shared": self.epsilon(-1),
            "dp_epsilon_experts": experts,
            "dp_epsilon_max_expert": max(experts, default=0.0),
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
