"""ClientApp: each SuperNode is one site holding part of the married population."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlowrank.clients import AdapterConfig, ClientData, DPConfig, build_client_app

from .data import loader, site_rows
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model


NODE_KEYS = ("partition-id", "num-partitions")


def site_data(context: Context) -> ClientData:
    """This node's rows, from its partition id in a seeded split of the embedded data.

    The simulation sets ``partition-id`` and ``num-partitions``; a SuperNode in deployment
    gets them from its node config (``--node-config "partition-id=0 num-partitions=3"``).
    """
    missing = [key for key in NODE_KEYS if key not in context.node_config]
    if missing:
        raise ValueError(
            f"this SuperNode's node config lacks {missing}: start it with "
            "--node-config \"partition-id=<i> num-partitions=<sites>\" (the simulation sets both)"
        )
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    if not 0 <= partition < partitions:
        raise ValueError(f"node config partition-id={partition} must be in 0..{partitions - 1}")
    seed = int(context.run_config["seed"])
    train, test = site_rows(partition, partitions, seed)
    batch_size = int(context.run_config["batch-size"])
    return ClientData(
        train=loader(train, batch_size, shuffle=True, seed=seed + partition),
        test=loader(test, 1024, shuffle=False),
        num_groups=2,
    )


def site_privacy(context: Context) -> DPConfig | None:
    """Adapter-only DP-SGD when the run config sets ``dp-noise-multiplier`` > 0."""
    noise = float(context.run_config.get("dp-noise-multiplier", 0.0))
    if noise <= 0:
        return None
    return DPConfig(
        noise_multiplier=noise,
        max_grad_norm=float(context.run_config["dp-max-grad-norm"]),
        delta=float(context.run_config["dp-delta"]),
        target_epsilon=float(context.run_config["dp-target-epsilon"]),
    )


# One builder per adapter group count (run config ``groups``: 1, or 2 = one row of S per sex).
APPS = {
    groups: build_client_app(
        model_fn=lambda context: load_base_model(),
        data_fn=site_data,
        adapter=AdapterConfig(target_modules=ADAPTER_TARGETS, rank=4, groups=groups, trainable=TRAINABLE),
        dp=site_privacy,
    )
    for groups in (1, 2)
}

app = ClientApp()


def dispatch(msg: Message, context: Context) -> Message:
    """Hand the message to the ClientApp built for the run's group count."""
    groups = int(context.run_config.get("groups", 1))
    if groups not in APPS:
        raise ValueError(f"groups = {groups}; this app supports {sorted(APPS)}")
    return APPS[groups](msg, context)


app.train()(dispatch)
app.evaluate()(dispatch)
