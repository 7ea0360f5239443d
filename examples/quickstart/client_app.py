"""The quickstart ClientApp: your model and training loop, wrapped by CMDClient."""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from task import Net, load_data

from clients.cmd_client import CMDClient, OptimizerHook

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's model for one epoch on its partition, under CMD."""
    trainloader = load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )

    def train_fn(model: torch.nn.Module, optimizer_hook: OptimizerHook | None) -> dict[str, float]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer_hook is not None:  # CMD keeps embedded weights on the CMD model
            optimizer_hook(optimizer)
        model.train()
        seen = 0
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        return {"num-examples": seen, "train-loss": loss.item()}

    # The CMD state (modes, references, frozen coefficients) lives in context.state.
    return CMDClient(Net(), train_fn).train(msg, context)
