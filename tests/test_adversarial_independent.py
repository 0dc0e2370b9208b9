"""Independent adversarial suite: the server side against malicious or broken clients and checkpoints.

Written from the public API and the docs only (README.md, docs/reliability.md), without reading
the project's own tests. Every reply is a real ``flwr`` ``Message`` as the SuperLink delivers it
(metadata with the sender's node id), fed through ``configure_train`` + ``aggregate_train``
(``fedlowrank.strategies.testing.run_round``) or a whole ``checkpoint.run`` over an
``InProcessGrid``.

What each test asserts is one of:

- *rejected*: the global arrays are bit-identical to the round without the bad reply, the
  round counts it as dropped, and a WARNING names ``node 9`` and the problem;
- *bounded*: the global's move is at most a bound computed here, independently, from the replies;
- *refused*: a specific exception type whose message names the problem (checkpoints);
- *memory*: ``tracemalloc``'s peak while handling the input stays far below what it declares.

The nine defects it found (a crash on a 10**400 metric, clients posing as the server's own
figures, eval-n past the capped weight, negative counts, AUCs outside [0, 1], the first reply
setting the federation's group count, a quadratic fairness report, negative .npy dimensions, a
hint naming a non-checkpoint folder) were fixed; their tests assert the fixed behaviour.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fedlowrank.strategies import FairLoRA, FederatedFairnessMetrics, FedLowRank, LGreCo
from fedlowrank.strategies import checkpoint as ckpt
from fedlowrank.strategies.testing import (
    SERVER_NODE_ID,
    InProcessGrid,
    run_round,
    task_identity,
)
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Result

from fedlowrank.compression import (
    ENERGY_KEY,
    ERRORS_KEY,
    PAYLOAD_KEY,
    SPEC_KEY,
    ErrorFeedback,
    encode_update,
    parse_spec,
)
from fedlowrank.fairness import local_statistics
from fedlowrank.wire import MAX_RECORD_KEYS

BAD = 9  # the attacker's node id in single-reply attacks
D_OUT, D_IN, RANK = 8, 6, 4
MAX_ABS = 1e6  # docs/reliability.md: the largest entry a client accepts in a global


# --------------------------------------------------------------------------- helpers
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flwr_log():
    """Every message logged on Flower's logger (the strategies log through it)."""
    handler = _Capture()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def naming(lines: list[str], node: int = BAD) -> list[str]:
    return [line for line in lines if f"node {node}" in line]


def metadata(node: int, kind: str = "train") -> Metadata:
    return Metadata(run_id=1, message_id=f"reply-{node}-{kind}", src_node_id=node, dst_node_id=SERVER_NODE_ID,
                    reply_to_message_id=f"instruction-{node}-{kind}", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=kind)


def message(node: int, content: RecordDict, kind: str = "train") -> Message:
    return Message(content=content, metadata=metadata(node, kind))


def as_array(value) -> Array:
    return value if isinstance(value, Array) else Array(value)


def reply(node: int, arrays: dict, weight=100.0, **metrics) -> Message:
    """A train reply whose arrays are sent exactly as given (no cast, no copy to C order)."""
    return message(node, RecordDict({"arrays": ArrayRecord({k: as_array(v) for k, v in arrays.items()}),
                                     "metrics": MetricRecord({"num-examples": weight, **metrics})}))


def npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


def npy_header(descr, shape, fortran: bool = False, version=(1, 0)) -> bytes:
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(out, header)
    return out.getvalue()


def raw_array(data: bytes, dtype="float32", shape=(2, D_OUT), stype="numpy.ndarray") -> Array:
    """An Array whose bytes (and metadata) are whatever the sender chose."""
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def global_arrays(groups: int = 1, rank: int = RANK, d_out: int = D_OUT, d_in: int = D_IN, seed: int = 1) -> dict:
    g = np.random.default_rng(seed)
    return {
        "fc.lora_U": (0.1 * g.normal(size=(d_out, rank))).astype(np.float32),
        "fc.lora_S": np.ones((groups, rank), np.float32),
        "fc.lora_V": (0.1 * g.normal(size=(d_in, rank))).astype(np.float32),
        "head.weight": g.normal(size=(2, d_out)).astype(np.float32),
        "head.bias": np.zeros(2, np.float32),
    }


def trained(glob: dict, node: int, scale: float = 0.01, round_: int = 0) -> dict:
    """An honest client's arrays: the global plus a small change of its own (S too when grouped)."""
    g = np.random.default_rng(1000 * round_ + 100 + node)
    out = {}
    for k, v in glob.items():
        if k.endswith("lora_S") and v.shape[0] == 1:
            out[k] = v.copy()
        else:
            out[k] = (v + scale * g.normal(size=v.shape)).astype(np.float32)
    return out


def group_metrics(groups: int) -> dict:
    return {} if groups == 1 else {"group-count-g0": 60.0, "group-count-g1": 40.0}


KINDS = {
    "fedlowrank": (lambda: FedLowRank(), 1),
    "fairlora-exact": (lambda: FairLoRA(mode="exact"), 2),
    "fairlora-paper": (lambda: FairLoRA(mode="paper"), 2),
}


def honest_replies(glob: dict, groups: int, nodes=(1, 2, 3)) -> list[Message]:
    return [reply(n, trained(glob, n), 100.0, **group_metrics(groups)) for n in nodes]


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    return a is not None and b is not None and list(a.keys()) == list(b.keys()) and all(
        np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def assert_rejected(kind: str, bad: Message | callable, log: list[str], needle: str) -> None:
    """The round with ``bad`` (from node 9) ends bit-identical to the round without it, counts it
    as dropped, and a warning names node 9 and ``needle``."""
    make, groups = KINDS[kind]
    glob = global_arrays(groups)
    ref, _ = run_round(make(), glob, honest_replies(glob, groups))
    log.clear()
    if callable(bad):
        bad = bad(glob, groups)
    out, metrics = run_round(make(), glob, honest_replies(glob, groups) + [bad])
    assert same_arrays(ref, out), "a bad reply changed the global model"
    assert metrics["agg-clients-dropped"] == 1 and metrics["agg-clients-kept"] == 3
    lines = naming(log)
    assert lines, f"no log line names node {BAD}: {log}"
    assert any(needle.lower() in line.lower() for line in lines), lines


def attacked(mutate):
    """A reply from node 9: an honest reply's arrays passed through ``mutate(arrays, glob)``."""
    def build(glob, groups):
        return reply(BAD, mutate(trained(glob, BAD), glob), 100.0, **group_metrics(groups))
    return build


def _npz_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, x=arr)
    return out.getvalue()


def _float16_overflow() -> np.ndarray:
    """What a client's float16 cast of 7e4 sends: +inf in float16."""
    with np.errstate(over="ignore"):
        return np.array([7e4, 0], np.float16)


def with_factors(arrays, rank, groups_rows=None, u=None, s=None, v=None):
    out = dict(arrays)
    rows = groups_rows if groups_rows is not None else arrays["fc.lora_S"].shape[0]
    out["fc.lora_U"] = np.zeros((D_OUT, rank), np.float32) if u is None else u
    out["fc.lora_S"] = np.ones((rows, rank), np.float32) if s is None else s
    out["fc.lora_V"] = np.zeros((D_IN, rank), np.float32) if v is None else v
    return out


def replace(key, value):
    return lambda a, g: {**a, key: value(a, g) if callable(value) else value}


