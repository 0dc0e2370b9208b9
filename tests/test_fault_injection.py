"""One bad reply beside good ones, for every strategy and wrapper: the round finishes, the
global is finite and equals the aggregate of the good replies, and the node is named."""

import io
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedlowrank.clients.compression import compress_arrays
from fedlowrank.compression import PAYLOAD_KEY, SPEC_KEY
from fedlowrank.strategies import FairLoRA, FedLowRank, LGreCo
from fedlowrank.aggregation.round import ServerRound
from fedlowrank.strategies.testing import NodeGrid, array_record

D_OUT, D_IN, R, G = 10, 8, 3, 2
BAD_NODE = 66
KINDS = ["fedlowrank", "fairlora-exact", "fairlora-paper", "lgreco-fedlowrank", "lgreco-fairlora"]


pytestmark = pytest.mark.usefixtures("task_identity")


GRID = NodeGrid([1, 2, 3, BAD_NODE])


def grouped(kind):
    return "fairlora" in kind


INNER = {
    "fedlowrank": lambda **kw: FedLowRank(**kw),
    "fairlora-exact": lambda **kw: FairLoRA(mode="exact", **kw),
    "fairlora-paper": lambda **kw: FairLoRA(mode="paper", **kw),
}
WRAPPED = {"lgreco-fedlowrank": "fedlowrank", "lgreco-fairlora": "fairlora-exact"}


def make_strategy(kind, **kw):
    if kind in WRAPPED:  # a fixed uniform setting: no tables, the same wire format
        return LGreCo(INNER[WRAPPED[kind]](**kw), candidates=["sq:4"], default="sq:4", warmup_rounds=10**9)
    return INNER[kind](**kw)


def global_arrays(kind):
    rng = np.random.default_rng(0)
    return {
        "fc.lora_U": rng.normal(size=(D_OUT, R)).astype(np.float32),
        "fc.lora_S": np.ones((G if grouped(kind) else 1, R), dtype=np.float32),
        "fc.lora_V": rng.normal(size=(D_IN, R)).astype(np.float32),
        "head.weight": rng.normal(size=(1, D_OUT)).astype(np.float32),
    }


def metadata(node):
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"i{node}",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")


def local_arrays(kind, node):
    rng = np.random.default_rng(node)
    return {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_arrays(kind).items()}


def good_reply(kind, node, config, arrays=None, **metrics):
    arrays = local_arrays(kind, node) if arrays is None else arrays
    if kind.startswith("lgreco-"):
        out = compress_arrays(config, global_arrays(kind), arrays, RecordDict(), seed=node)
        arrays = out[0]
    counts = {f"group-count-g{g}": 10.0 * (node + g) for g in range(G)} if grouped(kind) else {}
    weight = sum(counts.values()) if counts else 20.0 * node
    record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": weight, "train-loss": 0.5, **counts, **metrics})})
    return Message(content=content, metadata=metadata(node))


def configure(strategy, kind):
    messages = list(strategy.configure_train(1, array_record(global_arrays(kind)), ConfigRecord(), GRID))
    return messages[0].content["config"]


