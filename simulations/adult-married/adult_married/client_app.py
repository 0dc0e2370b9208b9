"""ClientApp: each SuperNode is one site holding part of the married population."""

from logging import WARNING

import numpy as np
from flwr.app import Context
from flwr.common import log

from fedlowrank.clients import ClientData, build_run_config_client_app

from .data import load_site_file, loader, site_rows, tensor_loader, train_test_split
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model

NODE_KEYS = ("partition-id", "num-partitions")


def site_data(context: Context) -> ClientData:
    """This node's rows: its own file (node config ``data-path``) or its partition of the
    embedded data (``partition-id``, ``num-partitions``: the simulation sets them).

    ``group-attribute`` in the node config (``sex``, the default, or ``race``) chooses the
    demographic group the site reports and FairLoRA routes by.
    """
    seed = int(context.run_config["seed"])
    batch_size = int(context.run_config["batch-size"])
    attribute = str(context.node_config.get("group-attribute", "sex"))
    if "data-path" in context.node_config:
        x, y, groups, skipped = load_site_file(str(context.node_config["data-path"]), attribute)
        if skipped:
            log(WARNING, "site data %s: %d rows skipped (missing values or unknown categories)",
                context.node_config["data-path"], skipped)
        train, test = train_test_split(np.arange(len(y)), seed + 1000 + int(context.node_id) % 1000)
        return ClientData(
            train=tensor_loader(x[train], y[train], groups[train], batch_size, shuffle=True, seed=seed),
            test=tensor_loader(x[test], y[test], groups[test], 1024, shuffle=False),
            num_groups=2,
        )
    missing = [key for key in NODE_KEYS if key not in context.node_config]
    if missing:
        raise ValueError(
            f"this SuperNode's node config lacks {missing} (and has no data-path): start it with "
            "--node-config \"data-path=<file>\" or \"partition-id=<i> num-partitions=<sites>\""
        )
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    if not 0 <= partition < partitions:
        raise ValueError(f"node config partition-id={partition} must be in 0..{partitions - 1}")
    train, test = site_rows(partition, partitions, seed)
    return ClientData(
        train=loader(train, batch_size, shuffle=True, seed=seed + partition, group_attribute=attribute),
        test=loader(test, 1024, shuffle=False, group_attribute=attribute),
        num_groups=2,
    )


app = build_run_config_client_app(
    model_fn=lambda context: load_base_model(),
    data_fn=site_data,
    target_modules=ADAPTER_TARGETS,
    trainable=TRAINABLE,
    rank=4,
    default_groups=1,
)
