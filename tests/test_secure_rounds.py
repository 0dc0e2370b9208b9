"""Secure rounds through real Flower messages: SecureLowRank and the client mod against plain FedLowRank and FairLoRA,
over several rounds at mixed ranks, with a node failing mid-round, and what each side refuses."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.aggregation.ranks import Factors, split_at_rank
from fedlowrank.clients.secure import make_secure_mod
from fedlowrank.strategies import FairLoRA, FedLowRank
from fedlowrank.strategies.checkpoint import run
from fedlowrank.strategies.secure import SecureLowRank
from fedlowrank.strategies.testing import InProcessGrid

D_OUT, D_IN, R = 12, 9, 4
RANKS = (1, 2, 4, 2, 3)
SIZES = (40, 25, 60, 35, 50)


def initial(groups=1, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        "fc.lora_U": Array(rng.normal(size=(D_OUT, R))), "fc.lora_S": Array(np.ones((groups, R))),
        "fc.lora_V": Array(rng.normal(size=(D_IN, R))), "head.bias": Array(np.zeros(3)),
    })


def client_app(fail_node=None, fail_round=None, groups=1, outer_mods=()):
    """Each node loads its best rank-r part of the global, moves it by a change of its own, replies."""
    app = ClientApp(mods=[*outer_mods, make_secure_mod(lambda context: RANKS[int(context.node_config["partition-id"])])])

    @app.train()
    def train(msg: Message, context) -> Message:
        site = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        # The protocol's secrets are out of Context.state while the ClientApp runs (it may write state to disk).
        assert "secure-state" not in context.state.config_records
        if context.node_id == fail_node and server_round == fail_round:
            raise RuntimeError("site crashed while training")
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        rank = RANKS[site]
        head, _ = split_at_rank(Factors(*(torch.as_tensor(arrays[f"fc.lora_{x}"]) for x in "USV")), rank)
        rng = np.random.default_rng([site, server_round])
        # A change that commutes with the factors' gauge (signs, order of columns), as training does: the
        # aggregate is the same product whichever factors carry it.
        mix = 0.3 * rng.normal(size=(D_OUT, D_IN)) / np.sqrt(D_IN)
        u, s, v = head.u.numpy(), head.s.numpy(), head.v.numpy()
        u, v = u + mix @ v, v + mix.T @ u
        if groups > 1:
            s = s * (1.0 + 0.1 * (site + 1) * np.arange(1, groups + 1)[:, None] / len(RANKS))
        reply = {"fc.lora_U": u, "fc.lora_S": s, "fc.lora_V": v, "head.bias": arrays["head.bias"] + rng.normal(size=3)}
        metrics = {"num-examples": SIZES[site], "train-loss": 1.0 + site, "dp_epsilon": 0.5 + site / 10}
        if groups > 1:
            counts = rng.integers(5, 20, size=groups)
            metrics.update({f"group-count-g{g}": int(c) for g, c in enumerate(counts)})
            metrics["num-examples"] = int(counts.sum())
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(x)) for k, x in reply.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def product(arrays, g=0):
    a = {k: v.numpy() for k, v in arrays.items()}
    return (a["fc.lora_U"] * a["fc.lora_S"][g]) @ a["fc.lora_V"].T


def federate(strategy, app, rounds=3, groups=1):
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(len(RANKS))], {})
    return run(strategy, grid, initial(groups), num_rounds=rounds, timeout=60)


def plain_and_secure(make, app_factory, rounds=3, groups=1, **secure):
    plain = federate(make(), app_factory(), rounds, groups)
    wrapped = SecureLowRank(make(), **secure)
    got = federate(wrapped, app_factory(), rounds, groups)
    return plain, got


@pytest.mark.parametrize("options", [{}, {"server_learning_rate": 0.7, "momentum": 0.5}])
def test_secure_rounds_equal_plain_fedlowrank_at_mixed_ranks(options):
    def make():
        return FedLowRank(rank=R, share_cap=None, align=False, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5, **options)

    plain, secure = plain_and_secure(make, client_app)
    for rnd in (1, 2, 3):
        train = secure.train_metrics_clientapp[rnd]
        assert train["agg-clients-kept"] == 5 and train["agg-sketch-error-rel"] < 1e-6 and train["secure-clipped"] == 0
        assert abs(train["train-loss"] - plain.train_metrics_clientapp[rnd]["train-loss"]) < 1e-6
    p, s = product(plain.arrays), product(secure.arrays)
    assert np.linalg.norm(s - p) <= 1e-6 * np.linalg.norm(p)
    assert np.allclose(secure.arrays["head.bias"].numpy(), plain.arrays["head.bias"].numpy(), atol=1e-6)


def test_secure_fairlora_rounds_equal_plain_fairlora():
    def make():
        return FairLoRA(rank=R, share_cap=None, align=False, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5)

    plain, secure = plain_and_secure(make, lambda: client_app(groups=2), rounds=2, groups=2)
    for g in (0, 1):
        p, s = product(plain.arrays, g), product(secure.arrays, g)
        assert np.linalg.norm(s - p) <= 1e-6 * np.linalg.norm(p)


def test_a_node_failing_in_training_is_left_out_as_a_plain_round_leaves_it_out(caplog):
    def make():
        return FedLowRank(rank=R, share_cap=None, align=False, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5)

    with caplog.at_level(logging.WARNING):
        plain, secure = plain_and_secure(make, lambda: client_app(fail_node=3, fail_round=2))
    assert secure.train_metrics_clientapp[2]["agg-clients-kept"] == 4
    assert secure.train_metrics_clientapp[2]["agg-clients-dropped"] == 1
    assert "node 3 failed to train" in caplog.text
    p, s = product(plain.arrays), product(secure.arrays)
    assert np.linalg.norm(s - p) <= 1e-6 * np.linalg.norm(p)


def test_secure_wrapper_refuses_per_reply_bounds_and_factor_averaging():
    cannot_act = "share_cap, node_max_weights and robust cannot act"
    with pytest.raises(ValueError, match=cannot_act):
        SecureLowRank(FedLowRank(rank=R))
    with pytest.raises(ValueError, match=cannot_act):
        SecureLowRank(FedLowRank(rank=R, share_cap=None, robust="clip"))
    with pytest.raises(ValueError, match=cannot_act):
        SecureLowRank(FedLowRank(rank=R, share_cap=None, node_max_weights={1: 100.0}))
    with pytest.raises(RuntimeError, match="train_round"):
        SecureLowRank(FedLowRank(rank=R, share_cap=None)).configure_train(1, initial(), None, None)


class WatchingGrid(InProcessGrid):
    """Keeps every reply the server receives, to check what left the sites in the clear."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.seen += replies
        return replies


