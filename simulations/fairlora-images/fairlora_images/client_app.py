"""ClientApp: each SuperNode is one site holding images, their labels and group ids."""

from __future__ import annotations

from flwr.app import Context

from fedlowrank.clients import ClientData, build_run_config_client_app
from fedlowrank.datasets.fashion_mnist import DEFAULT_ROOT

from .data import check_dataset, load_site_file, loader, site_task
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model

NODE_KEYS = ("partition-id", "num-partitions")
DEFAULT_SITE_IMAGES = 2500


def dataset_name(context: Context) -> str:
    """The node config's ``dataset``, else the run config's (``fashion-mnist`` by default)."""
    given = context.node_config.get("dataset", context.run_config.get("dataset", "fashion-mnist"))
    return check_dataset(str(given))


def site_data(context: Context) -> ClientData:
    """This node's images: its own MedMNIST-style file or its share of a simulated pool.

    ``dataset = "medmnist"`` reads the node config's ``data-path`` (a ``.npz`` with
    ``train``/``test`` splits, binary labels and optional ``{split}_groups``; see
    ``data.load_site_file``). ``fashion-mnist`` and ``digits`` give the simulated site
    ``partition-id`` of ``num-partitions`` (the simulation sets both) ``site-images``
    training images relabelled by its groups' rules; ``data-root`` (node config, else run
    config) points at another Fashion-MNIST folder.
    """
    seed = int(context.run_config["seed"])
    batch_size = int(context.run_config["batch-size"])
    dataset = dataset_name(context)
    if "data-path" in context.node_config or dataset == "medmnist":
        if dataset != "medmnist" or "data-path" not in context.node_config:
            raise ValueError(
                f"dataset = {dataset!r} with node config data-path = {context.node_config.get('data-path')!r}: "
                "a site's own file needs dataset = 'medmnist' (run or node config) and data-path=<file.npz>"
            )
        train, test = load_site_file(str(context.node_config["data-path"]))
        shuffle_seed = seed + int(context.node_id) % 1000
    else:
        missing = [key for key in NODE_KEYS if key not in context.node_config]
        if missing:
            raise ValueError(
                f"this SuperNode's node config lacks {missing} (and has no data-path): start it with "
                "--node-config \"partition-id=<i> num-partitions=<sites>\", or set dataset = 'medmnist' "
                "and \"data-path=<file.npz>\""
            )
        partition = int(context.node_config["partition-id"])
        partitions = int(context.node_config["num-partitions"])
        if not 0 <= partition < partitions:
            raise ValueError(f"node config partition-id={partition} must be in 0..{partitions - 1}")
        per_site = int(context.run_config.get("site-images", DEFAULT_SITE_IMAGES))
        root = (str(context.node_config.get("data-root", "")).strip()
                or str(context.run_config.get("data-root", "")).strip() or DEFAULT_ROOT)
        train, test, _, _ = site_task(dataset, partition, partitions, per_site, seed, root)
        shuffle_seed = seed + partition
    return ClientData(
        train=loader(train, batch_size, shuffle=True, seed=shuffle_seed),
        test=loader(test, 1024, shuffle=False),
        num_groups=2,
    )


app = build_run_config_client_app(
    model_fn=lambda context: load_base_model(),
    data_fn=site_data,
    target_modules=ADAPTER_TARGETS,
    trainable=TRAINABLE,
    rank=4,
    default_groups=2,
)
