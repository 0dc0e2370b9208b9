"""What the secure round's messages carry, named once for the server wrapper and the client mod.

A stage message holds the ConfigRecord ``"secure"`` with ``"stage"`` and the stage's fields;
masked vectors travel as uint64 arrays in the ArrayRecord ``"secure-masked"`` (``v0``,
``v1``, ...), the range bases in ``"secure-bases"`` (one ``G x d_out x width`` array per layer).
Keys of bytes fields name the node they concern: ``pk:<node>:<key>``, ``ct:<node>``,
``share:<node>``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import fields

import numpy as np

from ..aggregation.sketched import SketchPlan
from .secagg import SecureSumClient

RECORD = "secure"
MASKED = "secure-masked"
BASES = "secure-bases"
STAGE = "stage"
SETUP, SHARE_KEYS, RANGE_STAGE, UNMASK_RANGE, CORANGE_STAGE, UNMASK_CORANGE = (
    "setup", "share-keys", "range", "unmask-range", "corange", "unmask-corange",
)
STATE = "secure-state"
"""The client's protocol state (a ConfigRecord in ``Context.state``) between stages."""
TRAINED = "secure-trained"
"""The client's trained arrays (an ArrayRecord in ``Context.state``) between the two sums."""
TRAINED_INFO = "secure-trained-info"
"""Its weight, counts, metrics and the round's plan (a ConfigRecord; one namespace with the arrays)."""
ROUND_KEYS = ("seed", "widths", "modules", "ranks", "weight-bound", "value-bound", "extras")


def plan_config(plan: SketchPlan) -> dict:
    """The plan's fields the client cannot read off the global arrays."""
    return {"seed": plan.seed, "modules": plan.modules, "widths": [plan.widths[m] for m in plan.modules],
            "ranks": list(plan.ranks), "weight-bound": plan.weight_bound, "value-bound": plan.value_bound,
            "extras": list(plan.extras)}


def plan_from_config(config, global_arrays: dict[str, np.ndarray]) -> SketchPlan:
    """The server's plan again, on a client: from :func:`plan_config` and the global arrays it received."""
    missing = [k for k in ROUND_KEYS if k not in config]
    if missing:
        raise ValueError(f"secure round config lacks {missing}")
    modules = [str(m) for m in config["modules"]]
    widths = dict(zip(modules, (int(w) for w in config["widths"]), strict=True))
    shapes: dict[str, tuple[int, ...]] = {}
    groups = 1
    for module in modules:
        u, s, v = (global_arrays.get(f"{module}.lora_{x}") for x in "USV")
        if u is None or s is None or v is None:
            raise ValueError(f"secure round config names layer {module!r}, which the global arrays lack")
        shapes[module] = (u.shape[0], v.shape[0])
        groups = int(np.atleast_2d(s).shape[0])
    plain = [k for k in global_arrays if not any(k.startswith(f"{m}.lora_") for m in modules) and ".fold_" not in k]
    shapes.update({k: tuple(global_arrays[k].shape) for k in plain})
    return SketchPlan(int(config["seed"]), widths, [int(r) for r in config["ranks"]], groups, shapes, plain,
                      float(config["weight-bound"]), float(config["value-bound"]), tuple(str(e) for e in config["extras"]))


def _encode(value):
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {"d": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, (set, tuple, list)):
        return {"l": [_encode(v) for v in value], "t": type(value).__name__}
    return {"v": value}


def _decode(blob):
    if "b" in blob:
        return base64.b64decode(blob["b"])
    if "d" in blob:
        return {_decode(k): _decode(v) for k, v in blob["d"]}
    if "l" in blob:
        items = [_decode(v) for v in blob["l"]]
        return {"set": set, "tuple": tuple}.get(blob["t"], list)(items)
    return blob["v"]


def client_state_to_text(client: SecureSumClient) -> str:
    """A client's protocol state as text, for ``Context.state`` (JSON, bytes in base64; no pickle)."""
    return json.dumps({f.name: _encode(getattr(client, f.name)) for f in fields(client)})


def client_state_from_text(text: str) -> SecureSumClient:
    data = {k: _decode(v) for k, v in json.loads(text).items()}
    return SecureSumClient(**data)



def plan_to_text(plan: SketchPlan) -> str:
    """The whole plan as the client saw it in the range stage (kept until the second sum: the
    trained arrays it is applied to then may order or name things otherwise)."""
    return json.dumps({"seed": plan.seed, "widths": plan.widths, "ranks": plan.ranks, "groups": plan.groups,
                       "shapes": {k: list(v) for k, v in plan.shapes.items()}, "plain": plan.plain,
                       "weight-bound": plan.weight_bound, "value-bound": plan.value_bound, "extras": list(plan.extras)})


def plan_from_text(text: str) -> SketchPlan:
    data = json.loads(text)
    return SketchPlan(int(data["seed"]), {k: int(v) for k, v in data["widths"].items()}, [int(r) for r in data["ranks"]],
                      int(data["groups"]), {k: tuple(v) for k, v in data["shapes"].items()}, list(data["plain"]),
                      float(data["weight-bound"]), float(data["value-bound"]), tuple(data["extras"]))
