"""Compression of client updates: codecs, error feedback, the L-GreCo allocator.

Torch/numpy only (no Flower). Importing this package registers the built-in
codecs: ``"none"``, ``"powersgd"``, ``"topk"``, ``"qsgd"``, ``"sq"``.
"""

from .allocate import DEFAULT_NUM_BINS, allocate_or_uniform, feedback_errors, lgreco_allocate, lgreco_budget
from .codec import (
    Codec,
    RawCodec,
    candidate_key,
    get_codec,
    payload_nbytes,
    register_codec,
    registered_codecs,
)
from .error_feedback import ErrorFeedback
from .powersgd import PowerSGDCodec
from .qsgd import QSGDCodec
from .scalar import ScalarQuantCodec
from .topk import TopKCodec
from .update import (
    CANDIDATES_KEY,
    ERRORS_KEY,
    ENERGY_KEY,
    PAYLOAD_KEY,
    SETTING_PREFIX,
    SPEC_KEY,
    decode_update,
    encode_update,
    make_spec,
    parse_spec,
    read_tables,
    relative_errors,
    settings_from_config,
    settings_to_config,
    size_table,
    table_rows,
)

__all__ = [
    "CANDIDATES_KEY",
    "DEFAULT_NUM_BINS",
    "allocate_or_uniform",
    "ERRORS_KEY",
    "ENERGY_KEY",
    "PAYLOAD_KEY",
    "SETTING_PREFIX",
    "SPEC_KEY",
    "Codec",
    "ErrorFeedback",
    "PowerSGDCodec",
    "QSGDCodec",
    "RawCodec",
    "ScalarQuantCodec",
    "TopKCodec",
    "candidate_key",
    "decode_update",
    "feedback_errors",
    "encode_update",
    "get_codec",
    "lgreco_allocate",
    "lgreco_budget",
    "make_spec",
    "parse_spec",
    "payload_nbytes",
    "read_tables",
    "relative_errors",
    "register_codec",
    "registered_codecs",
    "settings_from_config",
    "settings_to_config",
    "size_table",
    "table_rows",
]
