"""Time aggregate_svd against the dense reference and torch.svd_lowrank, in one run.

    python benchmarks/aggregation.py                 # d = 4096, K = 32 clients, rank 16
    python benchmarks/aggregation.py --d 1024 --clients 8
    python benchmarks/aggregation.py --sweep 8,64,256,1000   # scaling in K (streaming vs dense)
    python benchmarks/aggregation.py --flat --clients 1000   # independent clients: a flat spectrum

Every method gets the clients' factors and must return the rank-r factors of their
weighted sum.

``--sweep``: for each K, the ``exact`` rule's streaming accumulator (replies generated and
folded in one at a time; factored while K r <= d / 2, dense beyond) against the dense
baseline (the same replies summed one at a time into a d x d matrix, then its full SVD),
interleaved, each in a fresh process so that its peak resident memory is its own. The dense reference forms the d x d sum and takes its full SVD; the
svd_lowrank baseline forms the same sum and runs torch's randomised range finder
(niter = 2, q = r + 8 oversampling), which is approximate. Times are medians of
repeats; ratios are against the baselines measured in this run.

``--flat``: K clients with independent random rank-r factors (no shared structure: a flat
spectrum, as DP noise or very diverse sites give), held as real Flower reply messages
(float32, as clients send them), aggregated by ``FedLowRank.aggregate_train`` against the
float64 dense sum + full SVD, the sum formed one reply at a time (as ``--sweep``'s baseline)
and in chunks of 256 columns (the fastest dense sum), each in a fresh process; memory is the
peak above what the process held once the replies existed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from fedlowrank.aggregation import aggregate_svd, dense_weighted_sum
from fedlowrank.aggregation.ranks import Factors
from fedlowrank.aggregation.rules import get_rule


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def client(seed: int, k: int, d: int, r: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Client ``k``'s reply, generated on demand: a shared component plus its own."""
    shared = torch.Generator().manual_seed(seed)
    shared_u, shared_v = torch.randn(d, r, generator=shared), torch.randn(d, r, generator=shared)
    gen = torch.Generator().manual_seed(seed * 100003 + k + 1)
    u = ((shared_u + torch.randn(d, r, generator=gen)) / d**0.5).to(dtype)
    v = ((shared_v + torch.randn(d, r, generator=gen)) / d**0.5).to(dtype)
    s = (torch.rand(r, generator=gen) + 0.5).to(dtype)
    return u, s, v, float(torch.rand(1, generator=gen)) + 0.5


def rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM; ``ru_maxrss`` would carry the
    parent's peak across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep_child(args) -> None:
    """One measurement in this fresh process; prints JSON, saves the product's factors."""
    dtype = getattr(torch, args.dtype)
    d, k, r = args.d, args.clients, args.rank
    before = rss_mib()
    # The shared component is part of generating replies, not of aggregating them.
    start = time.perf_counter()
    if args.child == "stream":
        reference = Factors(torch.zeros(d, r, dtype=dtype), torch.ones(1, r, dtype=dtype), torch.zeros(d, r, dtype=dtype))
        acc = get_rule("exact").accumulator(reference, dtype=dtype)
        generated = 0.0
        for i in range(k):
            t0 = time.perf_counter()
            u, s, v, w = client(0, i, d, r, dtype)
            generated += time.perf_counter() - t0
            acc.add(Factors(u, s[None], v), w)  # replies at the global rank: no tail to complete
        res = acc.result(r)
        u, s, v = res.factors.u, res.factors.s[0], res.factors.v
        mode = "dense" if acc.sum.dense else "factored"
    else:
        m = torch.zeros(d, d, dtype=dtype)
        total, generated = 0.0, 0.0
        for i in range(k):
            t0 = time.perf_counter()
            cu, cs, cv, w = client(0, i, d, r, dtype)
            generated += time.perf_counter() - t0
            m += w * (cu * cs) @ cv.T
            total += w
        m /= total
        full_u, full_s, full_vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = full_u[:, :r], full_s[:r], full_vh[:r].T
        mode = "dense"
    seconds = time.perf_counter() - start - generated
    torch.save({"u": u.contiguous(), "s": s, "v": v.contiguous()}, args.out)
    print(json.dumps({"seconds": seconds, "peak_mib": rss_mib(), "start_mib": before, "mode": mode}))


def measure_in_child(args, method: str, clients: int, out: str) -> tuple[dict, dict]:
    """One measurement in a fresh process (its peak memory its own): its JSON line and saved factors."""
    command = [sys.executable, __file__, "--child", method, "--clients", str(clients), "--d", str(args.d),
               "--rank", str(args.rank), "--dtype", args.dtype, "--out", out]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)


def flat_replies(d: int, k: int, r: int) -> tuple[dict, list]:
    """The global arrays (a LoRA start) and K replies with independent random factors."""
    from fedlowrank.strategies.testing import train_reply

    gen = torch.Generator().manual_seed(7)
    start = {"fc.lora_U": torch.zeros(d, r), "fc.lora_S": torch.ones(1, r), "fc.lora_V": torch.randn(d, r, generator=gen) / d**0.5}
    replies = []
    for i in range(k):
        arrays = {"fc.lora_U": torch.randn(d, r, generator=gen) / d**0.5, "fc.lora_S": torch.rand(1, r, generator=gen) + 0.5,
                  "fc.lora_V": torch.randn(d, r, generator=gen) / d**0.5}
        replies.append(train_reply(i + 1, {n: t.numpy() for n, t in arrays.items()}, float(torch.randint(50, 150, (1,), generator=gen))))
    return {n: t.numpy() for n, t in start.items()}, replies


