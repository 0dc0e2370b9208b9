"""Headroom: the frozen base vs central fine-tuning of the same adapters on pooled data.

``python -m adult_married.central`` (from the app folder). The federated rules can only
differ where this gap is clear (docs/design.md, "Experiments that can tell methods apart").
"""

from __future__ import annotations

import argparse
import json

import torch

from fedlowrank.adapters import inject_adapters
from fedlowrank.clients import pick_device, predict, train_local
from fedlowrank.fairness import group_fairness_report

from .data import loader, pooled_test_rows, pooled_train_rows
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model


def evaluate(model, rows, device) -> dict:
    pred = predict(model, loader(rows, 1024, shuffle=False), device)
    return group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=2)


def headroom(
    num_partitions: int = 5, seed: int = 0, rank: int = 4, epochs: int = 5, lr: float = 3e-3, batch_size: int = 128
) -> dict:
    """AUC of the frozen base and of centrally fine-tuned adapters on the pooled test rows."""
    torch.manual_seed(seed)
    device = pick_device()
    test = pooled_test_rows(num_partitions, seed)
    base = load_base_model().to(device)
    before = evaluate(base, test, device)
    inject_adapters(base, ADAPTER_TARGETS, rank=rank, trainable=TRAINABLE)
    train_local(base, loader(pooled_train_rows(num_partitions, seed), batch_size, True, seed), epochs, lr, device)
    after = evaluate(base, test, device)
    return {"frozen_base": before, "central_finetune": after, "headroom_auc": after["auc"] - before["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        result = headroom(seed=seed, rank=args.rank, epochs=args.epochs)
        rows.append(result)
        b, c = result["frozen_base"], result["central_finetune"]
        print(
            f"seed {seed}: frozen base AUC {b['auc']:.4f} (male {b['auc_g0']:.4f}, female {b['auc_g1']:.4f}) | "
            f"central fine-tune AUC {c['auc']:.4f} (male {c['auc_g0']:.4f}, female {c['auc_g1']:.4f}) | "
            f"headroom {100 * result['headroom_auc']:+.2f} AUC points"
        )
    print(json.dumps({"mean_headroom_auc": sum(r["headroom_auc"] for r in rows) / len(rows)}))


if __name__ == "__main__":
    main()
