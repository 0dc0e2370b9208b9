"""Time aggregate_svd against the dense reference and torch.svd_lowrank, in one run.

    python benchmarks/aggregation.py                 # d = 4096, K = 32 clients, rank 16
    python benchmarks/aggregation.py --d 1024 --clients 8

Every method gets the clients' factors and must return the rank-r factors of their
weighted sum. The dense reference forms the d x d sum and takes its full SVD; the
svd_lowrank baseline forms the same sum and runs torch's randomised range finder
(niter = 2, q = r + 8 oversampling), which is approximate. Times are medians of
repeats; ratios are against the baselines measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlowrank.aggregation import aggregate_svd, dense_weighted_sum


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    d, k, r = args.d, args.clients, args.rank
    # Clients fine-tuned from one global adapter: a shared component plus their own.
    shared_u, shared_v = torch.randn(d, r, generator=gen), torch.randn(d, r, generator=gen)
    us = [(shared_u + torch.randn(d, r, generator=gen)).to(dtype) / d**0.5 for _ in range(k)]
    vs = [(shared_v + torch.randn(d, r, generator=gen)).to(dtype) / d**0.5 for _ in range(k)]
    ss = [torch.rand(r, generator=gen).to(dtype) + 0.5 for _ in range(k)]
    weights = (torch.rand(k, generator=gen) + 0.5).tolist()
    total = sum(weights)
    weights = [w / total for w in weights]
    print(f"d_out = d_in = {d}, K = {k} clients, rank {r}, {args.dtype}, {torch.get_num_threads()} threads")

    def dense():
        u, s, vh = torch.linalg.svd(dense_weighted_sum(us, ss, vs, weights), full_matrices=False)
        return u[:, :r], s[:r], vh[:r].T

    def lowrank():
        u, s, v = torch.svd_lowrank(dense_weighted_sum(us, ss, vs, weights), q=r + 8, niter=2)
        return u[:, :r], s[:r], v[:, :r]

    t_dense, ref = timed(dense, 1)
    best = (ref[0] * ref[1]) @ ref[2].T
    rows = [("dense sum + full SVD", t_dense, ref)]
    rows.append(("dense sum + torch.svd_lowrank", *timed(lowrank, args.repeats)))
    for method in ("qr", "gram"):
        t, agg = timed(lambda: aggregate_svd(us, ss, vs, weights, r, method=method), args.repeats)
        rows.append((f"aggregate_svd ({method})", t, (agg.u, agg.s, agg.v)))
    t_lowrank = rows[1][1]
    print(f"{'method':34s} {'seconds':>9s} {'vs dense':>9s} {'vs svd_lowrank':>15s} {'rel. error':>11s}")
    for name, seconds, (u, s, v) in rows:
        err = float(((u * s) @ v.T - best).norm() / best.norm())
        print(f"{name:34s} {seconds:9.4f} {t_dense / seconds:8.1f}x {t_lowrank / seconds:14.1f}x {err:11.2e}")


if __name__ == "__main__":
    main()
