"""A user's own ClientApp: its model and data answer FedMoE through fedmoe's FedMoEClient."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe_app.client import FedMoEClient
from own_serverapp.task import model_spec, node_data

app = ClientApp()


def fedmoe_client(context: Context) -> FedMoEClient:
    """Return the helper: the model holding the experts FedMoE sends, and this node's data."""
    spec = model_spec(context.run_config)
    batch_size = int(context.run_config["batch-size"])
    return FedMoEClient(
        spec.build, node_data, num_experts=spec.num_experts, batch_size=batch_size, device="cpu"
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell FedMoE who this client is and what it can hold."""
    return fedmoe_client(context).query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the shared part and the experts FedMoE sent on this node's data."""
    return fedmoe_client(context).train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the sparse model FedMoE sent on this node's test data."""
    return fedmoe_client(context).evaluate(msg, context)
