"""The ClientApp's side: query / train / evaluate handlers, and fault injection wrapped around them.

* :mod:`.api`       -- :class:`FedMoEClient`: a user's ClientApp answers FedMoE with its own model and data;
* :mod:`.handlers`  -- identity, local data, capacity profile, sparse training and evaluation;
* :mod:`.faults`    -- seeded fault injection for simulation (wraps the handlers from outside);
* :mod:`.placement` -- the Ray node a simulated client runs on.

The client never imports the server (an import contract checks it).
"""

from .api import CLIENT_KEYS, FedMoEClient

__all__ = ["CLIENT_KEYS", "FedMoEClient"]
