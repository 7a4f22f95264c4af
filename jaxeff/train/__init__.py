"""Trainer: optimizer, sharded state, jit-compiled steps, checkpoints, telemetry and the loop."""

from jaxeff.train.loop import TrainResult, train
from jaxeff.train.telemetry import TrainingStopped

__all__ = ["TrainResult", "TrainingStopped", "train"]
