"""Codecs: round trips, exact byte counts, error estimates, payload validation."""

import numpy as np
import pytest

from fedlowrank.compression import (
    Codec,
    PowerSGDCodec,
    QSGDCodec,
    TopKCodec,
    candidate_key,
    decode_update,
    get_codec,
    make_spec,
    parse_spec,
    payload_nbytes,
    register_codec,
    registered_codecs,
)

CANDIDATES = [
    "none", "powersgd:1", "powersgd:4", "topk:0.05", "topk:1.0",
    "qsgd:2", "qsgd:3", "qsgd:4", "qsgd:5", "qsgd:7", "qsgd:8", "qsgd:12", "qsgd:16",
    "sq:1", "sq:2", "sq:3", "sq:5", "sq:8",
]
# Odd value counts (17, 5, 1, 7, 3) leave a partly filled last byte at most bit widths.
SHAPES = [(30, 20), (8, 3, 3, 3), (17,), (), (1, 5), (64, 2), (7, 3)]


@pytest.mark.parametrize("cand", CANDIDATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_produces_exactly_the_declared_layout(cand, shape):
    codec = get_codec(cand)
    payload = codec.encode(np.random.default_rng(1).standard_normal(shape), state={}, rng=np.random.default_rng(0))
    assert [(k, v.dtype, v.shape) for k, v in payload.items()] == [(n, np.dtype(d), tuple(s)) for n, d, s in codec.layout(shape)]


@pytest.mark.parametrize("cand", CANDIDATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_shape_dtype_and_exact_bytes(cand, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    codec = get_codec(cand)
    payload = codec.encode(x, state={}, rng=rng)
    assert all(isinstance(a, np.ndarray) for a in payload.values())
    assert payload_nbytes(payload) == sum(a.nbytes for a in payload.values())
    out = codec.decode(payload, shape)
    assert out.shape == x.shape and out.dtype == np.float32
    # The server's closed form is the real payload size (the size table relies on it).
    assert codec.encoded_size(shape) == payload_nbytes(payload)
    # The default estimate is a trial encode: its size is the real one.
    err, size = codec.estimate(x, state={}, rng=np.random.default_rng(0))
    assert size == payload_nbytes(payload)
    assert err >= 0


def test_sizes_match_the_documented_formulas():
    x = np.ones((30, 20))
    assert payload_nbytes(get_codec("none").encode(x)) == 600 * 4
    assert payload_nbytes(get_codec("powersgd:4").encode(x, rng=np.random.default_rng(0))) == (30 + 20) * 4 * 4
    # 30 kept of 600 entries: uint16 index + float32 value each.
    assert payload_nbytes(get_codec("topk:0.05").encode(x)) == 30 * 6
    # Levels packed at exactly `bits` bits per value, plus two float32 norms (512-buckets).
    for bits, packed in [(2, 150), (3, 225), (4, 300), (6, 450), (8, 600), (12, 900), (16, 1200)]:
        q = get_codec(f"qsgd:{bits}").encode(x, rng=np.random.default_rng(0))
        assert q["q"].dtype == np.uint8 and payload_nbytes(q) == packed + 2 * 4, bits
    # 7 values at 3 bits = 21 bits -> 3 bytes.
    assert get_codec("qsgd:3").encoded_size((7,)) == 3 + 4
    per_tensor = QSGDCodec(4, bucket_size=0).encode(x, rng=np.random.default_rng(0))
    assert per_tensor["norm"].shape == (1,)


def test_none_is_lossless_for_float32():
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    codec = get_codec(("none", None))
    np.testing.assert_array_equal(codec.decode(codec.encode(x), x.shape), x)


def test_powersgd_exact_on_low_rank_and_falls_back_to_raw():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    codec = PowerSGDCodec(3)
    out = codec.decode(codec.encode(x, state={}, rng=rng), x.shape)
    np.testing.assert_allclose(out, x, atol=1e-4)
    # 1-D tensors and tensors whose factors would not be smaller travel raw.
    assert set(codec.encode(np.ones(9))) == {"raw"}
    assert set(PowerSGDCodec(4).encode(np.ones((64, 4)))) == {"raw"}


def test_powersgd_warm_start_converges_to_the_svd_tail():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    s = 0.7 ** np.arange(40)
    x = (u[:, :40] * s) @ v.T
    codec, state = PowerSGDCodec(4), {}
    tail, size = codec.estimate(x)
    np.testing.assert_allclose(tail, np.sum(s[4:] ** 2), rtol=1e-8)
    assert size == (50 + 40) * 4 * 4
    errs = []
    for _ in range(15):
        out = codec.decode(codec.encode(x, state=state, rng=rng), x.shape)
        errs.append(np.sum((x - out) ** 2))
    # One power iteration is never better than the best rank-k; warm starts approach it.
    assert min(errs) >= tail * (1 - 1e-4)
    assert errs[-1] < errs[0] and errs[-1] < tail * 1.05
    assert state["q"].shape == (40, 4)


def test_powersgd_reinitialises_q_when_the_rank_changes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 20))
    state = {}
    PowerSGDCodec(2).encode(x, state=state, rng=rng)
    PowerSGDCodec(5).encode(x, state=state, rng=rng)
    assert state["q"].shape == (20, 5)


def test_topk_keeps_the_largest_entries_and_estimates_exactly():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((25, 16))
    codec = TopKCodec(0.1)
    payload = codec.encode(x)
    k = codec.num_kept(x.size)
    # 400 entries: uint16 indices (uint8 would wrap).
    assert payload["idx"].dtype == np.uint16 and len(payload["idx"]) == k == 40
    kept = np.sort(np.abs(x).ravel())[-k:]
    np.testing.assert_allclose(np.sort(np.abs(payload["val"])), kept, rtol=1e-6)
    out = codec.decode(payload, x.shape)
    err, size = codec.estimate(x)
    np.testing.assert_allclose(err, np.sum((x - out) ** 2), rtol=1e-5)
    assert size == payload_nbytes(payload)


@pytest.mark.parametrize("size, dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_topk_indices_use_the_smallest_type_that_reaches_the_last_entry(size, dtype):
    x = np.zeros(size)
    x[-1] = 5.0  # the last index must survive the cast
    codec = TopKCodec(1 / size)
    payload = codec.encode(x)
    assert payload["idx"].dtype == dtype and payload["idx"][0] == size - 1
    assert codec.encoded_size((size,)) == payload_nbytes(payload) == np.dtype(dtype).itemsize + 4
    assert codec.decode(payload, (size,))[-1] == 5.0
    wide = dict(payload, idx=payload["idx"].astype(np.int32))
    with pytest.raises(ValueError, match="'idx'"):
        codec.decode(wide, (size,))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qsgd_is_unbiased_and_seeded(bits):
    x = np.random.default_rng(6).standard_normal(301)  # odd count: a partial last byte
    codec = get_codec(f"qsgd:{bits}")
    a = codec.encode(x, rng=np.random.default_rng(9))
    b = codec.encode(x, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a["q"], b["q"])
    rng = np.random.default_rng(7)
    mean = np.mean([codec.decode(codec.encode(x, rng=rng), x.shape) for _ in range(2000)], axis=0)
    # 2 bits = levels {-1, 0, 1}: a coarse, high-variance but unbiased codec.
    assert np.max(np.abs(mean - x)) < 0.15
    assert abs(np.mean(mean - x)) < 0.01


def test_qsgd_l2_norm_variant_round_trips():
    x = np.random.default_rng(8).standard_normal((10, 10))
    codec = QSGDCodec(8, bucket_size=32, norm="l2")
    spec_codec, shape = parse_spec(make_spec(codec, x.shape))
    assert spec_codec == codec and shape == x.shape
    out = spec_codec.decode(codec.encode(x, rng=np.random.default_rng(0)), shape)
    assert np.sum((out - x) ** 2) < 0.1 * np.sum(x**2)


# -- validation ----------------------------------------------------------------
def _payload(cand, shape=(12, 10)):
    # 120 values: 60 bytes at 4 bits; 360 bits at 3 bits fill 45 bytes exactly, so
    # the qsgd:3 padding case uses its own odd shape below.
    if cand in ("qsgd:3", "sq:3"):
        shape = (7, 3)
    x = np.random.default_rng(10).standard_normal(shape)
    codec = get_codec(cand)
    return codec, codec.encode(x, state={}, rng=np.random.default_rng(0)), shape


@pytest.mark.parametrize(
    "cand, mutate, match",
    [
        ("topk:0.1", lambda p: p.update(idx=p["idx"].astype(np.int64)), "dtype"),
        ("topk:0.1", lambda p: p["idx"].__setitem__(-1, 120), "out of range"),
        ("topk:0.1", lambda p: p["idx"].__setitem__(1, p["idx"][0]), "increasing"),
        ("topk:0.1", lambda p: p.update(val=p["val"][:-1]), "shape"),
        ("powersgd:2", lambda p: p.update(p=p["p"][:, :1]), "shape"),
        ("powersgd:2", lambda p: p.update(q=np.zeros((10, 3), np.float32)), "shape"),
        ("powersgd:2", lambda p: p.pop("q"), "fields"),
        ("powersgd:2", lambda p: p["p"].__setitem__((0, 0), np.nan), "non-finite"),
        ("qsgd:4", lambda p: p.update(q=p["q"].astype(np.int16)), "'q'.*dtype"),
        ("qsgd:4", lambda p: p.update(q=p["q"][:-1]), "'q'.*59 packed bytes, expected 60.*bits mismatch"),
        ("qsgd:4", lambda p: p.update(q=np.concatenate([p["q"], p["q"]])), "'q'.*bits mismatch"),
        ("qsgd:4", lambda p: p["q"].__setitem__(0, 0xFF), "'q'.*level beyond \\+-7"),
        ("qsgd:3", lambda p: p["q"].__setitem__(-1, p["q"][-1] | 1), "'q'.*padding"),
        ("qsgd:4", lambda p: p.update(norm=np.zeros(3, np.float32)), "'norm'.*shape"),
        ("qsgd:4", lambda p: p["norm"].__setitem__(0, -1.0), "'norm'.*negative"),
        ("sq:4", lambda p: p.update(q=p["q"][:-1]), "'q'.*bits mismatch"),
        ("sq:3", lambda p: p["q"].__setitem__(-1, p["q"][-1] | 1), "'q'.*padding"),
        ("sq:4", lambda p: p.update(step=p["step"].astype(np.float64)), "'step'.*dtype"),
        ("sq:4", lambda p: p["step"].__setitem__(0, -1.0), "'step'.*negative"),
        ("sq:4", lambda p: p["step"].__setitem__(0, np.inf), "'step'.*non-finite"),
        ("sq:4", lambda p: p.update(norm=p.pop("step")), "fields"),
        ("none", lambda p: p.update(extra=np.zeros(1)), "fields"),
        ("none", lambda p: p.update(raw=p["raw"].astype(np.float64)), "dtype"),
    ],
)
def test_decode_rejects_payloads_that_do_not_match(cand, mutate, match):
    codec, payload, shape = _payload(cand)
    mutate(payload)
    with pytest.raises(ValueError, match=match):
        codec.decode(payload, shape)


def test_decoding_with_another_setting_fails():
    _, payload, shape = _payload("powersgd:2")
    with pytest.raises(ValueError):
        get_codec("powersgd:3").decode(payload, shape)
    _, payload, shape = _payload("qsgd:4")
    with pytest.raises(ValueError, match="bits"):
        get_codec("qsgd:12").decode(payload, shape)


@pytest.mark.parametrize("bad", ["zip:3", "powersgd:x", "powersgd:0", "topk:0", "topk:1.5", "qsgd:1", "qsgd:17", "sq:0", "sq:9", "none:3"])
def test_bad_candidates_raise(bad):
    with pytest.raises(ValueError):
        get_codec(bad)


def test_spec_leaves_out_default_options_and_round_trips():
    # Defaults are implied: the spec is what travels with every tensor.
    default = get_codec("qsgd:4")
    assert make_spec(default, (64, 8)).tobytes() == b"qsgd:4|64,8|"
    assert parse_spec(make_spec(default, (64, 8))) == (default, (64, 8))
    custom = QSGDCodec(4, bucket_size=128)
    assert make_spec(custom, (3,)).tobytes() == b"qsgd:4|3|bucket_size=128"
    assert parse_spec(make_spec(custom, (3,)))[0] == custom
    with pytest.raises(ValueError, match="options"):
        parse_spec(np.frombuffer(b"qsgd:4|3|bucket=128", dtype=np.uint8))


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="Malformed"):
        parse_spec(np.frombuffer(b"powersgd:4|12,x|", dtype=np.uint8))
    with pytest.raises(ValueError, match="Unknown codec"):
        parse_spec(np.frombuffer(b"zip:4|12|", dtype=np.uint8))
    with pytest.raises(ValueError, match="options"):
        parse_spec(np.frombuffer(b"topk:0.5|12|bucket_size=3", dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        parse_spec(np.zeros(3, dtype=np.int8))


def _update(settings, shapes, seed=0):
    from fedlowrank.compression import ErrorFeedback, encode_update

    rng = np.random.default_rng(seed)
    update = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return encode_update(update, settings, ErrorFeedback())[0]


def _with_spec_line(payload, index, line):
    lines = payload["lgreco-spec"].tobytes().split(b"\n")
    lines[index] = line
    return {**payload, "lgreco-spec": np.frombuffer(b"\n".join(lines), dtype=np.uint8).copy()}


def test_update_travels_as_two_arrays_whose_bytes_are_the_codec_sizes():
    shapes = {"a": (16, 8), "b": (30,), "c": (7, 3)}
    settings = {"a": "powersgd:2", "b": "topk:0.1", "c": "sq:3"}
    payload = _update(settings, shapes)
    assert set(payload) == {"lgreco-spec", "lgreco-payload"}
    assert payload["lgreco-spec"].tobytes() == b"powersgd:2|16,8|\ntopk:0.1|30|\nsq:3|7,3|"
    assert payload["lgreco-payload"].size == sum(get_codec(settings[k]).encoded_size(shapes[k]) for k in shapes)
    decoded = decode_update(payload, shapes, settings)
    assert {k: v.shape for k, v in decoded.items()} == shapes


def test_decode_update_names_the_bad_tensor():
    shapes = {"v": (4,), "w": (3,)}
    settings = {"v": "none", "w": "none"}
    payload = _update(settings, shapes)
    with pytest.raises(ValueError, match="'lgreco-spec'"):
        decode_update({"lgreco-payload": payload["lgreco-payload"]}, shapes)
    with pytest.raises(ValueError, match="'w'.*shape"):
        decode_update(_with_spec_line(payload, 1, b"none|4|"), shapes)
    with pytest.raises(ValueError, match="'w'.*declares 'qsgd:4'.*asked for 'none'"):
        decode_update(_with_spec_line(payload, 1, b"qsgd:4|3|"), shapes, settings)
    with pytest.raises(ValueError, match="'v'.*Unknown codec"):
        decode_update(_with_spec_line(payload, 0, b"zip:3|4|"), shapes)
    with pytest.raises(ValueError, match="declares 2 tensors, the global model has 3"):
        decode_update(payload, {**shapes, "x": (1,)})
    with pytest.raises(ValueError, match="holds 24 bytes, the specs declare 28"):
        decode_update({**payload, "lgreco-payload": payload["lgreco-payload"][:-4]}, shapes)


def test_registry_and_candidate_keys():
    assert {"none", "powersgd", "topk", "qsgd"} <= set(registered_codecs())
    assert candidate_key(("powersgd", 4)) == "powersgd:4"
    assert candidate_key(("topk", 0.05)) == "topk:0.05"
    assert candidate_key(("none", None)) == "none"
    assert get_codec("qsgd:4") == get_codec(("qsgd", 4))

    @register_codec("test-sign")
    class SignCodec(Codec):
        def encode(self, x, *, state=None, rng=None):
            return {"s": np.signbit(np.asarray(x)).astype(np.uint8)}

        def decode(self, payload, shape):
            self._expect_fields(payload, {"s"})
            s = self._expect_array(payload, "s", np.uint8, tuple(shape))
            return np.where(s, -1.0, 1.0).astype(np.float32)

        def layout(self, shape):
            return [("s", np.dtype(np.uint8), tuple(shape))]

    assert get_codec("test-sign").decode(get_codec("test-sign").encode(-np.ones(3)), (3,)).tolist() == [-1, -1, -1]
    assert get_codec("test-sign").encoded_size((3,)) == 3
    with pytest.raises(ValueError, match="already registered"):
        register_codec("test-sign")(type("Other", (SignCodec,), {}))
    with pytest.raises(ValueError, match="Invalid codec name"):
        register_codec("a:b")


def test_core_does_not_import_flower():
    import subprocess
    import sys

    code = "import sys, fedlowrank.compression; assert not any(m.split('.')[0] == 'flwr' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("count", [40, 7, 1])
def test_qsgd_rejects_the_one_unused_code(bits, count):
    """Offset-binary at `bits` bits can say 2^bits - 1 = level s + 1, which is no level."""
    from fedlowrank.compression.qsgd import pack_levels, unpack_levels

    codec = get_codec(f"qsgd:{bits}")
    x = np.linspace(-1, 1, count)
    payload = codec.encode(x, rng=np.random.default_rng(0))
    offset = unpack_levels(payload["q"], count, bits)
    assert offset.max() <= 2 * codec.levels and len(offset) == count
    np.testing.assert_array_equal(pack_levels(offset, bits), payload["q"])
    offset[count // 2] = (1 << bits) - 1
    payload["q"] = pack_levels(offset, bits)
    with pytest.raises(ValueError, match="level beyond.*bits mismatch"):
        codec.decode(payload, (count,))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_pack_levels_round_trips_every_code(bits):
    from fedlowrank.compression.qsgd import pack_levels, unpack_levels

    rng = np.random.default_rng(bits)
    for count in (0, 1, 3, 7, 9, 1000):
        values = rng.integers(0, 1 << bits, size=count)
        if count >= 2:
            values[:2] = (0, (1 << bits) - 1)  # both extremes
        packed = pack_levels(values, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
        np.testing.assert_array_equal(unpack_levels(packed, count, bits), values)
    with pytest.raises(ValueError, match="\\[0, "):
        pack_levels(np.array([1 << bits]), bits)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_levels(np.zeros(2, np.uint8), 100, bits)


def test_qsgd_8bit_payload_declared_as_4_bits_is_rejected_on_the_wire():
    """A spec that says qsgd:4 over 8-bit levels fails in decode_update, not silently."""
    shapes = {"w": (8, 8)}
    payload = _update({"w": "qsgd:8"}, shapes)
    assert payload["lgreco-payload"].size == 64 + 4  # one byte per value at 8 bits, one norm
    with pytest.raises(ValueError, match="holds 68 bytes, the specs declare 36"):
        decode_update(_with_spec_line(payload, 0, b"qsgd:4|8,8|"), shapes)
    # The other way round: 4-bit levels declared as 8 bits are half the bytes.
    payload = _update({"w": "qsgd:4"}, shapes)
    with pytest.raises(ValueError, match="holds 36 bytes, the specs declare 68"):
        decode_update(_with_spec_line(payload, 0, b"qsgd:8|8,8|"), shapes)
    # Same length, other codec (sq:4 declared over qsgd:4 fields): the server's settings catch it.
    with pytest.raises(ValueError, match="'w'.*declares 'sq:4'.*asked for 'qsgd:4'"):
        decode_update(_with_spec_line(payload, 0, b"sq:4|8,8|"), shapes, {"w": "qsgd:4"})