def test_sites_send_no_weight_loss_or_factors_in_the_clear_and_privacy_metrics_reach_the_round():
    strategy = SecureLowRank(FedLowRank(rank=R, share_cap=None, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5))
    grid = WatchingGrid(client_app(), [{"partition-id": i} for i in range(len(RANKS))], {})
    result = run(strategy, grid, initial(), num_rounds=1, timeout=60)
    assert result.train_metrics_clientapp[1]["dp_epsilon"] == pytest.approx(0.9)  # the worst site's, as in plain runs
    for reply in grid.seen:
        assert "arrays" not in reply.content  # factors only ever masked
        for record in reply.content.metric_records.values():
            assert set(record) <= {"dp_epsilon"}, dict(record)
        for name, record in reply.content.array_records.items():
            assert name == "secure-masked" and all(a.dtype == "uint64" for a in record.values())


def tampering_app(tamper):
    """The honest client app with one more mod outside the secure one: ``tamper(stage, node, reply)`` may rewrite
    what a site sends (a dishonest site)."""

    def outer(msg, context, call_next):
        reply = call_next(msg, context)
        if "secure" in msg.content.config_records and not reply.has_error():
            tamper(str(msg.content.config_records["secure"]["stage"]), context.node_id, reply)
        return reply

    return client_app(outer_mods=[outer])


def forged_npy(shape):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u8", "fortran_order": False, "shape": shape})
    return Array(dtype="uint64", shape=tuple(shape), stype="numpy.ndarray", data=buf.getvalue())


def secure_run(app, rounds=2):
    strategy = SecureLowRank(FedLowRank(rank=R, share_cap=None, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5))
    return federate(strategy, app, rounds)


def test_a_site_forging_its_weight_fails_that_round_only_and_the_global_survives(caplog):
    rounds_seen = []

    def tamper(stage, node, reply):
        if stage == "corange" and node == 2 and not rounds_seen:
            rounds_seen.append(1)
            masked = reply.content["secure-masked"]
            slots = masked["v2"].numpy().copy()
            slots[0] -= np.uint64(2**61)  # a total weight far below zero
            masked["v2"] = Array(slots)

    with caplog.at_level(logging.WARNING):
        result = secure_run(tampering_app(tamper))
    assert "summed weight" in caplog.text and "the global model is kept" in caplog.text
    assert 1 not in result.train_metrics_clientapp and result.train_metrics_clientapp[2]["agg-clients-kept"] == 5


@pytest.mark.parametrize("forgery", ["huge header", "config record", "wrong dtype"])
def test_a_malformed_masked_reply_drops_that_site_and_the_round_goes_on(forgery, caplog):
    def tamper(stage, node, reply):
        if stage == "range" and node == 4:
            masked = reply.content["secure-masked"]
            if forgery == "huge header":
                masked["v0"] = forged_npy((2**37,))
            elif forgery == "wrong dtype":
                masked["v0"] = Array(masked["v0"].numpy().astype(np.float64))
            else:
                del reply.content["secure-masked"]
                reply.content["secure-masked"] = __import__("flwr").app.ConfigRecord({"v0": 1})

    with caplog.at_level(logging.WARNING):
        result = secure_run(tampering_app(tamper), rounds=1)
    assert "dropping node 4 from the secure sum 'range'" in caplog.text
    assert result.train_metrics_clientapp[1]["agg-clients-kept"] == 4


def test_bad_unmasking_shares_from_one_site_cost_a_subset_not_the_round():
    def tamper(stage, node, reply):
        if stage == "unmask-range" and node == 1:
            record = reply.content["secure"]
            for key in list(record):
                record[key] = b"\x01\x00\x00\x00" + b"\x00" * 16  # a well-formed share of nothing
    result = secure_run(tampering_app(tamper), rounds=1)
    assert result.train_metrics_clientapp[1]["agg-clients-kept"] == 5


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round():
    app = client_app()
    grid = InProcessGrid(app, [{"partition-id": i, "secure-required": True} for i in range(len(RANKS))], {})
    strategy = FedLowRank(rank=R, share_cap=None, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5)
    with pytest.raises(Exception, match="requires secure aggregation|no round kept"):
        run(strategy, grid, initial(), num_rounds=1, timeout=60)
