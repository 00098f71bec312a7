"""The ServerApp's side: the FedMoE strategy, its round functions and their state.

* :mod:`.strategy`      -- :class:`~.strategy.FedMoE`, the Flower strategy;
* :mod:`.loop`          -- the run loop of ``FedMoE.start`` (Flower's ``Strategy.start`` semantics);
* :mod:`.planner`       -- capacity -> assignment -> budgets: the :class:`~.planner.RoundPlan`;
* :mod:`.discovery`     -- node ids -> client ids and capacity profiles (``query``);
* :mod:`.rounds`        -- what a round sent and aggregated, and its metrics row;
* :mod:`.feedback`      -- routing feedback into the alignment state;
* :mod:`.accounting`    -- Opacus's RDP epsilon per group; :mod:`.private_round` glues it to the noise;
* :mod:`.timing`        -- the server's own seconds per phase of a round.
"""

from .strategy import STRATEGY_KEYS, FedMoE

__all__ = ["STRATEGY_KEYS", "FedMoE"]
