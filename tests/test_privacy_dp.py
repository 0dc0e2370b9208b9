"""Adapter-only DP-SGD: accounting across rounds, the budget stop, noise and clipping."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")

from fedlowrank.adapters import group_context, inject_adapters  # noqa: E402
from fedlowrank.privacy import (  # noqa: E402
    calibrate_noise,
    check_budget,
    epsilon_spent,
    export_accountant_state,
    load_accountant_state,
    make_private,
    per_sample_norms,
    round_plan,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the (largest|smallest) alpha"),
]

DELTA = 1e-3
SIGMA = 1.1


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    inject_adapters(model, r"0", rank=3, groups=3, trainable=r"2\..*")
    with torch.no_grad():
        model[0].lora_U.normal_(0.0, 0.5)
    return model


def make_loader(n: int = 64, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    groups = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y, groups), batch_size=batch, shuffle=False)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_epochs(private, epochs: int) -> None:
    """The training loop a client runs (backward after the group context, as in fedlowrank.training)."""
    for _ in range(epochs):
        for x, y, g in private.data_loader:
            if len(y) == 0:  # Poisson sampling drew nobody: noise-only step
                private.empty_batch_step()
                continue
            with group_context(private.model, g):
                loss = nn.functional.cross_entropy(private.model(x), y)
            private.optimizer.zero_grad()
            loss.backward()
            private.optimizer.step()


def one_round(state, mechanism="rdp", seed=0, epochs=1):
    """One federated round: fresh model and optimizer, restored accountant."""
    model = make_model(seed)
    private = make_private(
        model,
        torch.optim.SGD(trainable(model), lr=0.1),
        make_loader(),
        max_grad_norm=1.0,
        delta=DELTA,
        noise_multiplier=SIGMA,
        accountant_state=state,
        mechanism=mechanism,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    run_epochs(private, epochs)
    eps = private.epsilon()
    state = private.export_state()
    private.close()
    return state, eps


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_grows_and_restores_like_an_uninterrupted_accountant(mechanism):
    state, epsilons = None, []
    for r in range(3):
        state, eps = one_round(state, mechanism, seed=r)
        epsilons.append(eps)
        assert epsilon_spent(state, DELTA) == pytest.approx(eps, rel=1e-12)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert state["mechanism"] == mechanism
    assert state["steps"] == [12]  # equal entries merge exactly after a restore

    _, eps_uninterrupted = one_round(None, mechanism, epochs=3)
    assert epsilons[-1] == pytest.approx(eps_uninterrupted, rel=1e-12)


def test_exported_state_is_plain_and_fits_a_config_record():
    state, eps = one_round(None)
    assert set(state) == {"mechanism", "noise_multiplier", "sample_rate", "steps"}
    assert json.loads(json.dumps(state)) == state
    flwr_app = pytest.importorskip("flwr.app")
    record = flwr_app.ConfigRecord(state)
    assert epsilon_spent(dict(record), DELTA) == pytest.approx(eps, rel=1e-12)
    # numpy columns are accepted too
    np = pytest.importorskip("numpy")
    arrays = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in state.items()}
    assert epsilon_spent(arrays, DELTA) == pytest.approx(eps, rel=1e-12)


def test_budget_check_stops_before_the_round_that_would_exceed_it():
    loader = make_loader()
    sample_rate, steps = round_plan(loader, epochs=1)
    assert (sample_rate, steps) == (0.25, 4)
    per_round = epsilon_spent(
        {"mechanism": "rdp", "noise_multiplier": [SIGMA], "sample_rate": [0.25], "steps": [4]},
        DELTA,
    )
    target = 2.5 * per_round  # composition is sub-additive: more than 2 rounds fit
    state, trained, check = None, 0, None
    for _ in range(50):
        check = check_budget(
            state, target_epsilon=target, delta=DELTA, noise_multiplier=SIGMA,
            sample_rate=sample_rate, steps=steps,
        )
        if check.stop:
            break
        state, eps = one_round(state, seed=trained)
        trained += 1
        assert eps <= target
        assert eps == pytest.approx(check.epsilon_after, rel=1e-12)
    assert check.stop and check.decision == "stop"
    assert trained >= 2
    assert check.epsilon_spent <= target < check.epsilon_after
    assert check.epsilon_spent == pytest.approx(epsilon_spent(state, DELTA), rel=1e-12)
    metrics = check.metrics()
    assert metrics["dp_stopped"] == 1 and metrics["dp_epsilon"] == check.epsilon_spent
    # Before any training nothing is spent and the first round fits.
    first = check_budget(
        None, target_epsilon=target, delta=DELTA, noise_multiplier=SIGMA,
        sample_rate=sample_rate, steps=steps,
    )
    assert not first.stop and first.epsilon_spent == 0.0


def fixed_batch_step(noise_multiplier, seed, max_grad_norm=1.0):
    """One DP step on a fixed batch (no Poisson sampling): final grads, raw per-sample grads."""
    model = make_model(0)
    loader = make_loader(n=16, batch=16)
    private = make_private(
        model, torch.optim.SGD(trainable(model), lr=0.0), loader,
        max_grad_norm=max_grad_norm, delta=DELTA, noise_multiplier=noise_multiplier,
        poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed),
    )
    x, y, g = next(iter(private.data_loader))
    with group_context(private.model, g):
        loss = nn.functional.cross_entropy(private.model(x), y)
    private.optimizer.zero_grad()
    loss.backward()
    params = trainable(model)
    samples = [p.grad_sample.detach().clone() for p in params]
    norms = per_sample_norms(params)
    private.optimizer.step()
    grads = [p.grad.detach().clone() for p in params]
    private.close()
    return grads, samples, norms


def test_noise_is_applied_and_reproducible_with_a_seed():
    clean, _, _ = fixed_batch_step(0.0, seed=0)
    noisy, _, _ = fixed_batch_step(1.0, seed=0)
    again, _, _ = fixed_batch_step(1.0, seed=0)
    other, _, _ = fixed_batch_step(1.0, seed=1)
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean, strict=True)])
    assert diff.abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(noisy, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(noisy, other, strict=True))
    # Noise std is noise_multiplier * max_grad_norm on the summed gradient (batch 16).
    assert (diff * 16).std().item() == pytest.approx(1.0, rel=0.3)


def test_clipping_bounds_each_per_sample_norm():
    c = 0.05
    grads, samples, norms = fixed_batch_step(0.0, seed=0, max_grad_norm=c)
    assert norms.shape == (16,) and bool((norms > c).all())  # every sample gets clipped
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    clipped = [s * factors.view(-1, *([1] * (s.dim() - 1))) for s in samples]
    clipped_norms = torch.stack([s.flatten(1).norm(dim=1) for s in clipped], 1).norm(dim=1)
    assert bool((clipped_norms <= c * (1 + 1e-5)).all())
    for grad, s in zip(grads, clipped, strict=True):
        torch.testing.assert_close(grad, s.sum(0) / 16, rtol=1e-5, atol=1e-7)


def test_target_epsilon_calibrates_over_the_planned_steps():
    loader = make_loader()
    sample_rate, steps = round_plan(loader, epochs=1)
    target, rounds = 3.0, 5
    sigma = calibrate_noise(target, DELTA, sample_rate, rounds * steps)
    full = {"mechanism": "rdp", "noise_multiplier": [sigma], "sample_rate": [sample_rate],
            "steps": [rounds * steps]}
    assert target - 0.02 <= epsilon_spent(full, DELTA) <= target
    # Calibrating again mid-way, with the history and the remaining steps, keeps the noise.
    spent = {**full, "steps": [2 * steps]}
    again = calibrate_noise(target, DELTA, sample_rate, (rounds - 2) * steps, state=spent)
    assert again == pytest.approx(sigma, rel=0.02)

    model = make_model()
    private = make_private(
        model, torch.optim.SGD(trainable(model), lr=0.1), loader, max_grad_norm=1.0,
        delta=DELTA, target_epsilon=target, planned_steps=rounds * steps,
    )
    assert private.noise_multiplier == pytest.approx(sigma)
    private.close()
    with pytest.raises(ValueError, match="privacy budget is spent"):
        calibrate_noise(0.5, DELTA, sample_rate, steps, state=full)


def test_live_accountant_keeps_counting_and_close_removes_hooks():
    model = make_model()
    accountant = load_accountant_state(None, "rdp")
    private = make_private(
        model, torch.optim.SGD(trainable(model), lr=0.1), make_loader(), max_grad_norm=1.0,
        delta=DELTA, noise_multiplier=SIGMA, accountant_state=accountant,
    )
    run_epochs(private, 1)
    assert private.accountant is accountant and sum(h[2] for h in accountant.history) == 4
    plain = private.close()
    assert plain is model
    model(torch.randn(3, 6)).sum().backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert not hasattr(model[0], "activations")


def test_named_errors():
    model = make_model()
    loader = make_loader()
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        make_private(model, opt, loader, max_grad_norm=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="exactly one"):
        make_private(model, opt, loader, max_grad_norm=1.0, delta=DELTA,
                     noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_private(model, opt, loader, max_grad_norm=0.0, delta=DELTA, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="delta"):
        make_private(model, opt, loader, max_grad_norm=1.0, delta=0.0, noise_multiplier=1.0)
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="frozen parameters"):
        make_private(
            model, everything, loader, max_grad_norm=1.0, delta=DELTA, noise_multiplier=1.0
        )
    with pytest.raises(ValueError, match="missing keys"):
        load_accountant_state({"mechanism": "rdp", "steps": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        load_accountant_state({"mechanism": "rdp", "noise_multiplier": [1.0],
                               "sample_rate": [0.1, 0.2], "steps": [3]})
    with pytest.raises(ValueError, match="accountant must be one of"):
        load_accountant_state(None, "moments")
    with pytest.raises(ValueError, match="out of range"):
        load_accountant_state({"mechanism": "rdp", "noise_multiplier": [1.0],
                               "sample_rate": [1.5], "steps": [3]})
    with pytest.raises(ValueError, match="target_epsilon must be positive"):
        check_budget(None, target_epsilon=0.0, delta=DELTA, noise_multiplier=1.0,
                     sample_rate=0.1, steps=3)
    acc = load_accountant_state(None, "prv")
    assert export_accountant_state(acc) == {
        "mechanism": "prv", "noise_multiplier": [], "sample_rate": [], "steps": []
    }


@pytest.mark.parametrize(
    "history",
    [[(1.1, 0.25, 4)], [(1.1, 0.25, 4), (0.8, 0.1, 7), (1.1, 0.25, 3)]],
)
def test_epsilon_equals_opacus_rdp_accountant(history):
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = list(history)
    state = {
        "mechanism": "rdp",
        "noise_multiplier": [h[0] for h in history],
        "sample_rate": [h[1] for h in history],
        "steps": [h[2] for h in history],
    }
    assert epsilon_spent(state, DELTA) == reference.get_epsilon(DELTA)
    assert epsilon_spent(reference, DELTA) == reference.get_epsilon(DELTA)


def test_empty_poisson_batches_take_a_noise_only_accounted_step():
    # 8 examples at sample rate 1/8: about a third of the batches are empty.
    torch.manual_seed(3)
    x = torch.randn(8, 6)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long(), torch.randint(0, 3, (8,))))
    model = make_model()
    private = make_private(
        model, torch.optim.SGD(trainable(model), lr=0.1), loader, max_grad_norm=1.0,
        delta=DELTA, noise_multiplier=1.0,
    )
    sizes = [len(b[0]) for _ in range(3) for b in private.data_loader]
    assert 0 in sizes
    before = model[0].lora_S.detach().clone()
    private.empty_batch_step()
    assert not torch.equal(before, model[0].lora_S)  # the noise moved the parameters
    run_epochs(private, 3)
    assert sum(h[2] for h in private.accountant.history) == 1 + 3 * 8
    private.close()
