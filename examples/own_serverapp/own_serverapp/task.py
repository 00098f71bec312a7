"""What both apps share: the model (fedmoe's built-in CNN MoE) and each node's data."""

from flwr.app import Context

from fedmoe_app.data import Split, load_splits
from fedmoe_app.models import ModelSpec


def model_spec(run_config: dict) -> ModelSpec:
    """Return the CNN MoE for the synthetic images, sized by the run config."""
    _, _, info = load_splits("synthetic")
    return ModelSpec(
        info.in_channels,
        info.image_size,
        info.num_classes,
        num_experts=int(run_config["num-experts"]),
        top_k=int(run_config["top-k"]),
        stem_channels=8,
        feature_dim=32,
        expert_hidden=64,
    )


def node_data(context: Context) -> tuple[Split, Split]:
    """Return this node's share of the images: every n-th train and test example."""
    train, test, _ = load_splits("synthetic")
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    return train.subset(range(pid, len(train), n)), test.subset(range(pid, len(test), n))


def server_test() -> Split:
    """Return the server's held-out images (its own evaluation)."""
    return load_splits("synthetic")[1]
