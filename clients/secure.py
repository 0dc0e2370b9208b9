"""The client side of secure low-rank aggregation: a Flower client mod.

Train messages that carry the ConfigRecord ``"secure"`` go through the stages of
:mod:`fedlowrank.secure` (keys, shares, the masked range sketch after training, shares,
the masked corange sketch, shares); every other message passes through untouched. The
ClientApp itself is unchanged: in the ``"range"`` stage the mod calls it, keeps what it
trained in ``Context.state`` until the second sum, and sends only masked sums of it.

What leaves the site in the clear: its public keys and rank, encrypted shares for its
neighbours, and the ``dp_*`` privacy metrics of a DP-SGD client. Its weight, train loss,
group counts and adapter go only into the masked sums.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log

from fedlowrank.secure import wire
from fedlowrank.aggregation.sketched import corange_contribution, range_contribution
from fedlowrank.secure.secagg import SecureSumClient, quantisation_bits
from fedlowrank.wire import GROUP_COUNT_PREFIX

REQUIRED_KEY = "secure-required"
"""Node config: true makes this site refuse any train message outside a secure round."""


def _bytes_fields(config, prefix: str) -> dict[int, bytes]:
    return {int(k[len(prefix):]): bytes(v) for k, v in config.items() if k.startswith(prefix)}


def make_secure_mod(rank_of: Callable[[Context], int]) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The mod, given how this node's adapter rank is found (it is sent at setup: the server sizes the sketch by it)."""

    def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or wire.RECORD not in msg.content.config_records:
            if msg.metadata.message_type == MessageType.TRAIN and bool(context.node_config.get(REQUIRED_KEY, False)):
                raise ValueError(f"this site requires secure aggregation (node config {REQUIRED_KEY}): it sends no "
                                 "adapter in the clear; run with secure = true")
            return call_next(msg, context)
        config = msg.content.config_records[wire.RECORD]
        stage = str(config.get(wire.STAGE, ""))
        node = msg.metadata.dst_node_id
        if stage == wire.SETUP:
            client = SecureSumClient(node, tuple(str(x) for x in config["labels"]), int(config["threshold"]), int(config["share-num"]))
            keys = client.setup()
            reply = ConfigRecord({**{f"pk:{node}:{name}": key for name, key in keys.items()}, "rank": int(rank_of(context))})
            return _reply(msg, context, client, RecordDict({wire.RECORD: reply}))
        client = _load(context)
        if stage == wire.SHARE_KEYS:
            public: dict[int, dict[str, bytes]] = {}
            for key, value in config.items():
                if key.startswith("pk:"):
                    _, peer, name = key.split(":", 2)
                    public.setdefault(int(peer), {})[name] = bytes(value)
            out = client.share_keys(public)
            reply = {**{f"ct:{k}": v for k, v in out.items()}, **{f"commit:{k}": v for k, v in client.commitments().items()}}
            return _reply(msg, context, client, RecordDict({wire.RECORD: ConfigRecord(reply)}))
        if stage == wire.RANGE_STAGE:
            client.receive_shares(_bytes_fields(config, "ct:"))
            global_arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            plan = wire.plan_from_config(config, global_arrays)
            # The ClientApp may write Context.state to disk (state-dir): the protocol's secrets stay out of it.
            secrets = context.state.config_records.pop(wire.STATE, None)
            try:
                trained = call_next(Message(RecordDict({k: v for k, v in msg.content.items() if k != wire.RECORD}), metadata=msg.metadata), context)
            finally:
                if secrets is not None:
                    context.state.config_records[wire.STATE] = secrets
            if trained.has_error():
                return trained
            arrays = {k: a.numpy() for k, a in trained.content["arrays"].items()}
            metrics = trained.content["metrics"]
            weight = float(metrics["num-examples"])
            counts = _group_counts(metrics, plan.groups)
            vectors, clipped = range_contribution(plan, arrays, weight, counts)
            masked, more = client.mask(wire.RANGE_STAGE, vectors, plan.range_bounds(), quantisation_bits(int(config["clients"])))
            context.state.array_records[wire.TRAINED] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
            context.state.config_records[wire.TRAINED_INFO] = ConfigRecord({
                "weight": weight, "clipped": clipped + more, **({"counts": [float(c) for c in counts]} if counts is not None else {}),
                **{f"extra:{name}": float(metrics[name]) for name in plan.extras if name in metrics},
                "plan": wire.plan_to_text(plan),
            })
            if clipped + more:
                log(WARNING, "secure round: %d values or weights clipped to their bounds", clipped + more)
            content = RecordDict({wire.MASKED: _masked_record(masked), wire.RECORD: ConfigRecord({wire.STAGE: stage})})
            privacy = {k: v for k, v in metrics.items() if k.startswith("dp_")}
            if privacy:
                content["metrics"] = MetricRecord(privacy)
            return _reply(msg, context, client, content)
        if stage in (wire.UNMASK_RANGE, wire.UNMASK_CORANGE):
            label = wire.RANGE_STAGE if stage == wire.UNMASK_RANGE else wire.CORANGE_STAGE
            shares = client.unmask(label, [int(n) for n in config["survivors"]], [int(n) for n in config["dropped"]])
            if stage == wire.UNMASK_CORANGE:  # the round is over for this node
                context.state.array_records.pop(wire.TRAINED, None)
                context.state.config_records.pop(wire.TRAINED_INFO, None)
            return _reply(msg, context, client, RecordDict({wire.RECORD: ConfigRecord({f"share:{k}": v for k, v in shares.items()})}))
        if stage == wire.CORANGE_STAGE:
            if wire.TRAINED not in context.state.array_records:
                raise ValueError("secure round: the corange stage came before this node trained")
            arrays = {k: a.numpy() for k, a in context.state.array_records[wire.TRAINED].items()}
            kept = context.state.config_records[wire.TRAINED_INFO]
            plan = wire.plan_from_text(str(kept["plan"]))
            bases = {k: a.numpy() for k, a in msg.content[wire.BASES].items()}
            counts = np.asarray(kept["counts"], dtype=np.float64) if "counts" in kept else None
            extras = {name: float(kept[f"extra:{name}"]) for name in plan.extras if f"extra:{name}" in kept}
            vectors, clipped = corange_contribution(plan, arrays, float(kept["weight"]), bases, counts, extras, int(kept["clipped"]))
            masked, more = client.mask(wire.CORANGE_STAGE, vectors, plan.corange_bounds(), quantisation_bits(int(config["clients"])))
            if more:
                log(WARNING, "secure round: %d values clipped to their bounds in the second sum", more)
            content = RecordDict({wire.MASKED: _masked_record(masked), wire.RECORD: ConfigRecord({wire.STAGE: stage})})
            return _reply(msg, context, client, content)
        raise ValueError(f"unknown secure stage {stage!r}")

    return secure_mod


def _group_counts(metrics, groups: int) -> np.ndarray | None:
    if groups == 1:
        return None
    return np.array([float(metrics.get(f"{GROUP_COUNT_PREFIX}{g}", 0)) for g in range(groups)])


def _masked_record(masked: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({f"v{i}": Array(np.ascontiguousarray(m)) for i, m in enumerate(masked)})


def _load(context: Context) -> SecureSumClient:
    if wire.STATE not in context.state.config_records:
        raise ValueError("secure round: a stage arrived before setup")
    return wire.client_state_from_text(str(context.state.config_records[wire.STATE]["state"]))


def _reply(msg: Message, context: Context, client: SecureSumClient, content: RecordDict) -> Message:
    context.state.config_records[wire.STATE] = ConfigRecord({"state": wire.client_state_to_text(client)})
    return Message(content=content, reply_to=msg)
