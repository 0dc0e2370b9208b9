"""The message contract both sides import: config keys the server sets for clients.

Keys are spelled once, here, and imported by ``fedlowrank.strategies`` and
``fedlowrank.clients`` alike.
"""

TRUNCATION_KEY = "fedlowrank-truncation"
"""Train/evaluate config: how a client of lower rank than the global adapter holds it
(``"svd"``: the best approximation at its rank; ``"columns"``: the first columns)."""

FROZEN_KEY = "fedlowrank-frozen"
"""Train config: factor names (e.g. ``["lora_V"]``) the client must not train (FFA-LoRA)."""

GROUP_SHARE_KEY = "group-share"
"""Train/evaluate config: the group shares (unknown-group mix of ``S`` rows, and the
order of grouped columns for clients of lower rank)."""

REPLY_NODE_KEY = "fedlowrank-reply"
"""Server-internal: a ConfigRecord ``{"node-id": ...}`` the strategy adds to each evaluate
reply's content before metric aggregation, so aggregation functions can name the node."""