# ------------------------------------------------------------- arrays: shapes, keys, values, dtypes
ARRAY_ATTACKS = {
    "U-more-rows": (replace("fc.lora_U", np.zeros((D_OUT + 1, RANK), np.float32)), "shape"),
    "head-wrong-shape": (replace("head.weight", np.zeros((2, D_OUT + 1), np.float32)), "shape"),
    "head-transposed": (replace("head.weight", lambda a, g: np.ascontiguousarray(a["head.weight"].T)), "shape"),
    "rank-above-global": (lambda a, g: with_factors(a, RANK + 1), "rank"),
    "rank-40000": (lambda a, g: with_factors(a, 40_000), "bytes"),
    "factor-ranks-disagree": (replace("fc.lora_U", np.zeros((D_OUT, 2), np.float32)), "disagree on rank"),
    "S-extra-group-row": (lambda a, g: {**a, "fc.lora_S": np.ones((g["fc.lora_S"].shape[0] + 1, RANK), np.float32)}, "lora_S"),
    "S-1d": (replace("fc.lora_S", np.ones(RANK, np.float32)), "lora_S"),
    "U-3d": (replace("fc.lora_U", np.zeros((D_OUT, RANK, 1), np.float32)), "lora_U"),
    "missing-key": (lambda a, g: {k: v for k, v in a.items() if k != "head.bias"}, "missing"),
    "extra-key": (lambda a, g: {**a, "evil.weight": np.zeros(3, np.float32)}, "unexpected"),
    "10k-extra-keys": (lambda a, g: {**a, **{f"x{i}": np.zeros(1, np.float32) for i in range(10_000)}}, "unexpected"),
    "nan": (replace("head.weight", lambda a, g: np.full_like(a["head.weight"], np.nan)), "nan"),
    "+inf-in-factor": (replace("fc.lora_V", lambda a, g: np.where(np.eye(D_IN, RANK) > 0, np.inf, a["fc.lora_V"]).astype(np.float32)), "inf"),
    "-inf": (replace("head.bias", np.array([-np.inf, 0], np.float32)), "inf"),
    "1e15": (lambda a, g: {**a, **{k: (v * 1e15).astype(np.float32) for k, v in a.items()}}, "above"),
    "1e38": (replace("head.bias", np.array([1e38, 0], np.float32)), "above"),
    "just-above-1e6": (replace("head.bias", np.array([1.5e6, 0], np.float32)), "above"),
    "product-above-1e6": (lambda a, g: with_factors(a, RANK, u=np.full((D_OUT, RANK), 1e3, np.float32),
                                                    s=np.full(g["fc.lora_S"].shape, 1e6, np.float32),
                                                    v=np.full((D_IN, RANK), 1e3, np.float32)), "product"),
    "int64": (replace("head.weight", lambda a, g: a["head.weight"].astype(np.int64)), "dtype"),
    "bool": (replace("head.weight", lambda a, g: a["head.weight"] > 0), "dtype"),
    "int8-factor": (replace("fc.lora_U", lambda a, g: a["fc.lora_U"].astype(np.int8)), "dtype"),
    "uint64": (replace("head.bias", np.array([1, 2], np.uint64)), "dtype"),
    "complex64": (replace("head.weight", lambda a, g: a["head.weight"].astype(np.complex64)), "dtype"),
    "float16-overflow-to-inf": (replace("head.bias", lambda a, g: _float16_overflow()), "inf"),
    "zero-size": (replace("head.bias", np.zeros(0, np.float32)), "shape"),
    "zero-size-factor-rows": (replace("fc.lora_U", np.zeros((0, RANK), np.float32)), "shape"),
    "0-d": (replace("head.bias", np.array(1.0, np.float32)), "shape"),
    "npy-header-1TiB": (replace("head.weight", raw_array(npy_header("<f4", (2 ** 38, 1024)))), "declares"),
    "npy-header-lies-by-one": (replace("head.weight", raw_array(npy_header("<f4", (2, D_OUT + 1)) + bytes(4 * 2 * D_OUT))), "declares"),
    "npy-object-dtype": (replace("head.weight", raw_array(npy_header("|O", (2, D_OUT)) + bytes(128))), "dtype"),
    "npy-structured-dtype": (replace("head.weight", raw_array(npy_header([("a", "<f4"), ("b", "<f4")], (2, D_OUT)) + bytes(128))), "dtype"),
    "npy-unicode-dtype": (replace("head.weight", raw_array(npy_header("<U4", (2, D_OUT)) + bytes(256))), "dtype"),
    "npy-void-dtype": (replace("head.weight", raw_array(npy_header("|V4", (2, D_OUT)) + bytes(64))), "dtype"),
    "raw-bf16-bytes-no-header": (replace("head.weight", raw_array(bytes(2 * 2 * D_OUT), dtype="bfloat16")), "not a valid .npy"),
    "npz-bytes": (replace("head.weight", lambda a, g: raw_array(_npz_bytes(a["head.weight"]))), "not a valid .npy"),
    "stype-torch": (replace("head.weight", lambda a, g: raw_array(npy_bytes(a["head.weight"]), stype="torch.Tensor")), "serialisation type"),
    "oversized-reply": (replace("head.weight", np.zeros((2, 400_000), np.float32)), "bytes"),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("attack", list(ARRAY_ATTACKS))
def test_malformed_arrays_are_rejected(kind, attack, flwr_log):
    mutate, needle = ARRAY_ATTACKS[attack]
    assert_rejected(kind, attacked(mutate), flwr_log, needle)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", [(2, 2 ** 40), (2 ** 62,), (0, 2 ** 62)])
def test_array_metadata_is_not_trusted(kind, shape, flwr_log):
    """Flower's Array metadata (dtype/shape) is the sender's claim; only the .npy bytes count, so a
    reply whose metadata declares 2^62 entries is read as what its bytes hold, nothing more."""
    make, groups = KINDS[kind]
    glob = global_arrays(groups)
    mine = trained(glob, BAD)
    lying = {**mine, "head.weight": raw_array(npy_bytes(mine["head.weight"]), dtype="float64", shape=shape)}
    ref, _ = run_round(make(), glob, honest_replies(glob, groups) + [reply(BAD, mine, 100.0, **group_metrics(groups))])
    tracemalloc.start()
    try:
        out, _ = run_round(make(), glob, honest_replies(glob, groups) + [reply(BAD, lying, 100.0, **group_metrics(groups))])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same_arrays(ref, out)
    assert peak < 8 << 20


def test_two_array_records_or_none_are_rejected(flwr_log):
    def two(glob, groups):
        a = ArrayRecord({k: Array(v) for k, v in trained(glob, BAD).items()})
        return message(BAD, RecordDict({"a": a, "b": a, "metrics": MetricRecord({"num-examples": 100.0})}))
    assert_rejected("fedlowrank", two, flwr_log, "ArrayRecord")
    flwr_log.clear()
    none = lambda glob, groups: message(BAD, RecordDict({"metrics": MetricRecord({"num-examples": 100.0})}))
    assert_rejected("fedlowrank", none, flwr_log, "ArrayRecord")


def test_error_reply_is_dropped_naming_the_node(flwr_log):
    bad = lambda glob, groups: Message(Error(code=0, reason="client exploded"), reply_to=Message(
        RecordDict(), dst_node_id=BAD, message_type="train", group_id="1"))
    make, _ = KINDS["fedlowrank"]
    glob = global_arrays()
    ref, _ = run_round(make(), glob, honest_replies(glob, 1))
    with task_identity():
        err = bad(glob, 1)
    # An error reply built by Flower carries the instruction's destination as its source.
    assert err.metadata.src_node_id == BAD
    out, metrics = run_round(make(), glob, honest_replies(glob, 1) + [err])
    assert same_arrays(ref, out) and metrics["agg-clients-dropped"] == 1
    assert any("client exploded" in line for line in naming(flwr_log))


# ------------------------------------------------- arrays that are odd but valid: read exactly
def _encode_variants(arr: np.ndarray) -> dict[str, Array]:
    """The same values in other legitimate encodings."""
    fortran = np.asfortranarray(arr)
    strided = np.zeros((arr.shape[0], 2 * arr.shape[1]), arr.dtype)[:, ::2]
    strided[...] = arr
    return {
        "fortran-order": Array(fortran),
        "non-contiguous-view": Array(strided),
        "big-endian": raw_array(npy_bytes(arr.astype(">f4")), shape=arr.shape),
        "npy-version-2": raw_array(npy_header("<f4", arr.shape, version=(2, 0)) + arr.astype("<f4").tobytes(), shape=arr.shape),
    }


@pytest.mark.parametrize("variant", ["fortran-order", "non-contiguous-view", "big-endian", "npy-version-2"])
def test_legitimate_encodings_aggregate_to_the_same_values(variant):
    glob = global_arrays()
    mine = trained(glob, BAD)
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, mine)])
    odd = {**mine, "fc.lora_U": _encode_variants(mine["fc.lora_U"])[variant]}
    out, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, odd)])
    assert metrics["agg-clients-dropped"] == 0
    assert same_arrays(ref, out)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_widths_count_as_their_values(dtype):
    """A float16 or float64 reply is read as its values: the round equals the float32 reply of
    exactly the same values (no reinterpretation of bytes, no silent rescaling)."""
    glob = global_arrays()
    mine = {k: v.astype(dtype) for k, v in trained(glob, BAD).items()}
    as32 = {k: v.astype(np.float32) for k, v in mine.items()}  # float16 -> float32 is exact
    if dtype == np.float64:
        mine = {k: v.astype(np.float64) for k, v in as32.items()}  # values representable in float32
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, as32)])
    out, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, mine)])
    assert metrics["agg-clients-dropped"] == 0
    assert same_arrays(ref, out)
    assert all(out[k].numpy().dtype == np.float32 for k in out), "the global's dtype must not follow a reply's"