def npy_bytes(value):
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def huge_header(shape=(2**20, 2**20), dtype="<f4"):
    """A valid .npy header declaring a terabyte, with almost no data behind it."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 16


def with_array(reply, key, array):
    record = reply.content["arrays"]
    record[key] = array
    return reply


def raw(dtype, shape, data):
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def first_key(reply):
    return next(iter(reply.content["arrays"].keys()))


# Each fault: (name, how to spoil a good reply of `kind`, where it applies)
FAULTS = {
    "str dtype": lambda r, k: with_array(r, first_key(r), Array(np.array(["a", "b"]))),
    "structured dtype": lambda r, k: with_array(r, first_key(r), Array(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]))),
    "void dtype": lambda r, k: with_array(r, first_key(r), Array(np.zeros(3, dtype="V4"))),
    "raw bf16 bytes": lambda r, k: with_array(r, first_key(r), raw("bfloat16", (3,), b"\x01\x02" * 3)),
    "npz data": lambda r, k: with_array(r, first_key(r), raw("float32", (3,), (lambda b: (np.savez(b, a=np.ones(3)), b.getvalue())[1])(io.BytesIO()))),
    "1 TiB header": lambda r, k: with_array(r, first_key(r), raw("float32", (2**20, 2**20), huge_header())),
    "object header": lambda r, k: with_array(r, first_key(r), raw("object", (3,), huge_header((3,), "|O"))),
    "non-npy stype": lambda r, k: with_array(r, first_key(r), Array(dtype="float32", shape=(3,), stype="torch.tensor", data=b"\0" * 12)),
    "NaN values": lambda r, k: with_array(r, first_key(r), Array(np.full((3,), np.nan, dtype=np.float32))),
    "missing key": lambda r, k: (r.content["arrays"].pop(first_key(r)), r)[1],
    "extra key": lambda r, k: with_array(r, "intruder", Array(np.ones(3, dtype=np.float32))),
    "two ArrayRecords": lambda r, k: (r.content.__setitem__("more", ArrayRecord({"x": Array(np.ones(2))})), r)[1],
    "two MetricRecords": lambda r, k: (r.content.__setitem__("m2", MetricRecord({"a": 1.0})), r)[1],
    "no MetricRecord": lambda r, k: Message(content=RecordDict({"arrays": r.content["arrays"]}), metadata=metadata(BAD_NODE)),
    "weight 1e30": lambda r, k: (r.content["metrics"].__setitem__("num-examples", 1e30), r)[1],
    "weight 1e308": lambda r, k: (r.content["metrics"].__setitem__("num-examples", 1e308), r)[1],
    "weight NaN": lambda r, k: (r.content["metrics"].__setitem__("num-examples", float("nan")), r)[1],
    "weight negative": lambda r, k: (r.content["metrics"].__setitem__("num-examples", -5.0), r)[1],
    "weight as list": lambda r, k: (r.content["metrics"].__setitem__("num-examples", [1.0, 2.0]), r)[1],
    "error message": lambda r, k: _make_error(),
    "1e5 metric keys": lambda r, k: (r.content["metrics"].update({f"m{i}": 1.0 for i in range(100_000)}), r)[1],
    "1e5-key ConfigRecord": lambda r, k: (r.content.__setitem__("extra", ConfigRecord({f"c{i}": 1 for i in range(100_000)})), r)[1],
    "2 MiB ConfigRecord": lambda r, k: (r.content.__setitem__("extra", ConfigRecord({"blob": b"\0" * (2 << 20)})), r)[1],
}
GROUP_FAULTS = {
    "group count 1e30": lambda r, k: (r.content["metrics"].__setitem__("group-count-g0", 1e30), r)[1],
    "counts above num-examples": lambda r, k: (r.content["metrics"].__setitem__("group-count-g0", 1e6), r)[1],
    "missing group count": lambda r, k: (r.content["metrics"].pop("group-count-g1"), r)[1],
}
PLAIN_FAULTS = {  # arrays the server reads directly (no L-GreCo encoding in between)
    "rank 40000": lambda r, k: _rank(r, 40000),
    "rank above global": lambda r, k: _rank(r, R + 1),
    "wrong rows": lambda r, k: with_array(r, "fc.lora_U", Array(np.ones((D_OUT + 1, R), dtype=np.float32))),
    "int64 factor": lambda r, k: with_array(r, "fc.lora_U", Array(np.ones((D_OUT, R), dtype=np.int64))),
    "bool factor": lambda r, k: with_array(r, "fc.lora_U", Array(np.ones((D_OUT, R), dtype=bool))),
    "factors x 1e15": lambda r, k: with_array(r, "fc.lora_U", Array(r.content["arrays"]["fc.lora_U"].numpy() * np.float32(1e15))),
}
LGRECO_FAULTS = {
    "bucket 2**27": lambda r, k: _spec(r, lambda line: line + b"bucket_size=134217728" if line.endswith(b"|") else line),
    "bucket 2**37": lambda r, k: _spec(r, lambda line: line + b"bucket_size=137438953472" if line.endswith(b"|") else line),
    "spec shape lie": lambda r, k: _spec(r, lambda line: line.replace(f"|{D_OUT},{R}|".encode(), b"|1000000,1000000|")),
    "payload truncated": lambda r, k: with_array(r, PAYLOAD_KEY, Array(r.content["arrays"][PAYLOAD_KEY].numpy()[:5].copy())),
}


def _make_error():
    return Message(error=Error(code=1, reason="client crashed"), metadata=metadata(BAD_NODE))


def _rank(reply, rank):
    rng = np.random.default_rng(5)
    record = reply.content["arrays"]
    rows = {"fc.lora_U": D_OUT, "fc.lora_V": D_IN, "fc.lora_S": record["fc.lora_S"].shape[0]}
    for key, n in rows.items():
        record[key] = Array(rng.normal(size=(n, rank)).astype(np.float32))
    return reply


def _spec(reply, edit):
    lines = reply.content["arrays"][SPEC_KEY].numpy().tobytes().split(b"\n")
    spec = b"\n".join(edit(line) for line in lines)
    return with_array(reply, SPEC_KEY, Array(np.frombuffer(spec, dtype=np.uint8).copy()))


def cases():
    for kind in KINDS:
        faults = dict(FAULTS)
        if grouped(kind):
            faults.update(GROUP_FAULTS)
        faults.update(LGRECO_FAULTS if kind.startswith("lgreco-") else PLAIN_FAULTS)
        for name in faults:
            yield pytest.param(kind, name, faults[name], id=f"{kind}-{name}")


def aggregate(kind, replies_fn):
    strategy = make_strategy(kind)
    config = configure(strategy, kind)
    return strategy.aggregate_train(1, replies_fn(config))


@pytest.mark.parametrize("kind,name,spoil", list(cases()))
def test_a_bad_reply_is_dropped_by_name_and_the_round_equals_the_good_ones(kind, name, spoil, caplog):
    with caplog.at_level(logging.WARNING):
        arrays, metrics = aggregate(kind, lambda config: [
            good_reply(kind, 1, config), spoil(good_reply(kind, BAD_NODE, config), kind), good_reply(kind, 2, config)
        ])
    assert arrays is not None, name
    want, _ = aggregate(kind, lambda config: [good_reply(kind, 1, config), good_reply(kind, 2, config)])
    for key in want.keys():
        got = arrays[key].numpy()
        assert np.all(np.isfinite(got)), key
        np.testing.assert_allclose(got, want[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")
    assert f"node {BAD_NODE}" in caplog.text, caplog.text[-2000:]
    dropped = metrics.get("agg-clients-dropped", 0) + metrics.get("lgreco-dropped", 0)
    assert dropped >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_declared_shape_is_refused_without_allocating_it(kind):
    """A header declaring 2 GiB (allocatable, so a reader that trusts it would take it)."""
    import tracemalloc

    def replies(config):
        bad = with_array(good_reply(kind, BAD_NODE, config), first_key(good_reply(kind, BAD_NODE, config)),
                         raw("float32", (2**29,), huge_header((2**29,))))
        return [good_reply(kind, 1, config), bad, good_reply(kind, 2, config)]

    tracemalloc.start()
    try:
        arrays, _ = aggregate(kind, replies)
        _, peak = tracemalloc.get_traced_memory()  # numpy reports its buffers to tracemalloc
    finally:
        tracemalloc.stop()
    assert arrays is not None
    assert peak < 50 * 2**20, peak


def test_a_bad_metric_is_left_out_with_the_node_named_and_the_round_goes_on(caplog):
    with caplog.at_level(logging.WARNING):
        arrays, metrics = aggregate("fedlowrank", lambda config: [
            good_reply("fedlowrank", 1, config), good_reply("fedlowrank", BAD_NODE, config, **{"train-loss": [1.0, 2.0]}),
            good_reply("fedlowrank", 2, config),
        ])
    assert arrays is not None and metrics["agg-clients-dropped"] == 0
    assert "train-loss" in metrics and np.isfinite(metrics["train-loss"])
    assert f"node {BAD_NODE}" in caplog.text and "train-loss" in caplog.text


def evaluate_reply(node, **metrics):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10.0, "eval-auc": 0.7, **metrics})})
    return Message(content=content, metadata=metadata(node))


@pytest.mark.parametrize("name,bad", [
    ("missing num-examples", lambda: Message(content=RecordDict({"metrics": MetricRecord({"eval-auc": 0.1})}), metadata=metadata(BAD_NODE))),
    ("two MetricRecords", lambda: (lambda m: (m.content.__setitem__("m2", MetricRecord({"x": 1.0})), m)[1])(evaluate_reply(BAD_NODE))),
    ("NaN metric", lambda: evaluate_reply(BAD_NODE, **{"eval-auc": float("nan")})),
    ("list where others have a number", lambda: evaluate_reply(BAD_NODE, **{"eval-auc": [0.1, 0.2]})),
    ("extra key", lambda: evaluate_reply(BAD_NODE, **{"eval-extra": 3.0})),
    ("error message", _make_error),
    ("1e5 metric keys", lambda: evaluate_reply(BAD_NODE, **{f"eval-m{i}": 1.0 for i in range(100_000)})),
    ("eval-n above its examples", lambda: evaluate_reply(BAD_NODE, **{"eval-n": 1e9})),
])
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_evaluate_reply_cannot_crash_aggregate_evaluate(kind, name, bad, caplog):
    strategy = make_strategy(kind)
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, [evaluate_reply(1), bad(), evaluate_reply(2)])
    assert metrics is not None and metrics["eval-auc"] == pytest.approx(0.7)
    if name != "extra key":  # an extra metric is no fault: it is averaged where present
        assert f"node {BAD_NODE}" in caplog.text
    assert metrics.get("eval-n", 0) <= 30  # three replies of 10 examples: no site inflates the federation's count


@pytest.mark.parametrize("kind", KINDS)
def test_a_site_claiming_a_billion_evaluate_examples_gets_only_its_capped_share(kind, caplog):
    strategy = make_strategy(kind)
    honest = [evaluate_reply(node) for node in (1, 2, 3)]
    liar = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1e9, "eval-auc": 0.1})}), metadata=metadata(BAD_NODE))
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, [*honest, liar])
    # Capped at 10 x the median (10 examples): the liar weighs 100 against 30, not 1e9 against 30.
    assert metrics["eval-auc"] == pytest.approx((30 * 0.7 + 100 * 0.1) / 130)
    assert f"Capping the weight of node {BAD_NODE}" in caplog.text


@pytest.mark.parametrize("attack", ["factors x 10", "weight 1e30"])
def test_one_client_cannot_take_over_the_global_under_the_robust_option(attack):
    """Bound (docs/reliability.md): a client moves the global by at most its share times
    robust_factor times the round's median update norm; 1e30 examples is refused outright."""
    kind = "fedlowrank"
    glob = global_arrays(kind)

    def replies(config):
        good = [good_reply(kind, n, config) for n in (1, 2, 3)]
        arrays = local_arrays(kind, BAD_NODE)
        if attack == "factors x 10":  # a product x 1000, within the value bound (1e6): only the clip stops it
            arrays = {k: (v * 10 if k.startswith("fc.") else v).astype(np.float32) for k, v in arrays.items()}
            bad = good_reply(kind, BAD_NODE, config, arrays=arrays)
        else:
            bad = FAULTS["weight 1e30"](good_reply(kind, BAD_NODE, config), kind)
        return [*good, bad]

    strategy = make_strategy(kind, robust="clip", robust_factor=3.0)
    config = configure(strategy, kind)
    sent = replies(config)
    probe = ServerRound(strategy.config, strategy.state)  # the round's own update norm, not a copy of it
    norms = [probe.update_norm({k: a.numpy() for k, a in m.content["arrays"].items()}) for m in sent[:3]]
    arrays, metrics = strategy.aggregate_train(1, sent)
    moved = np.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - glob[k]) ** 2) for k in ("head.weight",))
                    + np.sum((product(arrays) - product_np(glob)) ** 2))
    weights = [20.0 * n for n in (1, 2, 3, BAD_NODE)]
    bound = sum(w * min(n, 3 * np.median(norms + [np.inf])) for w, n in zip(weights, norms + [np.inf])) / sum(weights)
    assert np.isfinite(moved) and moved <= bound * (1 + 1e-5) + 1e-6, (moved, bound)
    plain = make_strategy(kind)
    unprotected, _ = plain.aggregate_train(1, replies(configure(plain, kind)))
    if attack == "factors x 10":  # without the option the attacker owns the global
        assert np.linalg.norm(product(unprotected) - product_np(glob)) > 100


