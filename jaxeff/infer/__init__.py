"""Inference: loading trained models, KV-cache generation and export."""

from jaxeff.infer.export import export_checkpoint
from jaxeff.infer.generate import generate_ids, generate_text
from jaxeff.infer.load import InferenceModel, load_inference_model

__all__ = ["InferenceModel", "export_checkpoint", "generate_ids", "generate_text", "load_inference_model"]