def test_rank_zero_factors_count_as_no_change_to_the_adapter():
    """A rank-0 reply (U of shape (d_out, 0)) is a client that holds nothing of the adapter: the
    server completes it with the global's components, so it counts as an unchanged adapter."""
    glob = global_arrays()
    mine = trained(glob, BAD)
    unchanged = {**mine, **{k: glob[k].copy() for k in ("fc.lora_U", "fc.lora_S", "fc.lora_V")}}
    rank0 = with_factors(mine, 0)
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, unchanged)])
    out, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, rank0)])
    assert metrics["agg-clients-dropped"] == 0
    p = lambda r: r["fc.lora_U"].numpy().astype(np.float64) @ np.diag(r["fc.lora_S"].numpy()[0]) @ r["fc.lora_V"].numpy().T
    np.testing.assert_allclose(p(out), p(ref), atol=1e-6)
    np.testing.assert_array_equal(out["head.weight"].numpy(), ref["head.weight"].numpy())


# ----------------------------------------------------------------- memory: bounded by the reply
def _peak_of(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("attack", ["npy-header-1TiB", "rank-40000", "oversized-reply", "10k-extra-keys"])
def test_rejection_allocates_far_less_than_declared(attack, flwr_log):
    glob = global_arrays()
    bad = attacked(ARRAY_ATTACKS[attack][0])(glob, 1)
    declared = {"npy-header-1TiB": 2 ** 40, "rank-40000": 2_400_000, "oversized-reply": 3_200_000,
                "10k-extra-keys": 10_000 * 132}[attack]
    replies = honest_replies(glob, 1) + [bad]
    peak = _peak_of(lambda: run_round(FedLowRank(), glob, replies))
    assert naming(flwr_log), "not rejected"
    # The honest round itself costs well under 1 MiB here; nothing is read from the bad reply.
    assert peak < min(declared, 4 << 20), f"peak {peak} bytes for a reply declaring {declared}"


def test_1e5_metric_keys_are_refused_before_values_are_read(flwr_log):
    glob = global_arrays()
    bad = reply(BAD, trained(glob, BAD), 100.0, **{f"k{i}": float(i) for i in range(100_000)})
    replies = honest_replies(glob, 1) + [bad]
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1))
    flwr_log.clear()
    box = {}
    peak = _peak_of(lambda: box.setdefault("out", run_round(FedLowRank(), glob, replies)))
    out, metrics = box["out"]
    assert same_arrays(ref, out) and metrics["agg-clients-dropped"] == 1
    assert any("100001" in line and "keys" in line for line in naming(flwr_log))
    assert peak < 1 << 20


# ------------------------------------------------------------------- weights and train metrics
WEIGHT_ATTACKS = {
    "negative": -1.0,
    "minus-zero-ish": -1e-300,
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "1e30": 1e30,
    "1e308": 1e308,
    "just-above-cap": 1.000001e9,
    "list": [100.0, 100.0],
    "int-above-cap": 10 ** 18,
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("attack", list(WEIGHT_ATTACKS))
def test_bad_weights_are_rejected(kind, attack, flwr_log):
    weight = WEIGHT_ATTACKS[attack]

    def bad(glob, groups):
        counts = {} if groups == 1 else {"group-count-g0": 0.0, "group-count-g1": 0.0}
        return reply(BAD, trained(glob, BAD), weight, **counts)
    assert_rejected(kind, bad, flwr_log, "num-examples")


def _record_with(key, value, base=None) -> MetricRecord:
    """A MetricRecord holding a value Flower's constructor refuses (a str, a bool, None): what a
    record deserialised by another implementation, or a buggy client library, could hold."""
    record = MetricRecord(base or {"num-examples": 100.0})
    record.__dict__["_data"][key] = value
    return record


@pytest.mark.parametrize("value", ["100", True, None, b"100"])
def test_weight_of_a_wrong_type_is_rejected(value, flwr_log):
    def bad(glob, groups):
        arrays = ArrayRecord({k: Array(v) for k, v in trained(glob, BAD).items()})
        return message(BAD, RecordDict({"arrays": arrays, "metrics": _record_with("num-examples", value)}))
    assert_rejected("fedlowrank", bad, flwr_log, "num-examples")


def test_weight_only_in_a_config_record_is_rejected(flwr_log):
    def bad(glob, groups):
        arrays = ArrayRecord({k: Array(v) for k, v in trained(glob, BAD).items()})
        return message(BAD, RecordDict({"arrays": arrays, "metrics": MetricRecord({"train-loss": 0.1}),
                                        "config": ConfigRecord({"num-examples": 1e9})}))
    assert_rejected("fedlowrank", bad, flwr_log, "num-examples")


def test_second_metric_record_cannot_smuggle_a_weight(flwr_log):
    def bad(glob, groups):
        arrays = ArrayRecord({k: Array(v) for k, v in trained(glob, BAD).items()})
        return message(BAD, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 100.0}),
                                        "more": MetricRecord({"num-examples": 1e9})}))
    assert_rejected("fedlowrank", bad, flwr_log, "MetricRecord")


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_weight_reply_does_not_move_the_global(kind):
    make, groups = KINDS[kind]
    glob = global_arrays(groups)
    ref, _ = run_round(make(), glob, honest_replies(glob, groups))
    counts = {} if groups == 1 else {"group-count-g0": 0.0, "group-count-g1": 0.0}
    far = {k: (v + 0.5).astype(np.float32) for k, v in trained(glob, BAD).items()}
    out, _ = run_round(make(), glob, honest_replies(glob, groups) + [reply(BAD, far, 0.0, **counts)])
    for key in ref:
        np.testing.assert_allclose(out[key].numpy(), ref[key].numpy(), atol=1e-5, err_msg=key)


RECORD_ATTACKS = {
    "1e5-metric-keys": lambda: {"metrics": MetricRecord({"num-examples": 100.0, **{f"k{i}": 1.0 for i in range(100_000)}})},
    "1025-keys-across-records": lambda: {"metrics": MetricRecord({"num-examples": 100.0, **{f"k{i}": 1.0 for i in range(600)}}),
                                         "config": ConfigRecord({f"c{i}": 1 for i in range(425)})},
    "2MiB-config-bytes": lambda: {"metrics": MetricRecord({"num-examples": 100.0}), "config": ConfigRecord({"blob": bytes(2 << 20)})},
    "2MiB-config-strings": lambda: {"metrics": MetricRecord({"num-examples": 100.0}), "config": ConfigRecord({"s": ["x" * 1000] * 2100})},
    "200k-float-metric-list": lambda: {"metrics": MetricRecord({"num-examples": 100.0, "big": [1.0] * 200_000})},
}


@pytest.mark.parametrize("attack", list(RECORD_ATTACKS))
def test_oversized_metric_and_config_records_are_rejected(attack, flwr_log):
    def bad(glob, groups):
        arrays = ArrayRecord({k: Array(v) for k, v in trained(glob, BAD).items()})
        return message(BAD, RecordDict({"arrays": arrays, **RECORD_ATTACKS[attack]()}))
    assert_rejected("fedlowrank", bad, flwr_log, "allowed")


def test_1024_keys_are_still_accepted():
    """The record limit is not off by one the other way: 1,024 keys in all are accepted."""
    glob = global_arrays()
    ok = reply(BAD, trained(glob, BAD), 100.0, **{f"k{i}": 1.0 for i in range(MAX_RECORD_KEYS - 1)})
    _, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [ok])
    assert metrics["agg-clients-dropped"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1.0, 2.0], "abc"])
def test_bad_train_metric_is_left_out_not_averaged(value, flwr_log):
    """A malformed ``train-loss`` costs that metric of that reply only: the arrays are kept and
    the round's train-loss is the mean of the others."""
    glob = global_arrays()
    honest = [reply(n, trained(glob, n), 100.0, **{"train-loss": 0.5 + 0.1 * n}) for n in (1, 2, 3)]
    mine = trained(glob, BAD)
    ref, _ = run_round(FedLowRank(), glob, honest + [reply(BAD, mine, 100.0, **{"train-loss": 0.9})])
    if isinstance(value, str):
        arrays = ArrayRecord({k: Array(v) for k, v in mine.items()})
        bad = message(BAD, RecordDict({"arrays": arrays, "metrics": _record_with("train-loss", value)}))
    else:
        bad = reply(BAD, mine, 100.0, **{"train-loss": value})
    flwr_log.clear()
    out, metrics = run_round(FedLowRank(), glob, honest + [bad])
    assert same_arrays(ref, out), "the reply's arrays should be kept"
    assert metrics["train-loss"] == pytest.approx(0.7)
    assert any("train-loss" in line for line in naming(flwr_log))


def test_huge_integer_train_metric_does_not_crash_the_round(flwr_log):
    glob = global_arrays()
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, trained(glob, BAD))])
    out, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1)
                             + [reply(BAD, trained(glob, BAD), 100.0, **{"train-loss": 10 ** 400})])
    assert same_arrays(ref, out)
    assert "train-loss" not in metrics or np.isfinite(metrics["train-loss"])
    assert any("train-loss" in line for line in naming(flwr_log))


