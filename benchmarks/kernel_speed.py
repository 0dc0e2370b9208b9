"""Benchmark the fused grouped low-rank op against PEFT LoRA and dense fine-tuning.

One run measures, on the same shapes, forward + backward time and peak memory of:

* ``ours``       - :func:`fedlowrank.kernels.lowrank_linear` / ``lowrank_delta``, G = 1
  (Triton kernels on CUDA, the same Function with torch primitives on CPU), and
  the same with G = 3;
* ``reference``  - our plain-autograd torch reference path forced, G = 3;
* ``peft``       - PEFT's LoRA ``Linear`` (through ``get_peft_model`` on a one-layer
  model), G = 1;
* ``dense``      - the same ``nn.Linear`` fully trainable (full fine-tuning);
* ``frozen base``- the frozen ``nn.Linear`` alone (its input gradient only), to show
  what the adapter adds on top of it.

Each is timed as the whole layer and, where it has one, as the adapter path alone
(everything but the frozen base matmul). Ratios are baseline time (or memory) over
ours, from the same run: above 1 means ours is faster (or smaller). Adam optimizer
state of adapter training vs full fine-tuning is measured after one real step.

Usage::

    python benchmarks/kernel_speed.py                     # CPU defaults, about a minute
    python benchmarks/kernel_speed.py --device cuda --tokens 8192 --d 4096 --rank 16 --dtype bf16

Nothing here asserts on time; the numbers are for reading.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fedlowrank.kernels import kernel_backend, lowrank_delta, lowrank_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """One thing to time: a step producing an output, its trainable tensors, its inputs."""

    name: str
    path: str
    step: Callable[[], torch.Tensor]
    trainable: list[torch.Tensor]
    external: list[torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(case: Case, grad: torch.Tensor) -> None:
    case.step().backward(grad)
    for t in case.trainable:
        t.grad = None


def time_cases(cases: list[Case], grad: torch.Tensor, device, warmup: int, iters: int):
    """Median forward + backward wall time (ms) of each case.

    Cases run round-robin, one iteration each per round, so a burst of load from
    other processes on a shared machine hits every case alike.
    """
    for case in cases:
        for _ in range(warmup):
            _run_once(case, grad)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(iters):
        for case in cases:
            _sync(device)
            start = time.perf_counter()
            _run_once(case, grad)
            _sync(device)
            times[case.name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


class _LiveTensorBytes(TorchDispatchMode):
    """Track live tensor storage bytes created inside the mode, and their peak.

    Each op's new outputs are recorded by storage (views and in-place results of
    existing tensors count nothing); storages are dropped when their weak reference
    expires. Autograd carries
    the mode into the backward pass, so gradients and saved tensors count too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        # Views and in-place results alias an input's storage: no new memory.
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(case: Case, grad: torch.Tensor, device) -> float:
    """Peak memory (MiB) one forward + backward allocates above what existed before.

    CUDA: the caching allocator's peak. CPU: peak live tensor bytes seen by a
    dispatch mode (allocator-independent, so it leaves out BLAS workspaces and malloc
    slack). Both include the gradients produced.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _run_once(case, grad)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    tracker = _LiveTensorBytes()
    with tracker:
        _run_once(case, grad)
    return tracker.peak / 2**20


def adam_state_mib(params: list[nn.Parameter]) -> float:
    """Bytes Adam keeps for these parameters after one step (exp_avg, exp_avg_sq, step)."""
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    total = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    for p in params:
        p.grad = None
    return total / 2**20


def build_cases(args, device, dtype):
    tokens, d, rank, groups = args.tokens, args.d, args.rank, args.groups
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    base = nn.Linear(d, d).to(device, dtype)
    base.requires_grad_(False)
    W0, b0 = base.weight, base.bias
    x = rand(tokens, d).requires_grad_(True)
    scale = 1.0

    def factors(g):
        U = nn.Parameter(rand(d, rank, std=0.02))
        V = nn.Parameter(rand(d, rank, std=d**-0.5))
        S = nn.Parameter(torch.ones(g, rank, device=device, dtype=dtype))
        return U, S, V

    ids = torch.arange(tokens, device=device) % groups
    cases = []
    U1, S1, V1 = factors(1)
    Ug, Sg, Vg = factors(groups)
    ours = kernel_backend(x)
    adapter1 = [U1, S1, V1]
    adapterg = [Ug, Sg, Vg]
    ext = [x, W0, b0]
    cases += [
        Case("ours G=1", ours, lambda: lowrank_linear(x, W0, b0, U1, S1, V1, scale),
             adapter1 + [x], ext),
        Case(f"ours G={groups}", ours,
             lambda: lowrank_linear(x, W0, b0, Ug, Sg, Vg, scale, ids), adapterg + [x], ext),
        Case(f"reference G={groups}", "reference",
             lambda: lowrank_linear(x, W0, b0, Ug, Sg, Vg, scale, ids, backend="reference"),
             adapterg + [x], ext),
    ]
    adapter_cases = [
        Case("ours G=1", ours, lambda: lowrank_delta(x, U1, S1, V1, scale), adapter1 + [x], [x]),
        Case(f"ours G={groups}", ours, lambda: lowrank_delta(x, Ug, Sg, Vg, scale, ids),
             adapterg + [x], [x]),
        Case(f"reference G={groups}", "reference",
             lambda: lowrank_delta(x, Ug, Sg, Vg, scale, ids, backend="reference"),
             adapterg + [x], [x]),
    ]

    peft_params = []
    try:
        from peft import LoraConfig, get_peft_model

        model = nn.Sequential(nn.Linear(d, d)).to(device, dtype)
        model[0].load_state_dict(base.state_dict())
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["0"])
        peft_layer = get_peft_model(model, config).base_model.model[0]
        peft_params = [p for p in peft_layer.parameters() if p.requires_grad]
        lora_A, lora_B = peft_layer.lora_A["default"], peft_layer.lora_B["default"]
        drop, scaling = peft_layer.lora_dropout["default"], peft_layer.scaling["default"]
        cases.append(Case("peft LoRA G=1", "peft", lambda: peft_layer(x),
                          peft_params + [x], [x, *peft_layer.base_layer.parameters()]))
        # PEFT's own adapter expression from its Linear.forward.
        adapter_cases.append(Case("peft LoRA G=1", "peft",
                                  lambda: lora_B(lora_A(drop(x))) * scaling,
                                  peft_params + [x], [x]))
    except ImportError:
        print("peft not importable: PEFT rows skipped")

    dense = nn.Linear(d, d).to(device, dtype)
    dense.load_state_dict(base.state_dict())
    cases.append(Case("dense fine-tune", "torch", lambda: dense(x),
                      list(dense.parameters()) + [x], [x]))
    cases.append(Case("frozen base only", "torch", lambda: base(x), [x], ext))
    opt_mem = {
        "adapter (ours, G=1)": adam_state_mib(adapter1),
        f"adapter (ours, G={groups})": adam_state_mib(adapterg),
        "full fine-tune": adam_state_mib(list(dense.parameters())),
    }
    if peft_params:
        opt_mem["adapter (peft)"] = adam_state_mib(peft_params)
    return cases, adapter_cases, opt_mem


def _table(title, rows, ours_name, baselines):
    print(f"\n{title}")
    print(f"{'case':<22}{'path':<11}{'fwd+bwd ms':>11}{'peak MiB':>10}")
    for name, path, ms, mib in rows:
        print(f"{name:<22}{path:<11}{ms:>11.2f}{mib:>10.1f}")
    by_name = {r[0]: r for r in rows}
    ours = by_name[ours_name]
    for base_name in baselines:
        if base_name in by_name:
            b = by_name[base_name]
            print(f"  {base_name} / {ours_name}: time x{b[2] / ours[2]:.2f}, "
                  f"peak memory x{b[3] / max(ours[3], 1e-9):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier "
                             "on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available")

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"tokens {args.tokens}, d_in = d_out = {args.d}, rank {args.rank}, "
          f"groups {args.groups}, dtype {args.dtype}, median of {args.iters}")
    cases, adapter_cases, opt_mem = build_cases(args, device, dtype)
    grad = torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(1))
    grad = grad.to(device, dtype)

    def measure(case_list):
        ms = time_cases(case_list, grad, device, args.warmup, args.iters)
        return [(c.name, c.path, ms[c.name], peak_memory(c, grad, device)) for c in case_list]

    layer_rows = measure(cases)
    adapter_rows = measure(adapter_cases)
    groups = f"G={args.groups}"
    _table("Whole layer (frozen base + adapter; dense = full weight trainable)", layer_rows,
           "ours G=1", ["peft LoRA G=1", "dense fine-tune", f"reference {groups}"])
    base_ms = next(r[2] for r in layer_rows if r[0] == "frozen base only")
    print("  adapter share of the layer (layer - frozen base), ms: " + ", ".join(
        f"{r[0]} {r[2] - base_ms:.2f}" for r in layer_rows
        if r[0] not in ("frozen base only", "dense fine-tune")))
    _table("Adapter path alone (all but the frozen base matmul)", adapter_rows,
           "ours G=1", ["peft LoRA G=1", f"reference {groups}"])
    print("\nAdam optimizer state, MiB")
    for name, mib in opt_mem.items():
        print(f"  {name:<24}{mib:>10.3f}")
    full = opt_mem["full fine-tune"]
    print(f"  full fine-tune / adapter (ours, G=1): x{full / opt_mem['adapter (ours, G=1)']:.0f}")
    print("\nNotes")
    print(f"  'ours' ran the {kernel_backend(grad)} path on {device}.")
    if device.type != "cuda":
        print("  No GPU in this run: the Triton kernels were not timed. CPU 'ours' is the "
              "same fused autograd Function with torch (BLAS) primitives; 'reference' is "
              "plain torch autograd. GPU numbers need --device cuda on a CUDA machine.")
        print("  CPU peak memory is peak live tensor bytes allocated during fwd+bwd "
              "(dispatch-mode count), not RSS.")
    print("  Ratios are baseline / ours from this run; > 1 means ours is faster or smaller."
          " Timings on a shared machine are noisy.")


if __name__ == "__main__":
    main()
