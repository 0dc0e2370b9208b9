"""Tests of the fused grouped low-rank op (fedlowrank.kernels).

Three layers of checks:

* the torch reference against an independent dense computation that forms
  ``dW_g = scale * U diag(S[g]) V^T`` explicitly (only here, never in the package);
* the Triton kernels against that same dense answer, forward and every gradient,
  run on CPU through Triton's interpreter. ``triton.jit`` reads ``TRITON_INTERPRET``
  when kernels are decorated, and setting it in the pytest process would turn other
  suites' GPU kernels into interpreted ones, so one subprocess (this file run as a
  script) runs all interpreter cases and the tests read its JSON report;
* ``SVDLinear`` gives the same output and gradients as its pre-kernel formula.

With CUDA present the kernels are also checked compiled, in process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

if __name__ == "__main__":  # interpreter worker: before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from fedlowrank.adapters import SVDLinear, group_context
from fedlowrank.kernels import ENV_VAR, kernel_backend, lowrank_delta, lowrank_linear

# Shapes deliberately not multiples of the 64-wide blocks; r = 64 needs d >= 64.
BATCH, SEQ, D_IN, D_OUT = 3, 23, 70, 81
RANKS = (4, 16, 64)
GROUPS = (1, 3)
TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def _case_inputs(groups, rank, weights_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, D_IN, generator=gen, dtype=torch.float64)
    U = torch.randn(D_OUT, rank, generator=gen, dtype=torch.float64) / rank**0.5
    V = torch.randn(D_IN, rank, generator=gen, dtype=torch.float64) / D_IN**0.5
    S = 1 + torch.rand(groups, rank, generator=gen, dtype=torch.float64)
    W0 = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) / D_IN**0.5
    b0 = torch.randn(D_OUT, generator=gen, dtype=torch.float64)
    grad = torch.randn(BATCH, SEQ, D_OUT, generator=gen, dtype=torch.float64)
    if weights_kind == "ids":
        weights = torch.tensor([2, 0, 1]) % groups
    elif weights_kind == "soft":
        weights = torch.softmax(torch.randn(BATCH, groups, generator=gen), 1).double()
    else:
        weights = None
    return x, U, S, V, W0, b0, grad, weights


def _dense_forward(x, U, S, V, W0, b0, scale, weights):
    """Independent answer: form each sample's dW and apply the full weight."""
    groups = S.shape[0]
    if weights is None:
        mix = torch.ones(x.shape[0], 1, dtype=x.dtype)
    elif weights.dtype.is_floating_point:
        mix = weights.to(x.dtype)
    else:
        mix = torch.nn.functional.one_hot(weights, groups).to(x.dtype)
    outs = []
    for i in range(x.shape[0]):
        dW = scale * U @ torch.diag(mix[i] @ S) @ V.T
        weight = dW if W0 is None else W0 + dW
        out = x[i] @ weight.T
        outs.append(out if b0 is None else out + b0)
    return torch.stack(outs)


def _forward_and_grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _rel_errors(got, want):
    return [
        float((g.cpu().double() - w).abs().max() / w.abs().max().clamp_min(1e-30))
        for g, w in zip(got, want)
    ]


def run_case(op, groups, rank, dtype_name, weights_kind, backend, device="cpu"):
    """Max relative error of (out, dx, dU, dS, dV) against the dense float64 answer."""
    x, U, S, V, W0, b0, grad, weights = _case_inputs(groups, rank, weights_kind)
    scale = 0.5
    dtype = getattr(torch, dtype_name)
    dev_weights = weights.to(device) if weights is not None else None
    if op == "linear":
        def ours(x, U, S, V):
            return lowrank_linear(
                x, W0.to(device, dtype), b0.to(device, dtype), U, S, V, scale,
                dev_weights, backend=backend,
            )
        def dense(x, U, S, V):
            return _dense_forward(x, U, S, V, W0, b0, scale, weights)
    else:
        def ours(x, U, S, V):
            return lowrank_delta(x, U, S, V, scale, dev_weights, backend=backend)
        def dense(x, U, S, V):
            return _dense_forward(x, U, S, V, None, None, scale, weights)
    tensors = [x, U, S, V]
    got = _forward_and_grads(ours, [t.to(device, dtype) for t in tensors], grad.to(device))
    # The dense answer starts from the same rounded inputs, in float64.
    want = _forward_and_grads(dense, [t.to(dtype).double() for t in tensors], grad)
    return _rel_errors(got, want)


