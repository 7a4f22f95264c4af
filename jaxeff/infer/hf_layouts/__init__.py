"""The Hugging Face layouts `jaxeff import` reads, one module each (see common.py for what a layout is).

Adding one: a new module of this package defining `layout(config, source)`, and its line in ARCHITECTURES.
"""

from __future__ import annotations

from importlib import import_module

from jaxeff.infer.hf_layouts.common import Layout

# config.json's model_type -> its layout; one line each, the module named on that line
ARCHITECTURES: dict[str, Layout] = {
    "xlstm": import_module(".xlstm", __name__).layout,
    "transnormer": import_module(".transnormer", __name__).layout,
    "openelm": import_module(".openelm", __name__).layout,
    "qwen2": import_module(".qwen2", __name__).layout,
    "qwen2_parscale": import_module(".qwen2", __name__).layout,
}
