"""Wire format of a compressed model update (client encode, server decode).

Plain ``dict[str, np.ndarray]`` and ``dict[str, str]`` only, so the core stays
free of Flower; ``fedlowrank.strategies.lgreco`` puts these dicts into
``ArrayRecord``/``ConfigRecord`` unchanged.

Server -> client (config entries)
    ``"lgreco.<tensor>" -> "<codec>:<setting>"`` for every tensor of the
    global arrays (e.g. ``"powersgd:4"``, ``"topk:0.05"``, ``"qsgd:4"``,
    ``"none"``), and, in rounds whose tables the server will use,
    ``"lgreco-candidates" -> [candidate strings]`` (the table columns).

Client -> server (arrays)
    The update (local minus the round's global arrays, plus the
    error-feedback residual) travels as two uint8 arrays, whatever the number
    of tensors, covering every tensor in sorted-name order:

    * ``"lgreco-spec"``: ASCII, one line per tensor,
      ``"<codec>:<setting>|<shape>|<opts>"`` (shape as comma-separated ints,
      opts as ``k=v`` pairs joined by ``;``, only those that differ from the
      codec's defaults), e.g. ``"qsgd:4|64,8|"``, lines joined by ``"\n"``;
    * ``"lgreco-payload"``: the codec fields of every tensor, in spec order,
      each tensor's fields in its codec's :meth:`Codec.layout` order, as raw
      little-endian bytes.

    Names do not travel: the server matches the lines to the names of the
    global arrays it sent (sorted), as it does the table rows. Why one
    stream: Flower serialises every ``Array`` with its own ``.npy`` header,
    dtype, shape and key (about 150 bytes), so with one array per codec field
    an 8-tensor update of a few hundred payload bytes cost several kilobytes on
    the wire; packed, it costs its payload plus two headers.

    If candidates were asked for, also the tables, rows in sorted tensor-name
    order:

    * ``"lgreco-errors"``: float16 ``(num_tensors, num_candidates)``, the
      *relative* squared error ``||x - decode(C(x))||^2 / ||x||^2`` of every
      candidate on ``x = update + residual`` (0 where ``x = 0``), rounded up
      to the next float16, columns in the order the server sent them;
    * ``"lgreco-energy"``: float32 ``(num_tensors, 2)``, ``||update||^2`` and
      ``||update + residual||^2`` per tensor (what the server needs to predict
      the error a setting settles at under error feedback, see
      :func:`fedlowrank.compression.feedback_errors`).

    No size table travels: every codec's encoded size is an exact function of
    the tensor's shape and the setting (:meth:`Codec.encoded_size`), so the
    server computes it from the global shapes (:func:`size_table`). Errors
    travel relative to ``||x||^2`` (which travels in float32 with the
    energies), so they lie in a range float16 holds well; its relative
    precision (5e-4, rounded up so no setting looks better than it is) is
    finer than the allocator's error bins (1/1000 of the budget). Together
    this cuts the tables from 16 to 2 bytes per (tensor, candidate) plus 8
    per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .codec import Codec, _lookup, candidate_key, get_codec
from .error_feedback import ErrorFeedback

SPEC_KEY = "lgreco-spec"
PAYLOAD_KEY = "lgreco-payload"
ERRORS_KEY = "lgreco-errors"
ENERGY_KEY = "lgreco-energy"
SETTING_PREFIX = "lgreco."
CANDIDATES_KEY = "lgreco-candidates"
_MAX_SPEC_BYTES = 512


# -- per-tensor spec -------------------------------------------------------
def make_spec(codec: Codec, shape: Sequence[int]) -> np.ndarray:
    """The uint8 spec array that tells the server how to decode one tensor.

    Options equal to the codec's defaults are left out (the decoder fills them
    in): the spec travels with every tensor of every reply, and on a small
    model the default options alone were a third of a QSGD update's bytes.
    """
    defaults = type(codec)(codec.setting).options()
    opts = ";".join(f"{k}={int(v)}" for k, v in sorted(codec.options().items()) if defaults.get(k) != v)
    text = f"{codec.key}|{','.join(str(int(s)) for s in shape)}|{opts}"
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).copy()


def parse_spec(spec: np.ndarray) -> tuple[Codec, tuple[int, ...]]:
    """Inverse of :func:`make_spec`; raises ``ValueError`` on a malformed spec."""
    if not isinstance(spec, np.ndarray) or spec.dtype != np.uint8 or spec.ndim != 1:
        raise ValueError("Spec must be a 1-D uint8 array.")
    if spec.size > _MAX_SPEC_BYTES:
        raise ValueError(f"Spec longer than {_MAX_SPEC_BYTES} bytes.")
    try:
        text = spec.tobytes().decode("ascii")
        key, shape_text, opts_text = text.split("|")
        shape = tuple(int(s) for s in shape_text.split(",")) if shape_text else ()
        options = dict(_parse_option(o) for o in opts_text.split(";")) if opts_text else {}
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"Malformed spec {spec.tobytes()[:80]!r}: {err}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"Negative dimension in spec shape {shape}.")
    name, _, setting_text = key.partition(":")
    cls = _lookup(name)
    setting = cls.parse_setting(setting_text) if setting_text else None
    return cls.from_options(setting, options), shape


def _parse_option(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"option {text!r} is not k=v")
    return name, int(value)


# -- client side -----------------------------------------------------------
def encode_update(
    update: Mapping[str, np.ndarray],
    settings: Mapping[str, str],
    ef: ErrorFeedback,
    *,
    candidates: Sequence[str] | None = None,
    end_round: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Compress an update with error feedback; optionally measure candidates.

    Parameters
    ----------
    update : mapping of str to np.ndarray
        Local arrays minus the round's global arrays, per tensor.
    settings : mapping of str to str
        Candidate string per tensor (from :func:`settings_from_config`).
        Every tensor of ``update`` needs one; extra entries are ignored.
    ef : ErrorFeedback
        This client's error-feedback state; updated in place.
    candidates : sequence of str, optional
        If given, the error/size tables are measured on ``update + residual``
        before compression.
    end_round : bool, default True
        Advance ``ef``'s round counter afterwards.

    Returns
    -------
    payload : dict[str, np.ndarray]
        ``"lgreco-spec"`` and ``"lgreco-payload"`` (see module docstring).
    tables : dict[str, np.ndarray]
        ``{ERRORS_KEY: float16 ratios, ENERGY_KEY: float32}``, or empty
        without candidates.

    Raises
    ------
    ValueError
        If a tensor has no setting, or a setting is not a valid candidate.
    """
    names = sorted(update)
    missing = [n for n in names if n not in settings]
    if missing:
        raise ValueError(f"No compression setting for tensors {missing[:5]} (of {len(missing)}).")
    tables: dict[str, np.ndarray] = {}
    if candidates is not None:
        # Sizes are not sent: the server derives them from the shapes.
        errors = np.array([ef.tables(n, update[n], candidates)[0] for n in names], dtype=np.float64)
        energy = np.array(
            [
                (float(np.sum(np.asarray(update[n], dtype=np.float64) ** 2)), float(np.sum(ef.compensated(n, update[n]) ** 2)))
                for n in names
            ],
            dtype=np.float64,
        ).reshape(len(names), 2)
        tables[ERRORS_KEY] = relative_errors(errors.reshape(len(names), len(candidates)), energy[:, 1])
        tables[ENERGY_KEY] = energy.astype(np.float32)
    specs, chunks = [], []
    for name in names:
        codec = ef.codec(settings[name])
        fields, _ = ef.compress(name, update[name], codec)
        specs.append(make_spec(codec, np.shape(update[name])))
        chunks.extend(_little_endian(fields[field]) for field, _, _ in codec.layout(np.shape(update[name])))
    if end_round:
        ef.end_round()
    payload = {
        SPEC_KEY: np.frombuffer(b"\n".join(spec.tobytes() for spec in specs), dtype=np.uint8).copy(),
        PAYLOAD_KEY: np.frombuffer(b"".join(chunks), dtype=np.uint8).copy(),
    }
    return payload, tables


