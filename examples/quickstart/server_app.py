"""The quickstart ServerApp: CMDStrategy, server-side evaluation, the byte ledger on disk."""

from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from task import Net, accuracy, load_test_data

from cmd_fl import EmbeddingSchedule, ParameterLayout
from cmd_fl.ledger import ByteLedger
from strategies.cmd_strategy import CMDStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run CMD for ``num-server-rounds`` rounds and write ``ledger.csv`` to ``results-dir``."""
    model = Net()
    ledger = ByteLedger()  # every message: round, direction, node, payload, wire, control bytes
    strategy = CMDStrategy(
        ParameterLayout.from_module(model),
        ledger,
        EmbeddingSchedule(warmup=2, every=1, percent=20.0, max_fraction=0.8),
        n_modes=4,
        min_available_nodes=2,  # FedAvg's own settings pass through
    )
    x_test, y_test = load_test_data()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model, x_test, y_test)})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(context.run_config["num-server-rounds"]),
        evaluate_fn=evaluate,
    )
    # Absolute: a ServerApp's working directory is the SuperLink's.
    out_dir = Path(str(context.run_config["results-dir"])).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger.to_csv(out_dir / "ledger.csv")
    final = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    print(f"[cmd-fl] final accuracy {final['accuracy']:.4f}", flush=True)
    print(f"[cmd-fl] results written to {out_dir}", flush=True)