def product(record):
    return product_np({k: record[k].numpy().astype(np.float64) for k in record.keys()})


def product_np(arrays):
    return (arrays["fc.lora_U"].astype(np.float64) * arrays["fc.lora_S"][0]) @ arrays["fc.lora_V"].astype(np.float64).T


def test_flowers_server_side_dp_clipping_wraps_fedlowrank():
    """DifferentialPrivacyServerSideFixedClipping(FedLowRank): replies clipped, then aggregated exactly."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    kind = "fedlowrank"
    glob = global_arrays(kind)
    strategy = DifferentialPrivacyServerSideFixedClipping(FedLowRank(), noise_multiplier=0.0, clipping_norm=0.05,
                                                         num_sampled_clients=3)
    messages = list(strategy.configure_train(1, array_record(glob), ConfigRecord(), GRID))
    config = messages[0].content["config"]
    replies = []
    for node in (1, 2, 3):
        reply = good_reply(kind, node, config)
        reply.content["metrics"]["num-examples"] = 10.0  # the wrapper needs uniform weights
        replies.append(reply)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["agg-clients-dropped"] == 0
    moved = np.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - glob[k]) ** 2) for k in ("head.weight", "fc.lora_S")))
    assert moved <= 0.05 * (1 + 1e-4)  # every client's update was clipped to norm 0.05 first


def test_a_numerical_failure_in_aggregation_keeps_the_global_instead_of_ending_the_run(monkeypatch, caplog):
    from fedlowrank.aggregation.rules.exact import ExactAccumulator

    def broken(self, rank):
        raise np.linalg.LinAlgError("eigh did not converge")

    monkeypatch.setattr(ExactAccumulator, "result", broken)
    with caplog.at_level(logging.ERROR):
        arrays, metrics = aggregate("fedlowrank", lambda config: [good_reply("fedlowrank", 1, config)])
    assert arrays is None and metrics is None  # Strategy.start / checkpoint.run keep the previous global
    assert "aggregation failed (LinAlgError: eigh did not converge)" in caplog.text