NAMES = ("out", "dx", "dU", "dS", "dV")
INTERPRETER_CASES = [
    (op, groups, rank, dtype_name, kind)
    for op in ("delta", "linear")
    for groups in GROUPS
    for rank in RANKS
    for dtype_name in ("float32", "bfloat16")
    for kind in (("none",) if groups == 1 else ("ids", "soft"))
    # bf16 over every rank for the adapter op; the whole-layer op at r = 16 suffices.
    if not (op == "linear" and rank != 16)
]


def _case_key(case):
    return "-".join(map(str, case))


def _bad_input_launches():
    """With the Triton path forced, bad inputs raise ValueError and launch nothing."""
    from fedlowrank.kernels import triton_lowrank as tk

    launches = []
    real = tk.skinny, tk.expand
    tk.skinny = lambda *a, **k: launches.append("skinny") or real[0](*a, **k)
    tk.expand = lambda *a, **k: launches.append("expand") or real[1](*a, **k)
    x, U, S, V = torch.randn(4, 6), torch.randn(5, 3), torch.randn(2, 3), torch.randn(6, 3)
    bad = {
        "short weights": torch.full((3, 2), 0.5),
        "bool weights": torch.ones(4, 2, dtype=torch.bool),
        "id out of range": torch.tensor([0, 1, 2, 0]),
        "ids too long": torch.tensor([0, 1, 1, 0, 1]),
    }
    raised = {}
    for name, weights in bad.items():
        try:
            lowrank_delta(x, U, S, V, 1.0, weights, backend="triton")
            raised[name] = False
        except ValueError:
            raised[name] = True
    try:
        lowrank_delta(x, torch.randn(5, 7), S[:, :1].expand(2, 7), torch.randn(6, 7), 1.0,
                      torch.tensor([0, 1, 1, 0]), backend="triton")
        raised["rank too large"] = False
    except ValueError:
        raised["rank too large"] = True
    # A good call afterwards does launch (so the counter is live).
    lowrank_delta(x, U, S, V, 1.0, torch.tensor([0, 1, 1, 0]), backend="triton")
    tk.skinny, tk.expand = real
    return {"raised": raised, "launches": launches}


def _interpreter_worker():
    torch.set_num_threads(1)
    report = {"backend": kernel_backend(torch.zeros(1), "triton"), "cases": {}}
    for case in INTERPRETER_CASES:
        report["cases"][_case_key(case)] = {
            "triton": run_case(*case, backend="triton"),
            "reference": run_case(*case, backend="reference"),
        }
    report["bad_inputs"] = _bad_input_launches()
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreter_report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=_case_key)
def test_triton_interpreter_matches_dense(interpreter_report, case):
    assert interpreter_report["backend"] == "triton"
    report = interpreter_report["cases"][_case_key(case)]
    errors = dict(zip(NAMES, report["triton"]))
    tol = TOL[case[3]]
    assert all(err <= tol for err in errors.values()), errors
    # And no worse than the torch reference in the same dtype (bf16 rounds the
    # rank-r intermediates in both paths), up to a small slack.
    slack = {n: 2 * ref + tol / 10 for n, ref in zip(NAMES, report["reference"])}
    assert all(errors[n] <= slack[n] for n in NAMES), (errors, report["reference"])


def test_triton_rejects_bad_input_before_launch(interpreter_report):
    bad = interpreter_report["bad_inputs"]
    assert all(bad["raised"].values()), bad["raised"]
    # Only the final good call launched (its shrink, expand, and nothing before).
    assert bad["launches"] == ["skinny", "expand"], bad["launches"]


@pytest.mark.parametrize("backend", ("reference", "torch"))
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("rank", (4, 16))
@pytest.mark.parametrize("op", ("delta", "linear"))
def test_torch_paths_match_dense(op, groups, rank, backend):
    kinds = ("none",) if groups == 1 else ("ids", "soft")
    for kind in kinds:
        errors = dict(zip(NAMES, run_case(op, groups, rank, "float64", kind, backend)))
        assert all(err <= 1e-10 for err in errors.values()), (kind, errors)


@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_torch_paths_bf16_within_tolerance(backend):
    errors = run_case("delta", 3, 16, "bfloat16", "soft", backend)
    assert max(errors) <= TOL["bfloat16"], errors


