"""FedMoEClient: answer FedMoE's query / train / evaluate messages in a user's own ClientApp.

A user's ClientApp keeps its own model and data and hands both to :class:`FedMoEClient`, whose
methods reply to the messages of :class:`fedmoe_app.server.strategy.FedMoE` through the same
handlers as the fedmoe ClientApp (:mod:`.handlers`)::

    client = FedMoEClient(model_fn=spec.build, data_fn=load_my_data, num_experts=8, batch_size=32)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client.train(msg, context)

(and ``@app.query()`` / ``@app.evaluate()`` alike, see ``examples/own_serverapp/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message

from ..capacity import ModelCosts
from ..config import RunConfig
from ..config.run import keyword_config
from ..models import MoEModel
from .context import identity
from .handlers import ClientTask, evaluate_reply, query_reply, train_reply

#: Run-config keys :class:`FedMoEClient` takes as keyword arguments (``snake_case``): the local
#: training knobs; their defaults and checks are :class:`~fedmoe_app.config.RunConfig`'s.
CLIENT_KEYS = (
    "batch_size", "momentum", "optimizer", "weight_decay", "adam_beta1", "adam_beta2",
    "grad_accum_steps", "max_grad_norm", "aux_loss_weight", "route_loss_weight", "precision", "device",
)  # fmt: skip

DataFn = Callable[[Context], tuple[Any, Any]]


def client_config(options: dict[str, Any]) -> RunConfig:
    """Return the validated :class:`RunConfig` of :class:`FedMoEClient` keyword ``options``.

    Raises
    ------
    TypeError
        For a key that is not one of :data:`CLIENT_KEYS`.
    ConfigError
        Naming the run-config key, the bad value and what is allowed.

    """
    return keyword_config(options, CLIENT_KEYS, "FedMoEClient")


class FedMoEClient:
    """Reply to FedMoE's messages with a user's own :class:`~fedmoe_app.models.MoEModel` and data.

    Parameters
    ----------
    model_fn : callable
        ``model_fn(holding)``: the model holding the experts of a bool ``[L, E]`` holding (a
        built-in family's ``spec.build``, or any ``MoEModel`` factory); FedMoE's weights are
        loaded into it from each message.
    data_fn : callable
        ``data_fn(context)``: this node's ``(train, test)`` splits (:class:`fedmoe_app.data.Split`
        for images: ``Split(images, labels)``; anything with ``inputs_targets()`` and ``len``).
        Called once per node (cached by the node's client id).
    num_experts : int
        ``E``, the experts of the global model.
    client_id : callable, optional
        ``client_id(context)``: the id the client reports; default node config ``client-id``,
        else its ``partition-id``.
    costs : ModelCosts, optional
        The model's counted costs (``fedmoe_app.models.model_costs(spec)``) for its capacity profile.
    text : bool
        The splits are token windows (``TextSplit``): evaluate per token and in bits per byte.
    **options
        Local training knobs, any of :data:`CLIENT_KEYS` (``batch_size=32``, ``optimizer="adamw"``),
        checked and defaulted as the run config's keys of the same name. The learning rate and
        the local epochs of each round come from the server's message.

    """

    def __init__(
        self,
        model_fn: Callable[[np.ndarray], MoEModel],
        data_fn: DataFn,
        *,
        num_experts: int,
        client_id: Callable[[Context], str] = identity,
        costs: ModelCosts | None = None,
        text: bool = False,
        **options: Any,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"FedMoEClient num_experts = {num_experts!r} is invalid; allowed: >= 1")
        self.cfg = client_config(options)
        self.model_fn, self.num_experts = model_fn, num_experts
        self.client_id, self.costs, self.text = client_id, costs, text
        self.data_fn = data_fn
        self._splits: dict[str, tuple[Any, Any]] = {}  # client id -> (train, test)

    def task(self, context: Context) -> ClientTask:
        """Return the :class:`~.handlers.ClientTask` of this node (its id, model, data and knobs)."""
        cid = self.client_id(context)
        if cid not in self._splits:
            self._splits[cid] = self.data_fn(context)
        train_data, test_data = self._splits[cid]
        cfg = self.cfg
        return ClientTask(
            client_id=cid,
            build=self.model_fn,
            train_data=train_data,
            test_data=test_data,
            num_experts=self.num_experts,
            training=cfg.training,
            device=cfg.device,
            text=self.text,
            costs=self.costs,
        )

    def query(self, msg: Message, context: Context) -> Message:
        """Reply to FedMoE's ``query``: the client id and its capacity profile."""
        return Message(content=query_reply(self.task(context), context), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """Reply to FedMoE's ``train``: the trained shared part and experts, with routing feedback."""
        received_at = time.time()  # before the task loads anything: the link measurement's clock
        return Message(content=train_reply(msg, self.task(context), context, received_at), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Reply to FedMoE's ``evaluate``: loss and accuracy of the received sparse view."""
        return Message(content=evaluate_reply(msg, self.task(context)), reply_to=msg)
