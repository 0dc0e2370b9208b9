"""What secure aggregation costs: bytes per client per round and compute time, against plain exact aggregation.

    python benchmarks/secure.py --d 4096 --rank 16 --clients 10
    python benchmarks/secure.py --d 4096 --rank 16 --clients 10 --drop 2          # 2 sites drop after sharing keys
    python benchmarks/secure.py --d 4096 --rank 16 --clients 100 --width 64 --share-fraction 0.1

One layer ``d x d`` with a rank-``rank`` global adapter; ``clients`` sites of that rank reply
with their own change. Plain: each client sends its float32 factors (what FedLowRank's
clients send) and ``ServerRound`` aggregates them. Secure: the whole protocol in one process
(:mod:`fedlowrank.secure.simulate`: key agreement, Shamir shares, two masked sums of range
sketches, unmasking) with every payload's bytes counted per node, both directions (the
server's ``Q`` to each client included), then the recovered sum through ``ServerRound.add_sum``.
Times: the server's total, and the mean per client (its sketches and protocol steps); the
ratio is against plain aggregation measured in the same run. The secure result is checked
against the plain one (relative difference of the products).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.sketched import CORANGE, LABELS, RANGE, add_to_round, bases_from_range, corange_contribution, plan_round, range_contribution
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.secure.simulate import InProcessSecureSums


def layer(rng, d, rank, scale=1.0):
    return {"fc.lora_U": scale * rng.normal(size=(d, rank)), "fc.lora_S": np.ones((1, rank)), "fc.lora_V": scale * rng.normal(size=(d, rank))}


def product(arrays):
    return (arrays["fc.lora_U"] * arrays["fc.lora_S"][0]) @ arrays["fc.lora_V"].T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--width", type=int, default=0, help="sketch columns (0: the sum of ranks, exact)")
    parser.add_argument("--share-fraction", type=float, default=1.0, help="SecAgg+ neighbours as a share of the clients")
    parser.add_argument("--drop", type=int, default=0,
                        help="sites that drop after sharing keys, before any masked vector (their masks are removed from both sums)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    d, r, k = args.d, args.rank, args.clients
    global_arrays = {key: v.astype(np.float32) for key, v in layer(rng, d, r, 0.05).items()}
    replies = [{key: (global_arrays[key] + (0.01 * rng.normal(size=v.shape) if key != "fc.lora_S" else 0)).astype(np.float32)
                for key, v in global_arrays.items()} for _ in range(k)]
    weights = [float(w) for w in rng.integers(100, 1000, size=k)]
    nodes = list(range(1, k + 1))
    # Spread over the ring, as independent dropouts fall (SecAgg+ tolerates share_num - threshold per neighbourhood).
    dropped = set(nodes[:: max(1, k // args.drop)][: args.drop]) if args.drop else set()
    config = dict(rank=r, share_cap=None, align=False, dense_products="float64")

    start = time.perf_counter()
    plain_round = ServerRound(RoundConfig(**config), LowRankState(), global_arrays, 1)
    for reply, weight, node in zip(replies, weights, nodes):
        if node not in dropped:
            plain_round.add(reply, weight)
    plain = plain_round.finish().arrays
    plain_seconds = time.perf_counter() - start
    plain_bytes = sum(a.nbytes for a in replies[0].values()) + sum(a.nbytes for a in global_arrays.values())

    share_num = k if args.share_fraction >= 1 else min(k, max(3, int(np.ceil(args.share_fraction * k))) | 1)
    threshold = max(2, int(np.ceil(0.5 * share_num)))
    drop = {n: f"{RANGE}:mask" for n in dropped}
    client_extra = {n: 0.0 for n in nodes}
    start = time.perf_counter()
    sums = InProcessSecureSums(nodes, LABELS, share_num, threshold, drop)
    plan = plan_round(global_arrays, [r] * k, seed=1, weight_bound=1e6, width=args.width or None, value_bound=1e4)
    range_vectors = {}
    for n, reply, weight in zip(nodes, replies, weights):
        t0 = time.perf_counter()
        range_vectors[n] = range_contribution(plan, reply, weight)[0]
        client_extra[n] += time.perf_counter() - t0
    _, range_sum, _ = sums.secure_sum(RANGE, range_vectors, plan.range_bounds())
    t0 = time.perf_counter()
    bases = bases_from_range(plan, range_sum)
    server_extra = time.perf_counter() - t0
    basis_bytes = sum(b.nbytes for b in bases.values())
    corange_vectors = {}
    for n, reply, weight in zip(nodes, replies, weights):
        if n in dropped:
            continue
        t0 = time.perf_counter()
        corange_vectors[n] = corange_contribution(plan, reply, weight, bases)[0]
        client_extra[n] += time.perf_counter() - t0
    _, corange_sum, survivors = sums.secure_sum(CORANGE, corange_vectors, plan.corange_bounds())
    t0 = time.perf_counter()
    secure_round = ServerRound(RoundConfig(**config), LowRankState(), global_arrays, 1)
    metrics = add_to_round(secure_round, plan, range_sum, bases, corange_sum, len(survivors))
    secure = secure_round.finish().arrays
    server_extra += time.perf_counter() - t0
    wall = time.perf_counter() - start
    server_seconds = sums.server_seconds + server_extra
    finishers = [n for n in nodes if n not in dropped]
    client_seconds = float(np.mean([sums.client_seconds[n] + client_extra[n] for n in finishers]))
    secure_bytes = float(np.mean([sums.sent[n] + basis_bytes + sum(a.nbytes for a in global_arrays.values()) for n in finishers]))
    diff = np.linalg.norm(product(secure) - product(plain)) / np.linalg.norm(product(plain))

    print(f"d = {d}, rank {r}, {k} clients, sketch width {plan.widths['fc']}, neighbours {share_num}, threshold {threshold}, "
          f"{args.drop} dropped after sharing keys")
    print(f"plain exact : {plain_bytes / 2**20:8.2f} MiB per client per round (reply + global), server {plain_seconds:7.3f} s")
    print(f"secure      : {secure_bytes / 2**20:8.2f} MiB per client per round ({secure_bytes / plain_bytes:.1f}x), "
          f"server {server_seconds:7.3f} s ({server_seconds / plain_seconds:.1f}x), client {client_seconds:.3f} s each, "
          f"whole simulated round {wall:.1f} s")
    print(f"secure vs plain product: relative difference {diff:.2e}; reported sketch error {metrics['agg-sketch-error-rel']:.2e}; "
          f"clipped {int(metrics['secure-clipped'])}")


if __name__ == "__main__":
    main()
