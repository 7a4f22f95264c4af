"""Inference front-ends over the task-agnostic loader (jaxeff/artifacts): export, generate, forecast, import."""

from jaxeff.infer.export import export_checkpoint
from jaxeff.infer.generate import InferenceModel, load_inference_model
from jaxeff.models.decoding import generate_ids, generate_text

__all__ = ["InferenceModel", "export_checkpoint", "generate_ids", "generate_text", "load_inference_model"]
