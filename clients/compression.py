"""Client side of L-GreCo: compress the train reply with error feedback.

The server's :class:`fedlowrank.strategies.lgreco.LGreCo` puts per-tensor
settings (``"lgreco.<tensor>"``) and, in some rounds, the candidate list
(``"lgreco-candidates"``) into the train config. When they are there, the
client replies with ``C(update + residual)`` instead of its trained arrays,
where ``update = local - global`` in the global shapes, keeps the new
residual for the next round, and, if asked, the tables: float32 errors of
every candidate and two energies per tensor, no sizes (the server computes
those from the global shapes; the message convention is in the module
docstring of ``strategies/lgreco.py``).

The :class:`~fedlowrank.compression.ErrorFeedback` state (residuals, PowerSGD
warm starts, the RNG position) lives in ``Context.state`` as an ArrayRecord
under :data:`EF_STATE_KEY`, so it survives between rounds in simulation and
deployment alike. Without ``"lgreco."`` keys in the config nothing happens:
the reply carries the plain arrays.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedlowrank.runconfig import RunSettings
from fedlowrank.wire import GROUP_SHARE_KEY, TRUNCATION_KEY

from fedlowrank.adapters.state import factor_ranks, fit_arrays_to_ranks, is_fold_key
from fedlowrank.compression import (
    CANDIDATES_KEY,
    SETTING_PREFIX,
    ErrorFeedback,
    encode_update,
    settings_from_config,
)

EF_STATE_KEY = "lgreco-ef"


def compression_requested(config: Mapping[str, Any]) -> bool:
    """Whether the round's config asks for a compressed reply."""
    return any(str(k).startswith(SETTING_PREFIX) for k in config.keys()) or CANDIDATES_KEY in config


def client_seed(context: Context) -> int:
    """A per-client seed for stochastic codecs (QSGD rounding, PowerSGD's first ``Q``).

    Clients must draw independent randomness so that their rounding noise
    averages out on the server; the partition id (simulation) or node id
    (deployment) differs between clients and is stable across rounds.
    """
    ident = context.node_config.get("partition-id", context.node_id)
    base = RunSettings.from_config(context.run_config).seed
    return zlib.crc32(f"{base}/{ident}".encode())


def load_error_feedback(state: RecordDict, seed: int) -> ErrorFeedback:
    """The client's error feedback from ``Context.state`` (fresh if absent)."""
    if EF_STATE_KEY not in state.array_records:
        return ErrorFeedback(seed=seed)
    record = state.array_records[EF_STATE_KEY]
    return ErrorFeedback.from_state_dict({k: a.numpy() for k, a in record.items()})


def save_error_feedback(state: RecordDict, ef: ErrorFeedback) -> None:
    """Store ``ef`` in ``Context.state`` (replacing the previous round's)."""
    state[EF_STATE_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in ef.state_dict().items()})


