"""Is the per-group setting valid? Central fine-tuning on all sites' images, pooled.

    python -m fairlora_images.central [--seeds 3] [--rank 4] [--epochs 4] [--lr 0.01] [--threads 1]

(from the app folder). Three fits on the pooled training images of the simulated sites,
each scored on the pooled test images (overall and worst-group AUC):

- frozen base + trained head only: the floor, what no adapter adds;
- adapters with G = 1 (one row of singular values) + head: what a model that cannot
  route by group reaches;
- adapters with G = 2 (FairLoRA, one row of S per group) + head.

The setting tells FairLoRA apart only if G = 2 beats G = 1 clearly (here: worst-group
AUC by >= 0.03 on every seed; docs/design.md, "Experiments that can tell methods
apart"); the script says whether it does.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from fedlowrank.adapters import inject_adapters
from fedlowrank.clients import pick_device, predict, train_local
from fedlowrank.fairness import group_fairness_report

from .data import GROUP_NAMES, loader, pooled
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model

MARGIN = 0.03
FITS = ("head only", "adapters G=1", "adapters G=2")


def evaluate(model, test, device) -> dict:
    pred = predict(model, loader(test, 1024, shuffle=False), device)
    return group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=2)


def fit(
    kind: str, train, test, seed: int, rank: int, epochs: int, lr: float, batch_size: int
) -> dict:
    """Train one of :data:`FITS` on the pooled training images; its test report."""
    if kind not in FITS:
        raise ValueError(f"unknown fit {kind!r}; choose one of {FITS}")
    device = pick_device()
    torch.manual_seed(seed)
    model = load_base_model()
    if kind == "head only":
        for name, param in model.named_parameters():
            param.requires_grad_(re.fullmatch(TRAINABLE, name) is not None)
    else:
        inject_adapters(model, ADAPTER_TARGETS, rank=rank, groups=1 if kind.endswith("G=1") else 2, trainable=TRAINABLE)
    model.to(device)
    train_local(model, loader(train, batch_size, shuffle=True, seed=seed), epochs, lr, device)
    return evaluate(model, test, device)


def headroom(
    num_partitions: int = 5, per_site: int = 2500, seed: int = 0, rank: int = 4, epochs: int = 4,
    lr: float = 0.01, batch_size: int = 64, dataset: str = "fashion-mnist",
) -> dict[str, dict]:
    """Test reports of the three :data:`FITS` for one seed (split, groups and init)."""
    train = pooled(dataset, num_partitions, per_site, seed, "train")
    test = pooled(dataset, num_partitions, per_site, seed, "test")
    return {kind: fit(kind, train, test, seed, rank, epochs, lr, batch_size) for kind in FITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--site-images", type=int, default=2500)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads ran 6x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gains = []
    for seed in range(args.seeds):
        reports = headroom(args.sites, args.site_images, seed, args.rank, args.epochs, args.lr, args.batch_size, args.dataset)
        for kind, r in reports.items():
            print(
                f"seed {seed} {kind:>13}: AUC {r['auc']:.4f} ({GROUP_NAMES[0]} {r['auc_g0']:.4f}, "
                f"{GROUP_NAMES[1]} {r['auc_g1']:.4f}) worst-group AUC {r['worst_group_auc']:.4f}",
                flush=True,
            )
        gains.append(reports["adapters G=2"]["worst_group_auc"] - reports["adapters G=1"]["worst_group_auc"])
    mean = sum(gains) / len(gains)
    print(json.dumps({"worst_group_auc_gain_g2_over_g1": [round(g, 4) for g in gains], "mean": round(mean, 4),
                      "valid": all(g >= MARGIN for g in gains)}))


if __name__ == "__main__":
    main()
