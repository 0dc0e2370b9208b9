"""Flower client side: ClientApp builders and the local trainer."""

from .app import AdapterConfig, ClientData, build_client_app, build_model, client_rank, from_record, to_record
from .compression import EF_STATE_KEY, compress_arrays, compress_reply, compression_requested
from .private import ACCOUNTANT_KEY, DPConfig, train_private
from .runconfig import build_run_config_client_app, dp_from_run_config
from .secure import make_secure_mod
from fedlowrank.training import Predictions, TrainResult, pick_device, predict, train_local

__all__ = [
    "ACCOUNTANT_KEY",
    "AdapterConfig",
    "DPConfig",
    "ClientData",
    "EF_STATE_KEY",
    "Predictions",
    "TrainResult",
    "build_client_app",
    "build_model",
    "build_run_config_client_app",
    "client_rank",
    "compress_arrays",
    "compress_reply",
    "compression_requested",
    "dp_from_run_config",
    "from_record",
    "make_secure_mod",
    "pick_device",
    "predict",
    "to_record",
    "train_local",
    "train_private",
]
