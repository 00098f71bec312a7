"""Server-side alignment state: fitness, usage and desirability, keyed by stable client ids.

State (:class:`AlignmentState`, keyed by stable client-id strings)
-----------------------------------------------------------------
``F`` fitness, float64 ``[C, E]``
    How well expert ``e`` serves client ``c``. ``F == 0`` means "no evidence yet"; every
    signal is in ``[0, 1]`` so ``F`` stays in ``[0, 1]``.
``U`` usage, float64 ``[E]``
    Decayed training load (tokens) each expert has received.

Feedback (:meth:`AlignmentState.update`), arrays ``[R, E]`` for the ``R`` clients that
replied validly this round:

``held``         bool, the experts the client trained;
``tokens``       tokens the client's (masked) gate routed to each held expert (ignored where
                 not held);
``expert_loss``  mean cross-entropy of expert ``e``'s own output on its routed tokens (NaN or
                 anything where not held; NaN/inf where held means "no tokens");
``gate_hist``    counts of the *unmasked* full gate's top-k choices over all ``E`` experts on
                 the client's data (a cheap signal for experts it does not hold).

Update rules, with ``a = fitness_ema``, ``d = fitness_decay``, ``g = usage_decay``,
``lam = loss_weight``:

* Held pair (direct evidence). ``share = tokens[c,e] / sum_{e' held} tokens[c,e']`` (0 if the
  row routed no tokens), ``score = exp(-loss[c,e])`` (the geometric-mean probability the
  expert gives the true class; 0 when the loss is NaN/inf), and the signal
  ``s = (1 - lam) * share + lam * score``. Then ``F <- (1 - a) * F + a * s``, except that a
  pair with no evidence yet (``F == 0``) is initialised directly, ``F <- s`` (an EMA from 0
  would under-rate every newly tried expert by the factor ``a``).
* Pair not held by a replying client (indirect evidence). ``h = gate_hist[c,e] / sum_e'
  gate_hist[c,e']`` (0 if the client reported an empty histogram) and
  ``F <- d * F + (1 - d) * h``. With ``h = 0`` this is pure decay, ``F <- d * F``: pairs
  without interaction fade, while the full gate's preference pulls them up slowly (step
  ``1 - d`` instead of ``a``: indirect evidence is trusted less than training on the expert).
  Under ``fitness_init = "routing"`` a pair with no evidence yet (``F == 0``) of a client
  that reported a non-empty histogram takes the gate's share directly, ``F <- h`` (not
  shrunk by ``1 - d``): with a pretrained gate, a client's row starts from the pretrained
  router's choices on its data after its first round instead of from 0. Under ``"zero"``
  (the default) such a pair follows the rule above like every other.
* Clients that did not reply this round are left unchanged: absence (not sampled, dropped,
  failed) is not evidence about fit.
* Usage: ``U <- g * U + load`` with ``load[e] = sum_c tokens[c,e]`` over held pairs of the
  replies.

Desirability (:meth:`AlignmentState.desirability`)
--------------------------------------------------
``D[c,e] = w_fitness * normF[c,e] - w_usage * normU[e]`` where ``normF`` is ``F`` min-max
scaled per row to ``[0, 1]`` (a row whose entries are all equal, e.g. a new client, becomes
all 0, so only usage decides), and ``normU = U / max(U)`` (all 0 when ``max(U) == 0``).
So ``D`` lies in ``[-w_usage, w_fitness]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .flow import as_slots
from .policies import PlanInputs, Policy, get_policy

_STATE_VERSION: int = 1
#: ``fitness_init``: how a pair without evidence that a replying client did not train starts
#: (module docstring): by the indirect rule from 0 (``zero``), or at the gate's share (``routing``).
FITNESS_INITS = ("zero", "routing")
#: The state's knobs, saved with it and given back to the constructor on restore.
KNOBS = (
    "fitness_ema",
    "fitness_decay",
    "usage_decay",
    "w_fitness",
    "w_usage",
    "load_slack",
    "approx_min_clients",
    "loss_weight",
    "fitness_init",
    "seed",
)


class AlignmentState:
    """Server-side alignment state keyed by stable client-id strings.

    Every knob is required: the run config (``fedmoe_app.config.RunConfig``) is the one home
    of their defaults, and ``RunConfig.alignment_kwargs()`` gives them.

    Parameters
    ----------
    num_experts : int
        Number of experts ``E``.
    fitness_ema : float
        EMA step ``a`` for held pairs: ``F <- (1 - a) F + a s``.
    fitness_decay : float
        ``d`` for pairs a replying client did not hold: ``F <- d F + (1 - d) h``.
    usage_decay : float
        ``g`` in ``U <- g U + load``.
    w_fitness, w_usage : float
        Weights of normalized fitness and usage in the desirability.
    load_slack : float
        Relative slack of the ``load_balanced`` load bounds around the mean load.
    approx_min_clients : int
        ``load_balanced`` rounds of at least this many clients use the fix-and-free
        approximation instead of the exact plan (0: always exact).
    loss_weight : float
        ``lam``: held signal ``(1 - lam) * token_share + lam * exp(-loss)``.
    fitness_init : str
        One of :data:`FITNESS_INITS`: ``routing`` sets a pair without evidence that a replying
        client did not train to its unmasked gate's share, ``F <- h``; ``zero`` leaves it to
        the indirect rule, ``F <- (1 - d) h``.
    seed : int
        Seed of the internal generator used when :meth:`plan` gets no ``rng``.

    Attributes
    ----------
    client_ids : list of str
        Row order of :attr:`fitness`.
    fitness : np.ndarray
        float64 ``[C, E]``; new clients start at 0 (unknown).
    usage : np.ndarray
        float64 ``[E]``.

    """

    def __init__(
        self,
        num_experts: int,
        *,
        fitness_ema: float,
        fitness_decay: float,
        usage_decay: float,
        w_fitness: float,
        w_usage: float,
        load_slack: float,
        approx_min_clients: int,
        loss_weight: float,
        fitness_init: str,
        seed: int,
    ) -> None:
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        for name, val in (
            ("fitness_ema", fitness_ema),
            ("fitness_decay", fitness_decay),
            ("usage_decay", usage_decay),
            ("loss_weight", loss_weight),
        ):
            if not 0.0 <= float(val) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {val}")
        if float(load_slack) < 0 or float(w_fitness) < 0 or float(w_usage) < 0:
            raise ValueError("load_slack, w_fitness and w_usage must be >= 0")
        if int(approx_min_clients) < 0:
            raise ValueError(f"approx_min_clients must be >= 0, got {approx_min_clients}")
        if fitness_init not in FITNESS_INITS:
            raise ValueError(f"fitness_init must be one of {FITNESS_INITS}, got {fitness_init!r}")
        self.num_experts = int(num_experts)
        self.fitness_ema = float(fitness_ema)
        self.fitness_decay = float(fitness_decay)
        self.usage_decay = float(usage_decay)
        self.w_fitness = float(w_fitness)
        self.w_usage = float(w_usage)
        self.load_slack = float(load_slack)
        self.approx_min_clients = int(approx_min_clients)
        self.loss_weight = float(loss_weight)
        self.fitness_init = str(fitness_init)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.client_ids: list[str] = []
        self._row: dict[str, int] = {}
        self._fitness = np.zeros((0, self.num_experts), dtype=np.float64)
        self.usage = np.zeros(self.num_experts, dtype=np.float64)

    # -- rows -------------------------------------------------------------------------------

    @property
    def fitness(self) -> np.ndarray:
        """float64 ``[C, E]`` fitness rows (a view of a buffer that grows by doubling)."""
        return self._fitness[: len(self.client_ids)]

    @fitness.setter
    def fitness(self, value: np.ndarray) -> None:
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (len(self.client_ids), self.num_experts):
            raise ValueError(
                f"fitness must have shape {(len(self.client_ids), self.num_experts)}, got {arr.shape}"
            )
        self._fitness = arr

    def index(self, client_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``client_ids`` in :attr:`fitness`, adding unseen clients (zero rows).

        Parameters
        ----------
        client_ids : sequence of str
            Stable client ids; duplicates are rejected.

        Returns
        -------
        np.ndarray
            int64 row indices, in the order given.

        """
        ids = [str(c) for c in client_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("client_ids contain duplicates")
        new = [c for c in ids if c not in self._row]
        if new:
            start = len(self.client_ids)
            needed = start + len(new)
            if needed > self._fitness.shape[0]:  # amortized O(1) per client: double the buffer
                grown = np.zeros((max(needed, 2 * self._fitness.shape[0]), self.num_experts))
                grown[:start] = self._fitness[:start]
                self._fitness = grown
            else:
                self._fitness[start:needed] = 0.0
            self._row.update({c: start + i for i, c in enumerate(new)})
            self.client_ids.extend(new)
        return np.fromiter((self._row[c] for c in ids), dtype=np.int64, count=len(ids))

    # -- scores -----------------------------------------------------------------------------

    def desirability(self, client_ids: Sequence[str]) -> np.ndarray:
        """Desirability ``D = w_fitness * normF - w_usage * normU`` for ``client_ids``.

        ``normF`` is each fitness row min-max scaled to ``[0, 1]`` (constant rows become 0);
        ``normU = U / max(U)`` (0 if ``max(U) == 0``). Unseen clients are added.

        Parameters
        ----------
        client_ids : sequence of str
            Clients (rows of the result).

        Returns
        -------
        np.ndarray
            float64 ``[len(client_ids), E]`` in ``[-w_usage, w_fitness]``.

        """
        return self._desirability(self.index(client_ids))  # index first: it may grow fitness

    def _desirability(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`desirability` of the fitness rows ``rows``."""
        f = self.fitness[rows]
        if f.shape[0] == 0:
            return np.zeros_like(f)
        fmin = f.min(axis=1, keepdims=True)
        span = f.max(axis=1, keepdims=True) - fmin
        norm_f = np.divide(f - fmin, span, out=np.zeros_like(f), where=span > 0)
        umax = float(self.usage.max())
        norm_u = self.usage / umax if umax > 0 else np.zeros_like(self.usage)
        return self.w_fitness * norm_f - self.w_usage * norm_u[None, :]

    # -- planning ---------------------------------------------------------------------------

    def plan(
        self,
        client_ids: Sequence[str],
        capacity: np.ndarray | Sequence[int],
        policy: str | Policy,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Assign experts to this round's clients.

        Parameters
        ----------
        client_ids : sequence of str
            This round's clients (unseen ones are added).
        capacity : array_like of int
            ``[len(client_ids)]``, >= 0; a client gets ``min(capacity, E)`` experts (all ``E``
            under ``dense``).
        policy : str or Policy
            A registered policy or its name (:mod:`fedmoe_app.alignment.policies`).
        rng : np.random.Generator, optional
            Randomness for ``random`` and greedy tie-breaking; the state's own generator
            (seeded by ``seed``) when omitted.

        Returns
        -------
        np.ndarray
            Boolean ``[len(client_ids), E]`` plan.

        """
        policy = get_policy(policy)
        rows = self.index(client_ids)
        inputs = PlanInputs(
            r=as_slots(capacity, rows.size, self.num_experts),
            fitness=self.fitness[rows],
            desirability=self._desirability(rows) if policy.needs_desirability else None,
            load_slack=self.load_slack,
            approx_min_clients=self.approx_min_clients,
            rng=self.rng if rng is None else rng,
        )
        return policy.plan(inputs)

    # -- feedback ---------------------------------------------------------------------------

    def update(
        self,
        client_ids: Sequence[str],
        held: np.ndarray,
        tokens: np.ndarray,
        expert_loss: np.ndarray,
        gate_hist: np.ndarray,
    ) -> None:
        """Fold one round's feedback into fitness and usage (rules in the module docstring).

        Parameters
        ----------
        client_ids : sequence of str
            Clients that replied validly (unseen ones are added); others are unchanged.
        held : np.ndarray
            bool ``[R, E]``, the experts each client trained.
        tokens : np.ndarray
            ``[R, E]`` >= 0, tokens routed to each held expert (ignored where not held).
        expert_loss : np.ndarray
            ``[R, E]`` mean cross-entropy of each held expert on its tokens (NaN/inf means
            no evidence; ignored where not held).
        gate_hist : np.ndarray
            ``[R, E]`` >= 0, the full gate's top-k choice counts over all experts.

        """
        num_experts = self.num_experts
        n = len(client_ids)
        shape = (n, num_experts)
        held = np.asarray(held)
        if held.shape != shape:
            raise ValueError(f"held must have shape {shape}, got {held.shape}")
        held = held.astype(bool)
        arrays = {}
        for name, val in (
            ("tokens", tokens),
            ("expert_loss", expert_loss),
            ("gate_hist", gate_hist),
        ):
            arr = np.asarray(val, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
            arrays[name] = arr
        tok = np.where(held, arrays["tokens"], 0.0)
        hist = arrays["gate_hist"]
        if not (np.all(np.isfinite(tok)) and np.all(np.isfinite(hist))):
            raise ValueError("tokens and gate_hist must be finite")
        if np.any(tok < 0) or np.any(hist < 0):
            raise ValueError("tokens and gate_hist must be >= 0")
        rows = self.index(client_ids)
        if n == 0:
            self.usage *= self.usage_decay
            return

        a, d, lam = self.fitness_ema, self.fitness_decay, self.loss_weight
        tok_sum = tok.sum(axis=1, keepdims=True)
        share = np.divide(tok, tok_sum, out=np.zeros_like(tok), where=tok_sum > 0)
        loss = arrays["expert_loss"]
        with np.errstate(over="ignore", invalid="ignore"):
            score = np.where(np.isfinite(loss), np.exp(-np.maximum(loss, 0.0)), 0.0)
        signal = (1.0 - lam) * share + lam * score
        hist_sum = hist.sum(axis=1, keepdims=True)
        h = np.divide(hist, hist_sum, out=np.zeros_like(hist), where=hist_sum > 0)

        f = self.fitness[rows]
        direct = np.where(f == 0.0, signal, (1.0 - a) * f + a * signal)
        indirect = d * f + (1.0 - d) * h
        if self.fitness_init == "routing":  # no evidence yet and a histogram: the gate's share
            indirect = np.where((f == 0.0) & (hist_sum > 0), h, indirect)
        self.fitness[rows] = np.where(held, direct, indirect)
        self.usage = self.usage_decay * self.usage + tok.sum(axis=0)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable snapshot (plain lists/numbers) for checkpoints.

        Returns
        -------
        dict
            Hyper-parameters, ``client_ids``, ``fitness`` (list of rows), ``usage`` and the
            internal generator's state; :meth:`from_state_dict` restores it exactly.

        """
        return {
            "version": _STATE_VERSION,
            "num_experts": self.num_experts,
            **{k: getattr(self, k) for k in KNOBS},
            "client_ids": list(self.client_ids),
            "fitness": self.fitness.tolist(),
            "usage": self.usage.tolist(),
            "rng_state": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> AlignmentState:
        """Rebuild a state saved by :meth:`state_dict` (exact round trip).

        Parameters
        ----------
        d : dict
            Output of :meth:`state_dict` (possibly through JSON).

        Returns
        -------
        AlignmentState

        """
        version = int(d.get("version", _STATE_VERSION))
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported alignment state version {version}")
        older = {"approx_min_clients": 0, "fitness_init": "zero"}  # states saved before these knobs
        knobs = {**older, **{k: d[k] for k in KNOBS if k in d}}
        state = cls(int(d["num_experts"]), **knobs)
        ids = [str(c) for c in d["client_ids"]]
        fitness = np.asarray(d["fitness"], dtype=np.float64).reshape(len(ids), state.num_experts)
        usage = np.asarray(d["usage"], dtype=np.float64)
        if usage.shape != (state.num_experts,):
            raise ValueError("usage has the wrong length")
        for name, value in (("fitness", fitness), ("usage", usage)):
            if not np.isfinite(value).all():
                raise ValueError(f"{name} holds non-finite values (NaN or inf)")
        if (usage < 0).any():
            raise ValueError("usage holds negative values")
        state.index(ids)
        state.fitness = fitness.copy()
        state.usage = usage.copy()
        if "rng_state" in d:
            state.rng.bit_generator.state = d["rng_state"]
        return state
