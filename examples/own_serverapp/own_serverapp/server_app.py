"""A user's own ServerApp that federates with fedmoe's FedMoE strategy."""

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmoe_app.models import load_arrays, model_to_arrays
from fedmoe_app.server import FedMoE
from fedmoe_app.training import evaluate
from fedmoe_app.wire.records import from_record, to_record
from own_serverapp.task import model_spec, server_test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train the MoE for ``num-server-rounds``, each client holding ``experts-per-client`` experts."""
    rc = context.run_config
    spec = model_spec(rc)
    strategy = FedMoE(
        top_k=int(rc["top-k"]),
        policy="load_balanced",
        experts_per_client=int(rc["experts-per-client"]),
        capacity="fixed",
        fraction_train=float(rc["fraction-train"]),
        min_train_nodes=int(rc["min-train-nodes"]),
        lr=float(rc["lr"]),
    )

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = spec.build()
        load_arrays(model, from_record(arrays))
        loss, accuracy = evaluate(model, server_test())
        log(INFO, "own_serverapp: round %d accuracy %.4f loss %.4f", server_round, accuracy, loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid,
        initial_arrays=to_record(model_to_arrays(spec.build(seed=0))),
        num_rounds=int(rc["num-server-rounds"]),
        train_config=ConfigRecord({"example": "own_serverapp"}),
        evaluate_fn=central,
    )
    for rnd, metrics in result.train_metrics_clientapp.items():
        log(INFO, "own_serverapp: round %d valid-replies %d", rnd, metrics["valid-replies"])