def test_unknown_client_metric_keys_do_not_touch_the_model():
    glob = global_arrays()
    mine = trained(glob, BAD)
    ref, _ = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, mine)])
    out, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1)
                             + [reply(BAD, mine, 100.0, **{f"evil-{i}": 1e300 for i in range(1000)})])
    assert same_arrays(ref, out)
    assert metrics["agg-clients-kept"] == 4 and len(metrics) <= MAX_RECORD_KEYS + 16


def test_client_cannot_spoof_server_aggregation_metrics():
    glob = global_arrays()
    spoof = {"agg-floor-rel": 0.0, "agg-momentum-restart": 1.0, "agg-error-rel-g0": 0.0, "group-share-g0": 0.5}
    _, metrics = run_round(FedLowRank(), glob, honest_replies(glob, 1) + [reply(BAD, trained(glob, BAD), 100.0, **spoof)])
    assert not set(spoof) & set(metrics.keys()), {k: metrics[k] for k in set(spoof) & set(metrics.keys())}


# ----------------------------------------------------------------- per-group counts (FairLoRA)
COUNT_ATTACKS = {
    "1e30": ({"group-count-g0": 1e30, "group-count-g1": 40.0}, "cap"),
    "sum-above-weight": ({"group-count-g0": 100.0, "group-count-g1": 100.0}, "more than the weight"),
    "negative": ({"group-count-g0": -1.0, "group-count-g1": 40.0}, "group-count-g0"),
    "nan": ({"group-count-g0": float("nan"), "group-count-g1": 40.0}, "group-count-g0"),
    "missing-group": ({"group-count-g0": 60.0}, "groups"),
    "extra-group": ({"group-count-g0": 30.0, "group-count-g1": 30.0, "group-count-g2": 30.0}, "groups"),
    "list": ({"group-count-g0": [30.0, 1.0], "group-count-g1": 30.0}, "group-count-g0"),
    "malformed-suffix": ({"group-count-g0": 30.0, "group-count-g1": 30.0, "group-count-gx": 1.0}, "group-count-gx"),
    "none": ({}, "groups"),
}


@pytest.mark.parametrize("kind", ["fairlora-exact", "fairlora-paper"])
@pytest.mark.parametrize("attack", list(COUNT_ATTACKS))
def test_forged_group_counts_are_rejected(kind, attack, flwr_log):
    counts, needle = COUNT_ATTACKS[attack]
    assert_rejected(kind, lambda glob, groups: reply(BAD, trained(glob, BAD), 100.0, **counts), flwr_log, needle)


@pytest.mark.parametrize("kind", ["fairlora-exact", "fairlora-paper"])
def test_forged_group_count_share_is_capped(kind, flwr_log):
    """Node 9 claims 1e9 examples, all in group 1 (the others: 60/40 of 100). The weight cap
    (10 x median 100) and the group cap (10 x group 1's median 40) leave it at most 400 of group 1,
    so group 1's share is at most (3 x 40 + 400) / (3 x 100 + 400), not ~1."""
    make, _ = KINDS[kind]
    glob = global_arrays(2)
    strategy = make()
    bad = reply(BAD, trained(glob, BAD), 1e9, **{"group-count-g0": 0.0, "group-count-g1": 1e9})
    _, metrics = run_round(strategy, glob, honest_replies(glob, 2) + [bad])
    assert metrics["agg-clients-kept"] == 4
    bound = (3 * 40 + 400) / (3 * 100 + 400)
    assert metrics["group-share-g1"] <= bound + 1e-9, metrics["group-share-g1"]
    assert any("Capping" in line for line in naming(flwr_log))


# --------------------------------------------------------------------------- evaluate metrics
def eval_reply(node: int, **metrics) -> Message:
    return message(node, RecordDict({"metrics": MetricRecord(metrics)}), kind="evaluate")


HONEST_EVAL = [{"n": 1, "eps": 1.0}, {"n": 2, "eps": 2.0}, {"n": 3, "eps": 3.0}]


def honest_eval():
    return [eval_reply(h["n"], **{"num-examples": 100.0, "eval-auc": 0.8, "eval-n": 100, "eval-n_g0": 50,
                                  "eval-es_auc_groups": 2, "dp_epsilon": h["eps"]}) for h in HONEST_EVAL]


def evaluate(replies, strategy=None):
    with task_identity():
        return (strategy or FedLowRank()).aggregate_evaluate(1, replies)


def test_eval_n_above_the_claimed_examples_is_left_out(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, "eval-auc": 0.8, "eval-n": 1e6})])
    assert out["eval-n"] == 300
    assert any("eval-n" in line for line in naming(flwr_log))


def test_eval_n_is_bounded_by_the_capped_weight(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 1e9, "eval-auc": 0.8, "eval-n": 1e9})])
    assert any("Capping" in line for line in naming(flwr_log))
    assert out["eval-n"] <= 300 + 10 * 100


@pytest.mark.parametrize("key", ["eval-n", "eval-n_g0", "eval-es_auc_groups"])
def test_negative_counts_are_left_out(key, flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, "eval-auc": 0.8, key: -1e6})])
    assert out[key] >= 0, out[key]
    assert naming(flwr_log)


def test_dp_epsilon_nan_drops_the_reply(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, "eval-auc": 0.0, "dp_epsilon": float("nan")})])
    assert out["eval-clients-dropped"] == 1
    assert out["dp_epsilon"] == 3 and out["eval-auc"] == pytest.approx(0.8)
    assert any("dp_epsilon" in line for line in naming(flwr_log))


@pytest.mark.parametrize("forged", [1e300, -5.0, 0.0])
def test_dp_epsilon_forgery_cannot_hide_the_worst_honest_site(forged):
    """The federation reports the worst (largest) epsilon: a forged value can raise it (which only
    makes the report more conservative) but never bring it below an honest site's 3.0."""
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, "eval-auc": 0.8, "dp_epsilon": forged})])
    assert out["dp_epsilon"] >= 3.0
    assert out["dp_epsilon"] == max(3.0, forged)


def test_eval_weight_1e9_is_capped(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 1e9, "eval-auc": 0.0})])
    # capped to 10 x the median 100: the AUC mean is at least (3 x 100 x 0.8) / (300 + 1000)
    assert out["eval-auc"] >= 240 / 1300 - 1e-12
    assert any("Capping" in line for line in naming(flwr_log))


@pytest.mark.parametrize("weight", [1e30, -1.0, float("nan")])
def test_eval_bad_weight_drops_the_reply(weight, flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": weight, "eval-auc": 0.0})])
    assert out["eval-clients-dropped"] == 1 and out["eval-auc"] == pytest.approx(0.8)
    assert naming(flwr_log)


def test_eval_1e5_keys_drop_the_reply(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, **{f"k{i}": 1.0 for i in range(100_000)}})])
    assert out["eval-clients-dropped"] == 1 and len(out) < 16
    assert naming(flwr_log)


def test_out_of_range_auc_is_not_averaged(flwr_log):
    out = evaluate(honest_eval() + [eval_reply(BAD, **{"num-examples": 100.0, "eval-auc": 1e300})])
    assert 0.0 <= out["eval-auc"] <= 1.0


def _stats_record(node: int, groups: int) -> ArrayRecord:
    g = np.random.default_rng(node)
    y = g.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * g.random(200), 0, 1)
    stats = local_statistics(y, p, g.integers(0, groups, 200), groups)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})


def _fair_reply(node: int, groups: int) -> Message:
    return message(node, RecordDict({"metrics": MetricRecord({"num-examples": 200.0, "eval-auc": 0.7}),
                                     "fairness-stats": _stats_record(node, groups)}), kind="evaluate")


def test_fairness_statistics_of_other_groups_are_left_out_with_fixed_groups(flwr_log):
    strategy = FedLowRank(evaluate_metrics_aggr_fn=FederatedFairnessMetrics(num_groups=2))
    out = evaluate([_fair_reply(BAD, 3)] + [_fair_reply(n, 2) for n in (1, 2, 3)], strategy)
    assert out["fed-sites"] == 3
    assert any("left out" in line for line in naming(flwr_log))


def test_first_reply_cannot_set_the_group_count_for_everyone(flwr_log):
    strategy = FedLowRank(evaluate_metrics_aggr_fn=FederatedFairnessMetrics())
    out = evaluate([_fair_reply(BAD, 3)] + [_fair_reply(n, 2) for n in (1, 2, 3)], strategy)
    assert out["fed-sites"] >= 3


def test_one_reply_cannot_make_the_federation_metrics_quadratic():
    strategy = FedLowRank(evaluate_metrics_aggr_fn=FederatedFairnessMetrics())
    out = evaluate([_fair_reply(BAD, 100)], strategy)
    assert len(out) <= MAX_RECORD_KEYS


