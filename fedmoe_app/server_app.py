"""fedmoe ServerApp: read the run config, run the FedMoE strategy, save the results."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmoe_app.run.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated Mixture-of-Experts job described by the run config."""
    run_server(grid, dict(context.run_config))
