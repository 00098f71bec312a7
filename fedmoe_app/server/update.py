"""The round's valid replies folded into the global model: bounded, averaged (or privatized), gate bias."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..config import AggregationSection
from ..maths.aggregation import aggregate, balance_gate_bias
from ..maths.robust import Bounded, bound_updates
from ..tensors import Arrays
from ..wire.protocol import TrainReply
from .private_round import PrivateAggregation


def bounded_updates(
    arrays: Mapping[str, np.ndarray], valid: Sequence[TrainReply], rules: AggregationSection, *, private: bool
) -> Bounded:
    """Return the updates that may enter the model.

    Under DP all of them (clipping to ``dp-clip-norm`` bounds them); else those within
    ``update-bound`` (scaled onto it when a little above), with example and token weights
    capped by ``weight-cap`` (:mod:`~fedmoe_app.maths.robust`).
    """
    if private:
        return Bounded([r.update for r in valid], list(range(len(valid))))
    return bound_updates(
        arrays,
        [r.update for r in valid],
        bound=rules.update_bound,
        weight_cap=rules.weight_cap,
        token_cap=rules.token_cap,
    )


def updated_model(
    arrays: Mapping[str, np.ndarray],
    kept: Sequence[TrainReply],
    bounded: Bounded,
    rules: AggregationSection,
    *,
    privacy: PrivateAggregation | None,
    population: int,
    in_place: bool = False,
) -> Arrays:
    """Return the new global model from the ``kept`` replies and their ``bounded`` updates.

    Each expert is averaged over its trainers and the shared part over everyone
    (:func:`~..maths.aggregation.aggregate`), or privately under DP; then the router bias is
    nudged toward balance by the kept replies' gate histograms at ``rules.gate_balance_rate``
    (0 under DP and for models without a router bias: ``RunConfig.aggregation_rules``).
    ``in_place``: the averages are written into ``arrays``' tensors (not under DP).
    """
    if privacy is not None:
        averaged = privacy.apply(arrays, kept, population)
    else:
        averaged = aggregate(
            arrays,
            bounded.updates,
            gate_from_all=rules.gate_from_all,
            single_holders=rules.single_holders,
            method=rules.method,
            trim_fraction=rules.trim_fraction,
            per_layer=rules.per_layer,
            in_place=in_place,
        )
    hist = np.stack([r.gate_hist for r in kept])
    return balance_gate_bias(averaged, hist, rules.gate_balance_rate, step=rules.gate_balance_step)