# ------------------------------------------------------------------------------- influence
R_FULL = min(D_OUT, D_IN)  # full rank: the aggregate is the exact weighted mean of products


def gfull() -> dict:
    return global_arrays(rank=R_FULL)


def as_np(arrays) -> dict:
    return {k: np.asarray(v.numpy() if isinstance(v, Array) else v, dtype=np.float64) for k, v in dict(arrays).items()}


def flat(arrays) -> np.ndarray:
    """The model a set of arrays stands for: the adapter's product and the plain arrays."""
    a = as_np(arrays)
    product = a["fc.lora_U"] @ np.diag(a["fc.lora_S"][0]) @ a["fc.lora_V"].T
    return np.concatenate([product.ravel(), a["head.weight"].ravel(), a["head.bias"].ravel()])


def dist(a, b) -> float:
    return float(np.linalg.norm(flat(a) - flat(b)))


def evil(glob: dict, strength: float = 1.0) -> dict:
    """A take-over update: every entry within the value bound, far from the honest ones."""
    out = {k: v.copy() for k, v in glob.items()}
    out["fc.lora_U"] = (glob["fc.lora_U"] + 0.5 * strength).astype(np.float32)
    out["head.weight"] = (glob["head.weight"] + 0.5 * strength).astype(np.float32)
    out["head.bias"] = (glob["head.bias"] + 1.0 * strength).astype(np.float32)
    return out


def test_one_client_claiming_1e9_gets_at_most_ten_nineteenths():
    """share_cap (on by default, robust off): 9 honest sites of 100 examples, node 10 claims 1e9.
    Its effective weight, read back from the mean of head.bias, is capped at 10 x 100 = 1,000."""
    glob = gfull()
    honest = [trained(glob, n) for n in range(1, 10)]
    bad = evil(glob)
    out, _ = run_round(FedLowRank(), glob, [reply(n, a) for n, a in enumerate(honest, 1)] + [reply(10, bad, 1e9)])
    mean_h = np.mean([a["head.bias"].astype(np.float64) for a in honest], axis=0)
    r = out["head.bias"].numpy().astype(np.float64)
    weight = 900 * (r - mean_h) / (bad["head.bias"].astype(np.float64) - r)
    assert np.all(weight <= 1000 * (1 + 1e-4)), weight
    assert np.all(weight >= 1000 * (1 - 1e-4)), "capped, not dropped"


def test_one_client_claiming_1e9_with_clip_is_bounded():
    """robust='clip': the pull of node 10 (1e9 examples, update x40 the honest ones) is at most
    share x (3 x median update norm + the honest aggregate's own move), share = 1000 / 1900."""
    glob = gfull()
    honest = [trained(glob, n) for n in range(1, 10)]
    bad = evil(glob)
    ref, _ = run_round(FedLowRank(robust="clip"), glob, [reply(n, a) for n, a in enumerate(honest, 1)])
    out, _ = run_round(FedLowRank(robust="clip"), glob,
                       [reply(n, a) for n, a in enumerate(honest, 1)] + [reply(10, bad, 1e9)])
    med = float(np.median([dist(a, glob) for a in honest + [bad]]))
    assert dist(bad, glob) > 20 * med  # the attack is real
    bound = (1000 / 1900) * (3 * med + dist(ref, glob))
    assert dist(out, ref) <= bound * (1 + 1e-5), (dist(out, ref), bound)
    unprotected, _ = run_round(FedLowRank(share_cap=None), glob,
                               [reply(n, a) for n, a in enumerate(honest, 1)] + [reply(10, bad, 1e9)])
    assert dist(unprotected, ref) > 10 * bound  # without the bounds it owns the global


def _colluders(glob, norm):
    """Three colluders pushing the same direction, each with an update of norm ``norm``
    (the adapter's product is linear in U, so scaling U's change scales the update norm)."""
    unit = evil(glob)
    n1 = dist(unit, glob)
    out = []
    for _ in range(3):
        c = {k: v.copy() for k, v in glob.items()}
        for key in ("fc.lora_U", "head.weight", "head.bias"):
            c[key] = (glob[key] + norm / n1 * (unit[key].astype(np.float64) - glob[key])).astype(np.float32)
        out.append(c)
    return out


def test_three_colluders_of_ten_just_under_the_bounds():
    """7 honest sites (100 examples) and 3 colluders each claiming 999 (cap: 10 x median 100 = 1000)
    with update norm 0.99 x 3 x the median: nobody is capped or clipped, and their joint pull is at
    most their share x (bound + the honest aggregate's move), as docs/reliability.md states."""
    glob = gfull()
    honest = [trained(glob, n) for n in range(1, 8)]
    norms = sorted(dist(a, glob) for a in honest)
    med = (norms[4] + norms[5]) / 2  # 10 norms, the 3 largest the colluders': median of 5th and 6th
    colluders = _colluders(glob, 0.99 * 3 * med)
    colluder_norm = dist(colluders[0], glob)
    assert colluder_norm > norms[-1]
    handler = _Capture()
    logging.getLogger("flwr").addHandler(handler)
    try:
        ref, _ = run_round(FedLowRank(robust="clip"), glob, [reply(n, a) for n, a in enumerate(honest, 1)])
        out, metrics = run_round(FedLowRank(robust="clip"), glob, [reply(n, a) for n, a in enumerate(honest, 1)]
                                 + [reply(8 + i, c, 999.0) for i, c in enumerate(colluders)])
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert metrics["agg-clients-kept"] == 10
    assert not [line for line in handler.lines if "Capping" in line or "Clipping" in line], handler.lines
    share = 3 * 999 / (7 * 100 + 3 * 999)
    bound = share * (3 * med + dist(ref, glob))
    assert dist(out, ref) <= bound * (1 + 1e-5), (dist(out, ref), bound)


def test_colluders_at_the_bound_three_rounds_running_are_named(flwr_log):
    glob = gfull()
    strategy = FedLowRank(robust="clip")
    for rnd in range(1, 4):
        honest = [trained(glob, n, round_=rnd) for n in range(1, 8)]
        colluders = [evil(glob) for _ in range(3)]
        out, _ = run_round(strategy, glob, [reply(n, a) for n, a in enumerate(honest, 1)]
                           + [reply(8 + i, c, 1e9) for i, c in enumerate(colluders)], server_round=rnd)
        glob = {k: out[k].numpy().copy() for k in out}
    for node in (8, 9, 10):
        assert any(f"Node {node} has been at the share cap or clip bound in its last 3 rounds" in line for line in flwr_log)


@pytest.mark.parametrize("valid", [1, 2])
def test_rounds_with_one_or_two_valid_replies_are_bounded_by_the_last_medians(valid, flwr_log):
    """Round 1: 10 honest sites. Round 2: only the attacker (1e9 examples, update far beyond the
    honest ones) and, for ``valid=2``, one honest site; the others send NaN (dropped). The medians
    of round 1 bound round 2: the global moves at most (1000 x 3 med + 100 x honest) / total."""
    glob = gfull()
    strategy = FedLowRank(robust="clip")
    honest1 = [trained(glob, n) for n in range(1, 11)]
    med1 = float(np.median([dist(a, glob) for a in honest1]))
    out1, _ = run_round(strategy, glob, [reply(n, a) for n, a in enumerate(honest1, 1)], server_round=1)
    honest_move = dist(out1, glob)
    g1 = {k: out1[k].numpy().copy() for k in out1}
    bad = evil(g1)
    assert dist(bad, g1) > 50 * med1
    replies = [reply(11, bad, 1e9)]
    broken = [reply(n, {**trained(g1, n, round_=2), "head.bias": np.full(2, np.nan, np.float32)}) for n in range(2, 9)]
    honest2 = trained(g1, 1, round_=2)
    if valid == 2:
        replies.append(reply(1, honest2, 100.0))
    flwr_log.clear()
    out2, metrics = run_round(strategy, g1, replies + broken, server_round=2)
    assert metrics["agg-clients-kept"] == valid
    move = dist(out2, g1)
    if valid == 1:
        bound = 3 * med1
    else:
        bound = (1000 * 3 * med1 + 100 * dist(honest2, g1)) / 1100
    assert move <= bound * (1 + 1e-5), (move, bound)
    assert move <= 4 * max(honest_move, med1), "round 2 moved far more than an honest round"
    assert any("Clipping" in line or "Capping" in line for line in naming(flwr_log, 11))


