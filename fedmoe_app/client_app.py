"""fedmoe ClientApp: answers capacity queries, trains and evaluates its sparse sub-model."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe_app.client import handlers
from fedmoe_app.client.faults import with_evaluate_faults, with_train_faults

app = ClientApp()
handle_train = with_train_faults(handlers.handle_train)  # fault-*-prob = 0: the handler as it is
handle_evaluate = with_evaluate_faults(handlers.handle_evaluate)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this client's id and capacity profile."""
    return Message(content=handlers.handle_query(msg, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the shared part and the assigned experts on local data."""
    return Message(content=handle_train(msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received sparse model on the local test split."""
    return Message(content=handle_evaluate(msg, context), reply_to=msg)
