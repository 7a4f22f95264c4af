"""Trainer: optimizer, sharded state, jit-compiled steps, checkpoints, telemetry and the loop."""

from jaxeff.train.loop import TrainingStopped, TrainResult, train, train_from_files

__all__ = ["TrainResult", "TrainingStopped", "train", "train_from_files"]