def flat_child(args) -> None:
    """One flat-spectrum measurement in this fresh process; prints JSON, saves the factors."""
    import numpy as np

    from fedlowrank.strategies import FedLowRank
    from fedlowrank.strategies.testing import run_round

    d, k, r = args.d, args.clients, args.rank
    start_arrays, replies = flat_replies(d, k, r)
    held = rss_mib()
    begin = time.perf_counter()
    if args.child.startswith("flat-strategy"):
        products = "float64" if args.child == "flat-strategy-float64" else "auto"
        record, _ = run_round(FedLowRank(rank=r, dense_products=products), start_arrays, replies, dtype=np.float32)
        u, s, v = (torch.from_numpy(record[f"fc.{leaf}"].numpy().astype(np.float64)) for leaf in ("lora_U", "lora_S", "lora_V"))
        s = s[0]
    else:
        m = torch.zeros(d, d, dtype=torch.float64)
        total, chunk = 0.0, []
        for msg in replies:
            arrays, w = msg.content["arrays"], float(msg.content["metrics"]["num-examples"])
            cu, cs, cv = (torch.from_numpy(arrays[f"fc.{leaf}"].numpy()).double() for leaf in ("lora_U", "lora_S", "lora_V"))
            total += w
            if args.child == "flat-dense-one":
                m.addmm_(cu * (w * cs), cv.T)
            else:
                chunk.append((cu * (w * cs), cv))
                if len(chunk) * r >= 256:
                    m.addmm_(torch.cat([a for a, _ in chunk], 1), torch.cat([b for _, b in chunk], 1).T)
                    chunk.clear()
        if chunk:
            m.addmm_(torch.cat([a for a, _ in chunk], 1), torch.cat([b for _, b in chunk], 1).T)
        m /= total
        full_u, full_s, full_vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = full_u[:, :r], full_s[:r], full_vh[:r].T
    seconds = time.perf_counter() - begin
    torch.save({"u": u.contiguous(), "s": s, "v": v.contiguous()}, args.out)
    print(json.dumps({"seconds": seconds, "peak_mib": rss_mib(), "held_mib": held}))


def run_flat(args) -> None:
    print(f"\nFlat spectrum: K = {args.clients} clients with independent random rank-{args.rank} factors, "
          f"d_out = d_in = {args.d}, replies as Flower messages (float32), {args.threads or torch.get_num_threads()} threads")
    print(f"{'method':44s} {'seconds':>9s} {'speed-up':>9s} {'MiB above replies':>18s} {'rel. error':>11s}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("flat-dense-one", "flat-dense-chunked", "flat-strategy-float64", "flat-strategy"):
            rows[method] = measure_in_child(args, method, args.clients, os.path.join(tmp, f"{method}.pt"))
    ref = rows["flat-dense-one"][1]
    best = (ref["u"] * ref["s"]) @ ref["v"].T
    labels = {"flat-dense-one": "float64 dense sum (one at a time) + full SVD",
              "flat-dense-chunked": "float64 dense sum (chunked) + full SVD",
              "flat-strategy-float64": "FedLowRank, dense_products='float64'",
              "flat-strategy": "FedLowRank (default: float32 products)"}
    for method, label in labels.items():
        info, f = rows[method]
        err = float(((f["u"] * f["s"]) @ f["v"].T - best).norm() / best.norm())
        speeds = "/".join(f"{rows[b][0]['seconds'] / info['seconds']:.1f}" for b in ("flat-dense-one", "flat-dense-chunked"))
        print(f"{label:44s} {info['seconds']:9.2f} {speeds:>9s}x {info['peak_mib'] - info['held_mib']:18.0f} {err:11.2e}", flush=True)
    print("(speed-up: against the one-at-a-time / the chunked dense baseline; error relative to the first row's rank-r product)")


def run_sweep(args) -> None:
    print(f"\nScaling in K: d_out = d_in = {args.d}, rank {args.rank}, {args.dtype}, {torch.get_num_threads()} threads;"
          " replies generated one at a time (generation time excluded)")
    print("(peak MiB is the process's peak resident memory; 'start' is the same after imports, before any reply)")
    print(f"{'K':>5s} {'method':36s} {'seconds':>9s} {'peak MiB':>9s} {'start':>6s} {'speed-up':>9s} {'rel. error':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(x) for x in args.sweep.split(",") if x]:
            rows = {}
            for method in ("dense", "stream"):  # interleaved: both for one K, then the next K
                rows[method] = measure_in_child(args, method, k, os.path.join(tmp, f"{method}-{k}.pt"))
            ref = rows["dense"][1]
            best = (ref["u"] * ref["s"]) @ ref["v"].T
            for method, label in (("dense", "dense sum + full SVD"), ("stream", "exact rule, streaming")):
                info, f = rows[method]
                err = float(((f["u"] * f["s"]) @ f["v"].T - best).norm() / best.norm())
                speed = rows["dense"][0]["seconds"] / info["seconds"]
                name = label + (f" ({info['mode']})" if method == "stream" else "")
                print(f"{k:5d} {name:36s} {info['seconds']:9.3f} {info['peak_mib']:9.0f} {info['start_mib']:6.0f} {speed:8.1f}x {err:11.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sweep", default="", help="comma-separated K values for the scaling sweep (e.g. 8,64,256,1000)")
    parser.add_argument("--only-sweep", action="store_true", help="skip the K = --clients comparison table")
    parser.add_argument("--flat", action="store_true", help="the flat-spectrum case: independent random clients through FedLowRank")
    parser.add_argument("--child", choices=["stream", "dense", "flat-strategy", "flat-strategy-float64", "flat-dense-one", "flat-dense-chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        (flat_child if args.child.startswith("flat") else sweep_child)(args)
        return
    if args.flat:
        run_flat(args)
        return
    if not args.only_sweep:
        compare(args)
    if args.sweep:
        run_sweep(args)


def compare(args) -> None:
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
