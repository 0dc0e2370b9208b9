"""Flower client side: ClientApp builders and the local trainer."""

from .app import AdapterConfig, ClientData, build_client_app, build_model, client_rank, from_record, to_record
from .trainer import Predictions, TrainResult, pick_device, predict, train_local

__all__ = [
    "AdapterConfig",
    "ClientData",
    "Predictions",
    "TrainResult",
    "build_client_app",
    "build_model",
    "client_rank",
    "from_record",
    "pick_device",
    "predict",
    "to_record",
    "train_local",
]
