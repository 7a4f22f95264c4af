"""The architecture's seams, checked: the import contract, no task branches in the loop or inference, and a mixer
that exists only in its own module works everywhere (config, schema, model, decoding)."""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import ConfigError, load_config, validate
from jaxeff.layers.registry import TOKEN_MIXERS, TokenMixerSpec, register_token_mixer

REPO = Path(__file__).resolve().parents[1]


def test_import_contract_holds():
    """pyproject.toml's import-linter contracts: floors, kernels apart, no circles (function-level imports too)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_train_and_infer_have_no_task_branches():
    offenders = [f"{p}:{i}" for folder in ("jaxeff/train", "jaxeff/infer") for p in (REPO / folder).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "task ==" in line]
    assert not offenders, offenders


class _Shift(nn.Module):
    """A toy token mixer: y_t = W x_{t-1} (the previous token), with a one-token cache."""

    cfg: object
    layer_index: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache=None):
        prev_B1D = jnp.zeros_like(x_BSD[:, :1]) if cache is None else cache["last"][:, None]
        shifted_BSD = jnp.concatenate([prev_B1D, x_BSD[:, :-1]], axis=1)
        y_BSD = nn.Dense(x_BSD.shape[-1], use_bias=False, name="w")(shifted_BSD)
        return y_BSD, (None if cache is None else {"last": x_BSD[:, -1]})


@pytest.fixture
def shift_mixer():
    def check(cfg, key, mesh_shape):
        if cfg.data.seq_len < 2:
            raise ConfigError("shift needs data.seq_len >= 2")

    spec = TokenMixerSpec("toy_shift", _Shift, lambda cfg, s, i: 2.0 * cfg.d_model**2,
                          lambda cfg, i, b, n, dtype: {"last": jnp.zeros((b, cfg.d_model), dtype)}, cache_kind="state",
                          check=check)
    register_token_mixer(spec)
    yield spec
    del TOKEN_MIXERS["toy_shift"]


def test_a_mixer_registered_in_one_place_is_usable_everywhere(shift_mixer):
    from jaxeff.config.reference import json_schema
    from jaxeff.models.decoding import generate_ids
    from jaxeff.models.lm import build_model, flops_per_token

    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.mlp_dim=32",
                             "model.mixer_pattern=[toy_shift,attention]", "data.seq_len=16"])
    validate(cfg, 1)
    with pytest.raises(ConfigError, match="shift needs data.seq_len >= 2"):
        validate(load_config(None, ["model.mixer_pattern=[toy_shift]", "data.seq_len=1"]), 1)
    assert "toy_shift" in json_schema()["$defs"]["ModelConfig"]["properties"]["mixer_pattern"]["items"]["enum"]
    model = build_model(cfg.model, 259)
    tokens = jnp.asarray([[5, 9, 2, 7, 7, 1]], jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    assert flops_per_token(cfg.model, 259, 16) > 0
    # Decoding token by token through the registered cache equals the full forward pass.
    full_logits = model.apply({"params": params}, tokens)[0]
    ids = generate_ids(model, params, [5, 9, 2], 3, vocab_size=259)
    greedy_logits = np.asarray(model.apply({"params": params}, jnp.asarray([[5, 9, 2] + ids[:2]]))[0])[0, 2:, :259]
    assert ids == [int(i) for i in np.argmax(greedy_logits, axis=-1)]
    assert full_logits.shape == (1, 6, model.vocab_size)


# Files that touch only local paths: the interpreter's own sources, a plot, the schema file and the generated docs.
LOCAL_ONLY = {"jaxeff/paths.py", "jaxeff/data/sources.py", "jaxeff/tasks/forecast_output.py", "jaxeff/cli.py",
              "jaxeff/config/reference.py"}


def test_user_paths_go_through_one_path_type():
    """Workdirs, exports, configs and data may be gs:// URLs: outside jaxeff/paths.py (and files that only ever see
    local paths) nothing opens, globs or copies with the local-only APIs."""
    import re

    local_api = re.compile(r"\bopen\(|\bos\.path\.|\bshutil\b|\bpathlib\b|\bglob\.glob\(")
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sorted((REPO / "jaxeff").rglob("*.py"))
                 if str(p.relative_to(REPO)) not in LOCAL_ONLY
                 for i, line in enumerate(p.read_text().splitlines(), 1) if local_api.search(line)]
    assert not offenders, "use jaxeff.paths (as_path, epath.Path) instead:\n" + "\n".join(offenders)