def model_update(global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``local - global`` per tensor (float64), in the global shapes.

    Raises
    ------
    ValueError
        If the tensor names differ, or a tensor's shape differs from the
        global one (e.g. this client's adapter rank is not the global rank:
        a compressed update is a delta and needs the global shapes).
    """
    missing = sorted(set(global_arrays) - set(local_arrays))
    extra = sorted(set(local_arrays) - set(global_arrays))
    if missing or extra:
        raise ValueError(
            f"L-GreCo: local arrays do not match the global arrays (missing {missing[:5]}, extra {extra[:5]})."
        )
    update = {}
    for name, ref in global_arrays.items():
        local = np.asarray(local_arrays[name])
        if local.shape != np.shape(ref):
            raise ValueError(
                f"L-GreCo: tensor {name!r} has local shape {local.shape} but reference shape {np.shape(ref)}."
            )
        update[name] = local.astype(np.float64) - np.asarray(ref, dtype=np.float64)
    return update


def reference_arrays(
    config: Mapping[str, Any], global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray]
) -> Mapping[str, np.ndarray]:
    """What the update is relative to: the global arrays, with the factors of layers where
    this client's rank is below the global rank replaced by the head it loaded
    (:func:`fedlowrank.adapters.state.fit_arrays_to_ranks`; the server forms the same)."""
    local, sent = factor_ranks(local_arrays), factor_ranks(global_arrays)
    for module, rank in local.items():
        if module in sent and rank > sent[module]:
            raise ValueError(f"L-GreCo: '{module}' has adapter rank {rank}; rank {rank} is above the global rank {sent[module]}.")
    lower = {m: r for m, r in local.items() if m in sent and r < sent[m]}
    if not lower:
        return global_arrays
    shares = config.get(GROUP_SHARE_KEY)
    return fit_arrays_to_ranks(global_arrays, lower, str(config.get(TRUNCATION_KEY, "svd")), shares)


def compress_arrays(
    config: Mapping[str, Any],
    global_arrays: Mapping[str, np.ndarray],
    local_arrays: Mapping[str, np.ndarray],
    state: RecordDict,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """Encode ``local - global`` as the round's config asks, with error feedback.

    Parameters
    ----------
    config : mapping
        The train message's ConfigRecord.
    global_arrays, local_arrays : mapping of str to np.ndarray
        The arrays received this round and the locally trained ones.
    state : RecordDict
        ``Context.state``; the error feedback is read from and written back
        to its ArrayRecord :data:`EF_STATE_KEY`.
    seed : int, default 0
        Seed of a fresh error-feedback state (ignored once one is stored).

    Returns
    -------
    (arrays, metrics) or None
        ``None`` when the config has no L-GreCo keys. Otherwise the arrays
        of the reply (encoded tensors plus tables when candidates were
        asked for) and client metrics: ``lgreco-residual-norm`` (what is
        still owed to the server, i.e. this round's compression error),
        ``lgreco-target-norm`` (norm of update plus the previous residual:
        what was to be sent) and ``lgreco-update-norm``.

    Raises
    ------
    ValueError
        If local and global arrays do not match, or a tensor has no setting.
    """
    if not compression_requested(config):
        return None
    settings, candidates = settings_from_config(config)
    update = model_update(reference_arrays(config, global_arrays, local_arrays), local_arrays)
    ef = load_error_feedback(state, seed)
    # What this round tries to send (update plus what earlier rounds still owe);
    # the residual after encoding is exactly this round's compression error.
    target_norm = float(np.sqrt(sum(float(np.sum(ef.compensated(k, u) ** 2)) for k, u in update.items())))
    payload, tables = encode_update(update, settings, ef, candidates=candidates)
    # Saved only after a successful encode: a failed round leaves the old state.
    save_error_feedback(state, ef)
    update_norm = float(np.sqrt(sum(float(np.sum(u**2)) for u in update.values())))
    metrics = {
        "lgreco-residual-norm": ef.residual_norm(),
        "lgreco-target-norm": target_norm,
        "lgreco-update-norm": update_norm,
    }
    return {**payload, **tables}, metrics


def compress_reply(
    config: Mapping[str, Any], received: ArrayRecord, trained: ArrayRecord, context: Context
) -> tuple[ArrayRecord, dict[str, float]]:
    """The train reply's ArrayRecord: compressed if the config asks, else ``trained``.

    Parameters
    ----------
    config : mapping
        The train message's ConfigRecord.
    received : ArrayRecord
        The global arrays of this round (the train message's ArrayRecord).
    trained : ArrayRecord
        The locally trained arrays, same keys.
    context : Context
        The ClientApp context; its ``state`` keeps the error feedback.

    Returns
    -------
    record : ArrayRecord
        What to send.
    metrics : dict[str, float]
        Extra train metrics (empty without compression).
    """
    out = compress_arrays(
        config,
        {k: a.numpy() for k, a in received.items() if not is_fold_key(k)},  # fold: server -> client only
        {k: a.numpy() for k, a in trained.items()},
        context.state,
        seed=client_seed(context),
    )
    if out is None:
        return trained, {}
    arrays, metrics = out
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}), metrics
