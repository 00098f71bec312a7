"""The federation on Flower: messages, reply validation, sparse aggregation, planning, strategy.

* :mod:`.protocol`    -- record keys, what was sent, reply validation;
* :mod:`.records`     -- Flower ``ArrayRecord`` packing and wire bytes;
* :mod:`.aggregation` -- each expert over its trainers, the shared part over everyone;
* :mod:`.robust`      -- bounded influence: oversized updates left out, weights capped;
* :mod:`.privacy`     -- DP: clipped deltas, unweighted per-group means, Gaussian noise;
* :mod:`.accounting`  -- Opacus's RDP epsilon per group; :mod:`.private_round` glues both;
* :mod:`.loop`        -- the run loop of ``FedMoE.start`` (Flower's ``Strategy.start`` semantics);
* :mod:`.planner`     -- capacity -> assignment -> budgets: the :class:`~.planner.RoundPlan`;
* :mod:`.discovery`   -- node ids -> client ids and capacity profiles (``query``);
* :mod:`.rounds`      -- what a round sent and aggregated, and its metrics row;
* :mod:`.strategy`    -- :class:`~.strategy.FedMoE`, the Flower strategy;
* :mod:`.client`      -- the ClientApp's query / train / evaluate handlers;
* :mod:`.faults`      -- seeded fault injection for simulation.
"""