def test_sybil_majority_stays_inside_the_accepted_replies():
    """6 Sybils of 10 (documented as not bounded: a majority owns the medians). What must still
    hold: no crash, every honest reply kept, and the global a convex combination of accepted
    replies, hence within the value bound and no farther than the farthest reply."""
    glob = gfull()
    honest = [trained(glob, n) for n in range(1, 5)]
    sybils = [evil(glob, 2.0) for _ in range(6)]
    out, metrics = run_round(FedLowRank(robust="clip"), glob, [reply(n, a) for n, a in enumerate(honest, 1)]
                             + [reply(5 + i, s, 1e9) for i, s in enumerate(sybils)])
    assert metrics["agg-clients-kept"] == 10
    farthest = max(dist(a, glob) for a in honest + sybils)
    assert dist(out, glob) <= farthest * (1 + 1e-6)
    assert max(float(np.max(np.abs(out[k].numpy()))) for k in out) <= MAX_ABS
    assert all(np.all(np.isfinite(out[k].numpy())) for k in out)


# ------------------------------------------------------------------------------- L-GreCo payloads
def lg_global(groups: int = 1) -> dict:
    return global_arrays(groups, d_out=24, d_in=24, seed=3) | {"head.weight": np.random.default_rng(4).normal(size=(16, 24)).astype(np.float32),
                                                              "head.bias": np.zeros(16, np.float32)}


LG_INNER = {"fedlowrank": (lambda: FedLowRank(), 1), "fairlora-exact": (lambda: FairLoRA(mode="exact"), 2)}


def lg_encode(glob: dict, local: dict, default: str, seed: int, candidates=None) -> dict:
    update = {k: local[k].astype(np.float64) - glob[k].astype(np.float64) for k in glob}
    payload, tables = encode_update(update, {k: default for k in glob}, ErrorFeedback(seed=seed), candidates=candidates)
    return {**payload, **tables}


def lg_reply(node, arrays, groups, weight=100.0):
    return reply(node, {k: np.ascontiguousarray(v) for k, v in arrays.items()}, weight, **group_metrics(groups))


def spec_lines(d) -> list[bytes]:
    return d[SPEC_KEY].tobytes().split(b"\n")


def set_spec(d, lines):
    return {**d, SPEC_KEY: np.frombuffer(b"\n".join(lines), np.uint8).copy()}


def edit_fields(d, fn):
    """Rewrite each codec field of the payload with ``fn(codec, field, values)``."""
    buf, offset, out = d[PAYLOAD_KEY].tobytes(), 0, []
    for line in spec_lines(d):
        codec, shape = parse_spec(np.frombuffer(line, np.uint8))
        for field, dtype, fshape in codec.layout(shape):
            n = np.dtype(dtype).itemsize * int(np.prod(fshape, dtype=np.int64))
            values = np.frombuffer(buf[offset:offset + n], dtype=np.dtype(dtype).newbyteorder("<")).reshape(fshape)
            out.append(np.asarray(fn(codec, field, values.copy()), dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
            offset += n
    return {**d, PAYLOAD_KEY: np.frombuffer(b"".join(out), np.uint8).copy()}


def scale_floats(factor):
    return lambda d: edit_fields(d, lambda c, f, v: (v * np.float32(factor)).astype(np.float32) if v.dtype.kind == "f" else v)


def set_field(name, value):
    return lambda d: edit_fields(d, lambda c, f, v: np.full_like(v, value) if f == name else v)


LG_ATTACKS = {
    # malformed codec headers
    "spec-not-ascii": ("qsgd:4", lambda d: set_spec(d, [b"\xff\xfe|||"] + spec_lines(d)[1:]), "malformed spec"),
    "spec-one-line-short": ("qsgd:4", lambda d: set_spec(d, spec_lines(d)[1:]), "declares"),
    "spec-one-line-extra": ("qsgd:4", lambda d: set_spec(d, spec_lines(d) + spec_lines(d)[:1]), "declares"),
    "spec-empty": ("qsgd:4", lambda d: set_spec(d, []), "declares"),
    "spec-bucket-2^27": ("qsgd:4", lambda d: set_spec(d, [line + b"bucket_size=134217728" for line in spec_lines(d)]), "options"),
    "spec-bucket-2^37": ("qsgd:4", lambda d: set_spec(d, [line + b"bucket_size=137438953472" for line in spec_lines(d)]), "options"),
    "spec-bucket-0": ("qsgd:4", lambda d: set_spec(d, [line + b"bucket_size=0" for line in spec_lines(d)]), "options"),
    "spec-unknown-option": ("qsgd:4", lambda d: set_spec(d, [line + b"evil=1" for line in spec_lines(d)]), "options"),
    "spec-shape-1e10-entries": ("qsgd:4", lambda d: set_spec(d, [b"qsgd:4|100000,100000|"] + spec_lines(d)[1:]), "shape"),
    "spec-negative-shape": ("qsgd:4", lambda d: set_spec(d, [b"qsgd:4|-1,-4|"] + spec_lines(d)[1:]), "negative"),
    "spec-other-bits": ("qsgd:4", lambda d: set_spec(d, [line.replace(b"qsgd:4", b"qsgd:16") for line in spec_lines(d)]), "asked for"),
    "spec-unknown-codec": ("qsgd:4", lambda d: set_spec(d, [line.replace(b"qsgd:4", b"evil:4") for line in spec_lines(d)]), "unknown codec"),
    "spec-over-512-bytes": ("qsgd:4", lambda d: set_spec(d, [spec_lines(d)[0] + b"," + b"1," * 300 + b"1"] + spec_lines(d)[1:]), "longer"),
    "spec-float-array": ("qsgd:4", lambda d: {**d, SPEC_KEY: d[SPEC_KEY].astype(np.float32)}, "uint8"),
    "payload-truncated": ("qsgd:4", lambda d: {**d, PAYLOAD_KEY: d[PAYLOAD_KEY][:-3].copy()}, "bytes"),
    "payload-padded": ("qsgd:4", lambda d: {**d, PAYLOAD_KEY: np.concatenate([d[PAYLOAD_KEY], np.zeros(64, np.uint8)])}, "bytes"),
    "payload-missing": ("qsgd:4", lambda d: {SPEC_KEY: d[SPEC_KEY]}, "lgreco-payload"),
    "extra-array": ("qsgd:4", lambda d: {**d, "evil": np.zeros(3, np.float32)}, "unexpected"),
    "uncompressed-arrays": ("qsgd:4", None, "unexpected"),
    # values
    "qsgd-norm-3e38": ("qsgd:4", set_field("norm", 3e38), "above"),
    "qsgd-norm-inf": ("qsgd:4", set_field("norm", np.inf), "non-finite"),
    "qsgd-norm-nan": ("qsgd:4", set_field("norm", np.nan), "non-finite"),
    "qsgd-norm-negative": ("qsgd:4", set_field("norm", -1.0), "negative"),
    "qsgd-level-beyond": ("qsgd:4", set_field("q", 0xFF), "level"),
    "powersgd-x1e19": ("powersgd:2", scale_floats(1e19), "above"),
    "powersgd-x1e3": ("powersgd:2", scale_floats(1e3), "product"),
    "powersgd-nan": ("powersgd:2", lambda d: edit_fields(d, lambda c, f, v: np.full_like(v, np.nan) if f == "p" else v), "non-finite"),
    "raw-x1e30": ("none", scale_floats(1e30), "above"),
    "topk-index-out-of-range": ("topk:0.2", lambda d: edit_fields(d, lambda c, f, v: np.where(np.arange(v.size) == v.size - 1, np.iinfo(v.dtype).max, v) if f == "idx" else v), "out of range"),
    "topk-index-unsorted": ("topk:0.2", lambda d: edit_fields(d, lambda c, f, v: v[::-1].copy() if f == "idx" else v), "increasing"),
    "sq-negative-step": ("sq:3", set_field("step", -1.0), "negative"),
    "lower-rank-U-only": ("qsgd:4", lambda d: _lower_rank_u_only(d), "shape"),
}


def _lower_rank_u_only(d):
    """A valid encoding of an update whose U alone claims rank 1 (a client of lower rank sends all
    three factors at its rank): the server fits the global to rank 1 and the shapes disagree."""
    names = sorted(["fc.lora_U", "fc.lora_S", "fc.lora_V", "head.weight", "head.bias"])
    shapes = [parse_spec(np.frombuffer(line, np.uint8))[1] for line in spec_lines(d)]
    update = {name: np.zeros(shape) for name, shape in zip(names, shapes)}
    update["fc.lora_U"] = np.zeros((update["fc.lora_U"].shape[0], 1))
    payload, _ = encode_update(update, {name: "qsgd:4" for name in names}, ErrorFeedback(seed=BAD))
    return payload


def lg_strategy(inner: str, default: str) -> LGreCo:
    return LGreCo(LG_INNER[inner][0](), default=default, allocate=False)


@pytest.mark.parametrize("inner", list(LG_INNER))
@pytest.mark.parametrize("attack", list(LG_ATTACKS))
def test_malformed_lgreco_payloads_are_rejected(inner, attack, flwr_log):
    default, mutate, needle = LG_ATTACKS[attack]
    groups = LG_INNER[inner][1]
    glob = lg_global(groups)
    honest = lambda: [lg_reply(n, lg_encode(glob, trained(glob, n), default, n), groups) for n in (1, 2, 3)]
    ref, _ = run_round(lg_strategy(inner, default), glob, honest())
    mine = trained(glob, BAD)
    bad = mine if mutate is None else mutate(lg_encode(glob, mine, default, BAD))
    flwr_log.clear()
    out, metrics = run_round(lg_strategy(inner, default), glob, honest() + [lg_reply(BAD, bad, groups)])
    assert same_arrays(ref, out), "a bad compressed reply changed the global model"
    assert metrics["lgreco-dropped"] + metrics["agg-clients-dropped"] == 1
    assert metrics["agg-clients-kept"] == 3
    lines = naming(flwr_log)
    assert lines and any(needle.lower() in line.lower() for line in lines), lines


@pytest.mark.parametrize("metrics", [{"num-examples": 1e30}, {"num-examples": float("nan")},
                                     {"num-examples": 100.0, **{f"k{i}": 1.0 for i in range(5000)}}],
                         ids=["weight-1e30", "weight-nan", "5000-keys"])
def test_lgreco_reply_with_bad_records_is_rejected(metrics, flwr_log):
    glob = lg_global()
    honest = lambda: [lg_reply(n, lg_encode(glob, trained(glob, n), "qsgd:4", n), 1) for n in (1, 2, 3)]
    ref, _ = run_round(lg_strategy("fedlowrank", "qsgd:4"), glob, honest())
    payload = lg_encode(glob, trained(glob, BAD), "qsgd:4", BAD)
    bad = message(BAD, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
                                   "metrics": MetricRecord(metrics)}))
    flwr_log.clear()
    out, result = run_round(lg_strategy("fedlowrank", "qsgd:4"), glob, honest() + [bad])
    assert same_arrays(ref, out) and result["agg-clients-kept"] == 3
    assert naming(flwr_log)


