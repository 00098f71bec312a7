"""An in-process federation for strategy tests: a Grid whose nodes answer with numpy updates.

Each node ``n`` is client ``c<n>``; it answers a query with its client id, a training message
with the arrays it was sent plus ``scale`` times a seeded random direction (and honest
feedback; in the wire dtype it was sent, a bf16 one as bf16 changes), and an evaluation message
with a fixed accuracy. Nodes in ``silent`` never answer;
``asked`` counts the messages each node was sent, by message type.

:class:`ClientGrid` is the other kind: nodes that are real clients, answering through the app's handlers.
"""

from collections import Counter

import numpy as np
from flwr.app import Context, Message, Metadata, MetricRecord, RecordDict

from fedmoe_app.client.handlers import handle_evaluate, handle_query, handle_train
from fedmoe_app.wire.holdings import held_from_config
from fedmoe_app.wire.protocol import ARRAYS, CLIENT, CONFIG, METRICS, client_record, train_reply_content
from fedmoe_app.wire.records import from_record, record_wire_dtype, reply_record

EXAMPLES = 100


class FakeGrid:
    """Nodes 1..n answering every message in process."""

    def __init__(self, n, *, num_experts, top_k, scale=1.0, seed=0, silent=()):
        self.n, self.num_experts, self.top_k, self.scale = n, num_experts, top_k, scale
        self.silent = set(silent)
        self.asked = {}  # message type -> Counter of node ids
        self.rng = np.random.default_rng(seed)
        self.sent = []  # (node, arrays sent) of every training message
        self.replied = []  # (node, arrays replied) of every training reply

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def _meta(self, node, kind):
        return Metadata(1, "m", node, 0, "", "1", 0.0, 60.0, kind)

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            self.asked.setdefault(kind, Counter())[node] += 1
            if node in self.silent:
                continue
            if kind == "query":
                content = RecordDict({CLIENT: client_record(f"c{node}")})
            elif kind == "train":
                content = self._train(node, m)
            else:
                metrics = MetricRecord({"eval-loss": 1.0, "eval-accuracy": 0.5, "num-examples": 10})
                content = RecordDict({METRICS: metrics, CLIENT: client_record(f"c{node}")})
            replies.append(Message(content=content, metadata=self._meta(node, kind)))
        return replies

    def _train(self, node, m):
        arrays = from_record(m.content[ARRAYS])
        conf = m.content[CONFIG]
        experts = [int(e) for e in conf["expert-ids"]]
        if conf["frozen-experts"]:
            arrays = {k: v for k, v in arrays.items() if not k.startswith("experts.")}
        direction = {k: self.rng.normal(size=v.shape) for k, v in arrays.items()}
        norm = np.sqrt(sum(float((d**2).sum()) for d in direction.values()))
        out = {k: (v + self.scale * direction[k] / norm).astype(v.dtype) for k, v in arrays.items()}
        self.sent.append((node, from_record(m.content[ARRAYS])))
        self.replied.append((node, out))
        held = held_from_config(conf, self.num_experts)  # [L, E]: the same share in every layer
        layers = held.shape[0]
        tokens = np.where(held, EXAMPLES * min(self.top_k, len(experts)) / len(experts) / layers, 0.0)
        hist = np.full(held.shape, EXAMPLES * self.top_k / self.num_experts / layers)
        feedback = {"layer-tokens": tokens, "layer-loss-sum": tokens.copy(), "layer-gate-hist": hist}
        metrics = {"num-examples": EXAMPLES, "train-loss": 1.0, "train-accuracy": 0.5}
        record = reply_record(out, arrays, record_wire_dtype(m.content[ARRAYS]))  # the sent wire dtype
        return train_reply_content(record, metrics, feedback, f"c{node}")


class ClientGrid:
    """Nodes 1..n, each a real client (partition n - 1 of n) answering through the app's handlers.

    ``handlers`` (message type -> ``handler(msg, context)`` returning content or a Message)
    replaces the app's, e.g. a user's ClientApp functions; ``node_configs`` (node -> entries)
    adds to a node's config; ``configs`` keeps every message's config as ``(type, dict)``.
    """

    handlers = {"query": handle_query, "train": handle_train, "evaluate": handle_evaluate}

    def __init__(self, run_config, n, handlers=None, node_configs=None):
        extra = node_configs or {}
        self.contexts = {
            i: Context(
                0,
                i,
                {"partition-id": i - 1, "num-partitions": n, **extra.get(i, {})},
                RecordDict(),
                run_config,
            )
            for i in range(1, n + 1)
        }
        if handlers is not None:
            self.handlers = handlers
        self.configs = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            self.configs.append((kind, dict(m.content[CONFIG].items())))
            out = self.handlers[kind](m, self.contexts[node])
            content = out.content if isinstance(out, Message) else out
            meta = Metadata(1, "m", node, 0, "", "1", 0.0, 60.0, kind)
            replies.append(Message(content=content, metadata=meta))
        return replies