def test_functorch_transforms_use_the_reference():
    """Per-sample gradients (Opacus' vmap path) cannot batch the custom Function."""
    x, U, S, V, _, _, _, _ = _case_inputs(3, 4, "none")
    ids = torch.tensor([2, 0, 1])
    seen = []

    def loss(U, xi, gi):
        seen.append(kernel_backend(xi))
        return lowrank_delta(xi[None], U, S, V, 0.5, gi[None]).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(U, x, ids)
    assert set(seen) == {"reference"}
    for i in range(BATCH):
        Ui = U.clone().requires_grad_(True)
        lowrank_delta(x[i : i + 1], Ui, S, V, 0.5, ids[i : i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(per_sample[i], Ui.grad)


def test_one_mix_for_every_row_and_soft_weight_gradient():
    x, U, S, V, _, _, _, _ = _case_inputs(3, 4, "none")
    mix = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    out = lowrank_delta(x, U, S, V, 1.0, mix)
    want = _dense_forward(x, U, S, V, None, None, 1.0, mix.expand(BATCH, 3))
    assert torch.allclose(out, want)
    soft = torch.softmax(torch.randn(BATCH, 3, dtype=torch.float64), 1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: lowrank_delta(x[:, :2, :5], U[:6], S, V[:5], 1.0, w), (soft,)
    )


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_backend(torch.zeros(2)) == "torch"
    assert kernel_backend(torch.zeros(2), "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel_backend(torch.zeros(2), "fast")
    with pytest.raises(ValueError, match="Triton backend needs"):
        kernel_backend(torch.zeros(2), "triton")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert kernel_backend(torch.zeros(2)) == "reference"
    if torch.cuda.is_available():
        assert kernel_backend(torch.zeros(2, device="cuda")) == "reference"
        monkeypatch.setenv(ENV_VAR, "auto")
        has_triton = importlib.util.find_spec("triton") is not None
        expected = "triton" if has_triton else "reference"
        assert kernel_backend(torch.zeros(2, device="cuda")) == expected


def test_bad_input_raises_clear_value_error():
    x, U, S, V = torch.randn(4, 6), torch.randn(5, 3), torch.randn(2, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
        lowrank_delta(x, U, S, V, 1.0, torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="dtype torch.bool"):
        lowrank_delta(x, U, S, V, 1.0, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        lowrank_delta(x, U, S, V, 1.0, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="group ids must be in 0..1"):
        lowrank_delta(x, U, S, V, 1.0, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="G = 2 groups"):
        lowrank_delta(x, U, S, V, 1.0)
    with pytest.raises(ValueError, match="min\\(d_in, d_out\\) = 5"):
        lowrank_delta(x, torch.randn(5, 7), torch.ones(7), torch.randn(6, 7), 1.0)
    with pytest.raises(ValueError, match="expects d_in = 6"):
        lowrank_delta(torch.randn(4, 5), U, S[:1], V, 1.0)
    with pytest.raises(ValueError, match="base weight must be \\(5, 6\\)"):
        lowrank_linear(x, torch.randn(6, 5), None, U, S[:1], V, 1.0)


def _pre_kernel_delta(layer, x):
    """SVDLinear.adapter_delta as it was before the kernels (plain torch)."""
    row_s = layer.row_singular_values(x.shape[0])
    row_s = row_s.reshape(x.shape[0], *([1] * (x.dim() - 2)), layer.rank)
    return ((x @ layer.lora_V) * row_s) @ layer.lora_U.T * layer.scale


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("routing", ("none", "hard", "soft"))
def test_svdlinear_unchanged(groups, routing):
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(12, 9), rank=4, groups=groups, alpha=8)
    with torch.no_grad():
        layer.lora_U.normal_()
        layer.lora_S.uniform_(0.5, 1.5)
        layer.group_share.copy_(torch.softmax(torch.randn(groups), 0))
    x = torch.randn(5, 3, 12)
    # The last row's group is unknown: it takes the group-share mix.
    ids = torch.tensor([0, 1, 2, 1, -1] if groups > 1 else [0, 0, 0, 0, -1])

    def outputs(new):
        layer.zero_grad()
        xx = x.clone().requires_grad_(True)
        own = 0.7 if routing == "soft" else 1.0
        if routing == "none":
            out = layer(xx) if new else layer.base(xx) + _pre_kernel_delta(layer, xx)
        else:
            with group_context(layer, ids, own_weight=own):
                out = layer(xx) if new else layer.base(xx) + _pre_kernel_delta(layer, xx)
        out.pow(2).sum().backward()
        factors = (layer.lora_U, layer.lora_S, layer.lora_V)
        return [out.detach(), xx.grad] + [p.grad.clone() for p in factors]

    for new, old in zip(outputs(True), outputs(False)):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype_name", ("float32", "bfloat16"))
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("op", ("delta", "linear"))
def test_triton_compiled_on_gpu(op, groups, dtype_name):
    pytest.importorskip("triton")
    kind = "none" if groups == 1 else "soft"
    for rank in RANKS:
        errors = run_case(op, groups, rank, dtype_name, kind, "triton", device="cuda")
        assert max(errors) <= TOL[dtype_name], (rank, errors)


if __name__ == "__main__":
    _interpreter_worker()