@pytest.mark.parametrize("attack", ["spec-shape-1e10-entries", "spec-bucket-2^37"])
def test_lgreco_declared_sizes_are_not_allocated(attack, flwr_log):
    default, mutate, _ = LG_ATTACKS[attack]
    glob = lg_global()
    replies = [lg_reply(n, lg_encode(glob, trained(glob, n), default, n), 1) for n in (1, 2, 3)]
    replies.append(lg_reply(BAD, mutate(lg_encode(glob, trained(glob, BAD), default, BAD)), 1))
    peak = _peak_of(lambda: run_round(lg_strategy("fedlowrank", default), glob, replies))
    assert naming(flwr_log)
    assert peak < 4 << 20


def _lowrank_local(glob: dict, seed: int = 7) -> dict:
    """An update that compresses well (rank one per tensor), the same for every honest site."""
    g = np.random.default_rng(seed)
    out = {}
    for k, v in glob.items():
        if k.endswith("lora_S"):
            out[k] = v.copy()
            continue
        cols = v.shape[1] if v.ndim > 1 else 1
        out[k] = (v + 0.05 * np.outer(g.normal(size=v.shape[0]), g.normal(size=cols)).reshape(v.shape)).astype(np.float32)
    return out


def _allocation(n_honest: int, poison=None) -> dict:
    glob = lg_global()
    strategy = LGreCo(FedLowRank(), default="powersgd:2", fallback_to_uniform=False)
    candidates = list(strategy.candidates)
    local = _lowrank_local(glob)
    replies = [lg_reply(n, lg_encode(glob, local, "powersgd:2", 0, candidates), 1) for n in range(1, n_honest + 1)]
    if poison is not None:
        replies.append(lg_reply(BAD, poison(lg_encode(glob, local, "powersgd:2", 0, candidates)), 1))
    _, metrics = run_round(strategy, glob, replies)
    return dict(strategy.settings), metrics


def _table_lies(d):
    """Claims that sending everything raw is free and every compressed setting is useless."""
    errors = np.full_like(d[ERRORS_KEY], 6e4)
    errors[:, 0] = 0
    return {**d, ERRORS_KEY: errors}


def test_one_poisoned_error_table_cannot_steer_the_allocation():
    honest, _ = _allocation(5)
    poisoned, metrics = _allocation(4, _table_lies)
    assert poisoned == honest
    assert metrics["agg-clients-kept"] == 5, "the poisoner's update itself is still aggregated"
    # The poison is real: averaged with a single honest table (no median), it changes the allocation.
    alone, _ = _allocation(1, _table_lies)
    assert alone != honest


@pytest.mark.parametrize("poison", [
    lambda d: {**d, ERRORS_KEY: np.full_like(d[ERRORS_KEY], np.nan)},
    lambda d: {**d, ERRORS_KEY: -np.ones_like(d[ERRORS_KEY])},
    lambda d: {**d, ENERGY_KEY: np.full_like(d[ENERGY_KEY], np.inf)},
    lambda d: {**d, ERRORS_KEY: np.zeros((2, 2), np.float16)},
    lambda d: {k: v for k, v in d.items() if k != ENERGY_KEY},
], ids=["nan", "negative", "inf-energy", "wrong-shape", "half-a-table"])
def test_malformed_error_tables_cost_the_table_not_the_update(poison, flwr_log):
    honest, _ = _allocation(5)
    flwr_log.clear()
    poisoned, metrics = _allocation(5, poison)
    assert metrics["agg-clients-kept"] == 6 and metrics["lgreco-dropped"] == 0
    assert poisoned == honest
    assert any("table" in line for line in naming(flwr_log))


