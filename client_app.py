"""fedmoe ClientApp: answers capacity queries, trains and evaluates its sparse sub-model."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe_app.federation import client

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this client's id and capacity profile."""
    return Message(content=client.handle_query(msg, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the shared part and the assigned experts on local data."""
    return Message(content=client.handle_train(msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received sparse model on the local test split."""
    return Message(content=client.handle_evaluate(msg, context), reply_to=msg)