def _little_endian(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def relative_errors(errors: np.ndarray, target_energy: np.ndarray) -> np.ndarray:
    """``errors / ||x||^2`` per row as float16, rounded up (the wire form of the error table).

    Parameters
    ----------
    errors : np.ndarray
        ``(tensors, candidates)`` squared errors.
    target_energy : np.ndarray
        ``(tensors,)`` ``||x||^2`` (``x = update + residual``).

    Returns
    -------
    np.ndarray
        Float16, never below the true ratio (capped at float16's largest
        finite value); 0 where ``||x|| = 0``.
    """
    target = np.asarray(target_energy, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(target > 0, np.asarray(errors, dtype=np.float64) / np.where(target > 0, target, 1.0), 0.0)
    top = float(np.finfo(np.float16).max)
    rel = np.minimum(rel, top)
    half = rel.astype(np.float16)
    low = half.astype(np.float64) < rel
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half


def settings_from_config(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str] | None]:
    """Read per-tensor settings and the candidate list from a round's config.

    Returns
    -------
    settings : dict[str, str]
        Tensor name -> candidate string.
    candidates : list of str or None
        The table columns, if the server asked for tables this round.
    """
    settings = {k[len(SETTING_PREFIX) :]: str(v) for k, v in config.items() if k.startswith(SETTING_PREFIX)}
    cands = config.get(CANDIDATES_KEY)
    return settings, (None if cands is None else [str(c) for c in cands])


# -- server side -----------------------------------------------------------
def settings_to_config(settings: Mapping[str, str], candidates: Sequence[str] | None = None) -> dict[str, Any]:
    """Config entries the server sends (inverse of :func:`settings_from_config`)."""
    out: dict[str, Any] = {f"{SETTING_PREFIX}{k}": str(v) for k, v in settings.items()}
    if candidates is not None:
        out[CANDIDATES_KEY] = [str(c) for c in candidates]
    return out


def decode_update(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, Sequence[int]],
    settings: Mapping[str, str] | None = None,
    shape_ok: Callable[[str, tuple[int, ...]], bool] | None = None,
    codec_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Decode the update in ``arrays`` (other keys are ignored).

    Parameters
    ----------
    arrays : mapping of str to np.ndarray
        A reply's arrays, with ``"lgreco-spec"`` and ``"lgreco-payload"``.
    shapes : mapping of str to shape
        The tensors the update covers and their shapes (the global arrays');
        the spec lines belong to them in sorted-name order, and each must
        declare that shape.
    settings : mapping of str to str, optional
        The setting the server asked for per tensor; each spec line must
        declare it (``"<codec>:<setting>"``).
    shape_ok : callable, optional
        ``(name, declared_shape) -> bool`` accepting a declared shape other
        than ``shapes[name]`` (adapter factors of a client whose rank is below
        the global rank). Checked before anything is allocated.
    codec_options : mapping, optional
        With ``settings``: the codec options the server expects (e.g.
        ``{"qsgd": {"bucket_size": 256}}``; defaults otherwise). A spec
        declaring other options (a huge bucket, say) is refused before decoding.

    Returns
    -------
    dict[str, np.ndarray]
        Float32 update per tensor, in sorted name order, in the declared shapes.

    Raises
    ------
    ValueError
        If the spec or payload is missing or malformed, the spec declares
        another number of tensors, a tensor declares another shape or
        setting than expected (the message names the tensor), the payload's
        length is not what the specs declare, or a tensor's fields do not
        decode under its declared codec (the message names the tensor).
    """
    names = sorted(shapes)
    for key in (SPEC_KEY, PAYLOAD_KEY):
        value = arrays.get(key)
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
            raise ValueError(f"The update needs {key!r} as a 1-D uint8 array, got {type(value).__name__}.")
    lines = arrays[SPEC_KEY].tobytes().split(b"\n") if arrays[SPEC_KEY].size else []
    if len(lines) != len(names):
        raise ValueError(f"{SPEC_KEY!r} declares {len(lines)} tensors, the global model has {len(names)}.")
    declared = []
    for name, line in zip(names, lines):
        try:
            codec, shape = parse_spec(np.frombuffer(line, dtype=np.uint8))
            if shape != tuple(int(d) for d in shapes[name]) and not (shape_ok is not None and shape_ok(name, shape)):
                raise ValueError(f"declares shape {shape}, the global tensor has {tuple(shapes[name])}.")
            if settings is not None and codec.key != candidate_key(settings[name]):
                raise ValueError(f"declares {codec.key!r}, the server asked for {settings[name]!r}.")
            if settings is not None:
                want = get_codec(settings[name], **dict((codec_options or {}).get(codec.name, {}))).options()
                if codec.options() != want:
                    raise ValueError(f"declares codec options {codec.options()}, the server expects {want}.")
        except ValueError as err:
            raise ValueError(f"Tensor {name!r}: {err}") from None
        declared.append((name, codec, shape, codec.layout(shape)))
    payload = arrays[PAYLOAD_KEY]
    expected = sum(np.dtype(dt).itemsize * int(np.prod(s, dtype=np.int64)) for *_, lay in declared for _, dt, s in lay)
    if payload.size != expected:
        raise ValueError(
            f"{PAYLOAD_KEY!r} holds {payload.size} bytes, the specs declare {expected} "
            "(a codec, setting or shape other than declared?)."
        )
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, codec, shape, lay in declared:
        fields = {}
        for field, dt, fshape in lay:
            dt = np.dtype(dt)
            count = int(np.prod(fshape, dtype=np.int64))
            little = np.frombuffer(payload, dtype=dt.newbyteorder("<"), count=count, offset=offset)
            fields[field] = little.astype(dt).reshape(fshape)
            offset += count * dt.itemsize
        try:
            out[name] = codec.decode(fields, shape)
        except ValueError as err:
            raise ValueError(f"Tensor {name!r}: {err}") from None
    return out


def read_tables(arrays: Mapping[str, np.ndarray], num_tensors: int, num_candidates: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The error table and energies in a reply, or ``None`` if it sent none.

    Returns
    -------
    (errors, energy) or None
        Float64 ``(num_tensors, num_candidates)`` absolute squared errors (the
        relative table times ``||update + residual||^2``) and
        ``(num_tensors, 2)`` energies (``||update||^2``, ``||update + residual||^2``).

    Raises
    ------
    ValueError
        If only one of the two came, or shapes/values are not usable
        (wrong shape, NaN/inf, negative).
    """
    has = [ERRORS_KEY in arrays, ENERGY_KEY in arrays]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(f"Tables need both {ERRORS_KEY!r} and {ENERGY_KEY!r}.")
    errors = np.asarray(arrays[ERRORS_KEY], dtype=np.float64)
    energy = np.asarray(arrays[ENERGY_KEY], dtype=np.float64)
    for label, table, expected in (
        (ERRORS_KEY, errors, (num_tensors, num_candidates)),
        (ENERGY_KEY, energy, (num_tensors, 2)),
    ):
        if table.shape != expected:
            raise ValueError(f"{label} has shape {table.shape}, expected {expected}.")
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise ValueError(f"{label} holds negative or non-finite values.")
    return errors * energy[:, 1:], energy


def size_table(
    shapes: Mapping[str, Sequence[int]],
    candidates: Sequence[str],
    codec_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> np.ndarray:
    """Encoded bytes of every candidate on every tensor, from the shapes alone.

    Parameters
    ----------
    shapes : mapping of str to shape
        Tensor name -> shape (the global arrays'; clients send those shapes).
    candidates : sequence of str
        The table columns.
    codec_options : mapping, optional
        Extra codec options per codec name, as the clients'
        :class:`ErrorFeedback` uses them (e.g. QSGD's ``bucket_size``).

    Returns
    -------
    np.ndarray
        Float64 ``(num_tensors, num_candidates)``, rows in sorted name order;
        equal to the payload ``nbytes`` a client's encode produces.
    """
    options = codec_options or {}
    codecs = [get_codec(c, **options.get(c.partition(":")[0], {})) for c in candidates]
    names = table_rows(shapes)
    return np.array(
        [[codec.encoded_size(shapes[name]) for codec in codecs] for name in names], dtype=np.float64
    ).reshape(len(names), len(codecs))


def table_rows(names: Iterable[str]) -> list[str]:
    """Row order of the tables: tensor names sorted."""
    return sorted(names)