# ---------------------------------------------------------------------- a whole run, in process
def _client_app(malicious: bool) -> ClientApp:
    """Nodes 1-3 train honestly; node 4 sends a different broken reply every round (or raises)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        node, rnd = context.node_id, int(msg.content["config"]["server-round"])
        glob = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        mine = trained(glob, node, round_=rnd)
        if node != 4:
            return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in mine.items()}),
                                               "metrics": MetricRecord({"num-examples": 100.0, "train-loss": 0.5})}), reply_to=msg)
        if not malicious:
            raise RuntimeError("node 4 is down")
        attack = {1: lambda: {k: (v * 1e15).astype(np.float32) for k, v in mine.items()},
                  2: lambda: {**mine, "head.bias": np.full(2, np.nan, np.float32)},
                  3: lambda: {**mine, "head.weight": raw_array(npy_header("<f4", (2 ** 38, 1024)))}}[rnd]()
        weight = {1: 100.0, 2: 1e30, 3: 100.0}[rnd]
        return Message(content=RecordDict({"arrays": ArrayRecord({k: as_array(v) for k, v in attack.items()}),
                                           "metrics": MetricRecord({"num-examples": weight, "train-loss": float("nan")})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        node = context.node_id
        if node == 4:
            if not malicious:
                raise RuntimeError("node 4 is down")
            metrics = {"num-examples": 1e30, "eval-loss": float("nan"), **{f"k{i}": 1.0 for i in range(5000)}}
        else:
            metrics = {"num-examples": 50.0, "eval-loss": 0.1 * node}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _run(malicious: bool, root: Path):
    random.seed(0)
    grid = InProcessGrid(_client_app(malicious), [{"partition-id": i} for i in range(4)], {})
    strategy = FedLowRank(robust="clip")
    return ckpt.run(strategy, grid, ArrayRecord({k: Array(v) for k, v in global_arrays().items()}), num_rounds=3,
                    checkpoint_dir=root)


def test_a_whole_run_with_a_malicious_site_equals_the_run_where_it_is_down(workdir, flwr_log):
    attacked_run = _run(True, workdir / "a")
    down_run = _run(False, workdir / "b")
    assert same_arrays(attacked_run.arrays, down_run.arrays)
    assert not same_arrays(attacked_run.arrays, ArrayRecord({k: Array(v) for k, v in global_arrays().items()})), "nothing trained"
    for rnd in (1, 2, 3):
        assert attacked_run.train_metrics_clientapp[rnd]["agg-clients-dropped"] == 1
        assert attacked_run.train_metrics_clientapp[rnd]["train-loss"] == pytest.approx(0.5)
        assert attacked_run.evaluate_metrics_clientapp[rnd]["eval-loss"] == pytest.approx(0.2)
    assert naming(flwr_log, 4)
    assert ckpt.load_checkpoint(workdir / "a").server_round == 3


# ------------------------------------------------------------------------------- checkpoints
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="adv-indep-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_checkpoint_key(monkeypatch):
    monkeypatch.delenv(ckpt.KEY_ENV, raising=False)
    monkeypatch.delenv(ckpt.KEY_FILE_ENV, raising=False)


def _save(root: Path, rnd: int, glob: dict | None = None) -> Path:
    glob = glob or global_arrays()
    record = ArrayRecord({k: Array(v) for k, v in glob.items()})
    result = Result()
    result.arrays = record
    return ckpt.save_checkpoint(root, rnd, record, FedLowRank(), result)


def _rehash(folder: Path, keep_signature: bool = True) -> None:
    """What a forger without the key can do: recompute every checksum in the manifest."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for name in ckpt.FILES:
        manifest[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    if not keep_signature:
        manifest.pop(ckpt.SIGNATURE, None)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def _write_npz(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _poison_arrays(folder: Path) -> None:
    arrays = {k: (v * 1e5).astype(np.float32) for k, v in global_arrays().items()}
    _write_npz(folder / "arrays.npz", {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()})


@pytest.mark.parametrize("keep_signature", [True, False], ids=["stale-signature", "signature-removed"])
def test_tampered_arrays_with_recomputed_manifest_are_refused_under_a_key(workdir, monkeypatch, keep_signature):
    monkeypatch.setenv(ckpt.KEY_ENV, KEY)
    _save(workdir, 2)
    last = _save(workdir, 3)
    _poison_arrays(last)
    _rehash(last, keep_signature)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(workdir)
    text = str(info.value)
    assert "MANIFEST.json" in text and ("signature" in text or "not signed" in text)
    assert "round-000003" in text and "round-000002" in text  # the refused one and the one to use
    with pytest.raises(ckpt.CheckpointError):  # the ServerApp's loop refuses it too
        ckpt.run(FedLowRank(), None, ArrayRecord({k: Array(v) for k, v in global_arrays().items()}), 4, resume_from=workdir)
    good = ckpt.load_checkpoint(workdir / "round-000002")
    assert np.array_equal(good.arrays["head.weight"].numpy(), global_arrays()["head.weight"])


def test_checkpoint_written_without_key_is_refused_when_a_key_is_set(workdir, monkeypatch):
    _save(workdir, 2)
    monkeypatch.setenv(ckpt.KEY_ENV, KEY)
    with pytest.raises(ckpt.CheckpointError, match="not signed"):
        ckpt.load_checkpoint(workdir)


def test_short_key_is_refused(workdir, monkeypatch):
    monkeypatch.setenv(ckpt.KEY_ENV, "short")
    with pytest.raises(ckpt.CheckpointError, match="16"):
        _save(workdir, 1)


def test_checkpoint_of_another_rank_is_refused_naming_the_difference(workdir):
    _save(workdir, 2, global_arrays(rank=4))
    other = ArrayRecord({k: Array(v) for k, v in global_arrays(rank=2).items()})
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.run(FedLowRank(), None, other, 4, resume_from=workdir)
    text = str(info.value)
    assert "another run" in text and "fc.lora_U" in text and "[8, 4]" in text and "[8, 2]" in text


def test_checkpoint_of_another_rule_is_refused(workdir):
    _save(workdir, 2)
    with pytest.raises(ckpt.CheckpointError, match="fedit"):
        ckpt.run(FedLowRank(rule="fedit"), None, ArrayRecord({k: Array(v) for k, v in global_arrays().items()}), 4,
                 resume_from=workdir)


def _refusal_and_peak(workdir):
    """The CheckpointError loading ``workdir`` raises, and tracemalloc's peak while it loads."""
    box = {}

    def load():
        try:
            ckpt.load_checkpoint(workdir)
        except ckpt.CheckpointError as err:
            box["err"] = err
    peak = _peak_of(load)
    return box.get("err"), peak


def test_zip_bomb_is_refused_before_inflating(workdir):
    _save(workdir, 2)
    last = _save(workdir, 3)
    expanded = 256 << 20
    zeros = bytes(16 << 20)
    with zipfile.ZipFile(last / "arrays.npz", "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("fc.lora_U.npy", "w", force_zip64=True) as member:
        member.write(npy_header("<f4", (expanded // 4,)))
        for _ in range(expanded // len(zeros)):
            member.write(zeros)
    size = (last / "arrays.npz").stat().st_size
    assert size < expanded // 100  # a small file that expands hugely
    _rehash(last)
    err, peak = _refusal_and_peak(workdir)
    assert "compressed" in str(err) and "fc.lora_U.npy" in str(err)
    assert peak < 4 * size + (1 << 20), (peak, size)


def test_npy_header_declaring_1TiB_in_a_checkpoint_is_refused(workdir):
    _save(workdir, 2)
    last = _save(workdir, 3)
    _write_npz(last / "arrays.npz", {"fc.lora_U.npy": npy_header("<f4", (2 ** 38,)) + bytes(16)})
    _rehash(last)
    err, peak = _refusal_and_peak(workdir)
    assert "declares" in str(err) and "fc.lora_U.npy" in str(err)
    assert peak < 1 << 20


def test_stored_member_declaring_more_than_the_file_is_refused(workdir):
    """A STORED member whose central directory claims 4 GiB (compress_size = file_size, so it
    looks uncompressed) in a file of a few hundred bytes: refused from the directory, nothing read."""
    _save(workdir, 2)
    last = _save(workdir, 3)
    _write_npz(last / "arrays.npz", {"fc.lora_U.npy": npy_bytes(global_arrays()["fc.lora_U"])})
    data = bytearray((last / "arrays.npz").read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 20:central + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2  # compressed and uncompressed sizes
    (last / "arrays.npz").write_bytes(bytes(data))
    _rehash(last)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(workdir)
    text = str(info.value)
    assert "round-000003" in text and "fc.lora_U.npy" in text and "declared" in text


def test_malformed_round_folders_are_never_resume_targets(workdir):
    _save(workdir, 2)
    for name in ("round-abc", "round-12", "round-0000009", "round-000009.bak", "round-00000x", ".round-000009.tmp-42"):
        (workdir / name).mkdir()
    (workdir / "round-000009.bak" / "MANIFEST.json").write_text("{}")
    assert ckpt.latest(workdir).name == "round-000002"
    assert ckpt.load_checkpoint(workdir).server_round == 2
    for name in ("round-abc", "round-0000009", "round-000009.bak"):
        with pytest.raises(ckpt.CheckpointError, match="not a round folder"):
            ckpt.load_checkpoint(workdir / name)


def test_stale_round_999999_copy_is_refused_and_names_the_real_one(workdir):
    good = _save(workdir, 2)
    shutil.copytree(good, workdir / "round-999999")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(workdir)
    text = str(info.value)
    assert "round 2" in text and "round-999999" in text and "stale" in text
    assert text.endswith("round-000002")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.run(FedLowRank(), None, ArrayRecord({k: Array(v) for k, v in global_arrays().items()}), 4, resume_from=workdir)


def test_round_folder_that_is_a_link_or_a_file_is_refused(workdir):
    good = _save(workdir, 2)
    os.symlink(good, workdir / "round-000007")
    with pytest.raises(ckpt.CheckpointError, match="link"):
        ckpt.load_checkpoint(workdir)
    os.unlink(workdir / "round-000007")
    (workdir / "round-000005").write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match="round-000005"):
        ckpt.load_checkpoint(workdir)


@pytest.mark.parametrize("round_value", ["two", 2.0, -1, None, True, 10 ** 30])
def test_meta_round_that_is_not_a_round_number_is_refused(workdir, round_value):
    last = _save(workdir, 2)
    meta = json.loads((last / "meta.json").read_text())
    meta["round"] = round_value
    (last / "meta.json").write_text(json.dumps(meta))
    _rehash(last)
    with pytest.raises(ckpt.CheckpointError, match="round"):
        ckpt.load_checkpoint(workdir)


def test_previous_checkpoint_hint_names_a_real_checkpoint(workdir):
    _save(workdir, 2)
    last = _save(workdir, 3)
    (last / "arrays.npz").write_bytes((last / "arrays.npz").read_bytes()[:-10])  # truncated
    (workdir / "round-000002.bak").mkdir()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(workdir)
    assert str(info.value).endswith("round-000002"), str(info.value)


def test_negative_npy_dimensions_in_a_reply_are_named(flwr_log):
    bad = attacked(replace("head.weight", raw_array(npy_header("<f4", (-2, -D_OUT)) + bytes(4 * 2 * D_OUT))))
    assert_rejected("fedlowrank", bad, flwr_log, "head.weight")


def test_negative_npy_dimensions_in_a_checkpoint_are_named(workdir):
    _save(workdir, 2)
    last = _save(workdir, 3)
    _write_npz(last / "arrays.npz", {"fc.lora_U.npy": npy_header("<f4", (-2, -2)) + bytes(16)})
    _rehash(last)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(workdir)
    assert "fc.lora_U" in str(info.value), str(info.value)


def test_one_poisoned_error_table_of_three_cannot_steer_the_allocation():
    """The issue's case: two honest sites and one liar (the median of three)."""
    honest, _ = _allocation(3)
    poisoned, metrics = _allocation(2, _table_lies)
    assert poisoned == honest and metrics["agg-clients-kept"] == 3
