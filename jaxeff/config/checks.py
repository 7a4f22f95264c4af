"""Cross-field checks: what a single field's type cannot say (heads vs width, batch vs mesh, ...).

`validate` runs before anything compiles. Types and ranges of single fields were already checked
when the config was loaded; the checks of a mixer section run only when a layer uses that mixer.
"""

from __future__ import annotations

from jaxeff.config.base import ConfigError
from jaxeff.config.sections import FORECASTERS, Config
from jaxeff.layers.attention import SoftmaxAttention
from jaxeff.layers.registry import TOKEN_MIXERS, check_mixers
from jaxeff.parallel.mesh import resolve_mesh_shape


def check_consistency(cfg: Config, mesh_shape: dict[str, int] | None = None) -> None:
    """The cross-field checks, including those of the mixers in use; `mesh_shape` (resolved axis sizes) adds the
    checks that depend on the mesh."""
    t = cfg.train
    if t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be smaller than train.steps={t.steps}; "
                          f"also set e.g. train.warmup_steps={t.steps // 10}")
    if t.global_batch_size % t.microbatches:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.microbatches={t.microbatches}"
        )
    if t.lora.rank:
        _check_lora(cfg)
    if t.optimizer == "zo":
        _check_zo(cfg)
    TASK_CHECKS[cfg.task](cfg, mesh_shape)


def _check_lora(cfg: Config) -> None:
    """LoRA adds adapters to plain float matrices trained by gradients (or by the zeroth-order estimate)."""
    t = cfg.train
    if t.sst.rank:
        raise ConfigError(f"train.lora.rank={t.lora.rank} and train.sst.rank={t.sst.rank} both reparameterise the "
                          "model's matrices; use one of them (set the other's rank to 0)")
    if t.qat.kind != "none":
        raise ConfigError(f"train.lora.rank={t.lora.rank} does not combine with train.qat.kind={t.qat.kind!r}: the "
                          "adapters would change the weights after quantization; set train.lora.rank=0 or "
                          "train.qat.kind=none")


def _check_zo(cfg: Config) -> None:
    """The zeroth-order optimizer runs forward passes of the whole batch and no backward pass."""
    t = cfg.train
    if t.microbatches > 1:
        raise ConfigError(f"train.optimizer=zo runs no backward pass and keeps no activations, so it does not "
                          f"accumulate microbatches: set train.microbatches=1 (got {t.microbatches})")
    if t.lora.rank and (t.zo.trainable != "lora" or t.lora.freeze != "all"):
        raise ConfigError(f"train.lora.rank={t.lora.rank} with train.optimizer=zo trains the adapters only: set "
                          f"train.zo.trainable=lora and train.lora.freeze=all (got trainable={t.zo.trainable!r}, "
                          f"freeze={t.lora.freeze!r})")
    if t.zo.trainable == "lora" and not t.lora.rank:
        raise ConfigError("train.zo.trainable=lora needs LoRA adapters: set train.lora.rank (e.g. "
                          "train.lora.rank=8), or choose other trainable parameters")
    if t.qat.kind != "none":
        raise ConfigError(f"train.optimizer=zo does not combine with train.qat.kind={t.qat.kind!r} (fake quantization "
                          "needs straight-through gradients); use train.zo.frozen_int8=true for int8 frozen weights")
    if t.sst.rank:
        raise ConfigError(f"train.optimizer=zo does not combine with train.sst.rank={t.sst.rank} (SST updates "
                          "factorised matrices from their gradients); set train.sst.rank=0")


def _check_lm(cfg: Config, mesh_shape: dict[str, int] | None) -> None:
    m, d = cfg.model, cfg.data
    if m.architecture != "lm":
        raise ConfigError(f"model.architecture={m.architecture!r} is a forecasting model; set task: forecast "
                          "(or model.architecture: lm to train a language model)")
    if d.source != "stdlib" and not d.paths:
        raise ConfigError(f"data.source={d.source!r} needs data.paths (a list of files or glob patterns)")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
            f"pick n_heads from {_divisors(m.d_model)} or set model.head_dim"
        )
    if (m.head_dim or m.d_model // m.n_heads) % 2:
        raise ConfigError("the head dimension must be even for rotary embeddings; change model.n_heads or model.head_dim")
    others = sorted({n for n in m.mixer_pattern if not issubclass(TOKEN_MIXERS[n].module, SoftmaxAttention)})
    for key, on, what in (("qk_norm", m.qk_norm, "normalises softmax attention's queries and keys"),
                          ("qkv_bias", m.qkv_bias, "adds biases to softmax attention's q, k and v projections")):
        if on and others:
            raise ConfigError(f"model.{key}=true {what}, and "
                              f"model.mixer_pattern also has {', '.join(others)}; set model.{key}=false or use "
                              "attention, s2 or sink_window layers only")
    for key, layer in _layers(m):
        n_kv = layer.n_kv_heads or layer.n_heads
        if layer.n_heads % n_kv:
            raise ConfigError(
                f"{key}n_kv_heads={n_kv} must divide {key}n_heads={layer.n_heads} (grouped-query attention); "
                f"pick one of {_divisors(layer.n_heads)}"
            )
    # The mixers' own checks (head widths, tensor splits) see each layer's widths.
    for _, layer in _layers(m):
        check_mixers(cfg if layer is m else cfg.model_copy(update={"model": layer}), mesh_shape)
    if m.parscale.enabled:
        _check_parscale(m, mesh_shape)


def _check_parscale(m, mesh_shape: dict[str, int] | None) -> None:
    p = f"model.parscale.streams={m.parscale.streams}"
    without = sorted({n for n in m.mixer_pattern if TOKEN_MIXERS[n].stream_start is None})
    if without:
        have = sorted(n for n, spec in TOKEN_MIXERS.items() if spec.stream_start is not None)
        raise ConfigError(f"{p}: the {', '.join(without)} mixer has no learned per-stream start (a pruned cache); "
                          f"use mixers among {', '.join(have)}, or set model.parscale.streams=1")
    if mesh_shape is not None and mesh_shape["sequence"] > 1:
        raise ConfigError(f"{p} with mesh.sequence={mesh_shape['sequence']}: the streams run each mixer from its "
                          "learned start, a form not split over the sequence; set mesh.sequence=1 (the streams "
                          "already multiply the rows to split over mesh.data)")


def _layers(m):
    """(key prefix for messages, config) of every distinct layer shape: the model itself without layer scaling."""
    if m.layer_shapes() is None:
        return [("model.", m)]
    return [(f"model.layer_scaling (layer {i}): ", m.for_layer(i)) for i in range(m.n_layers)]


def _check_forecast(cfg: Config, mesh_shape: dict[str, int] | None) -> None:
    m, f = cfg.model, cfg.forecast
    if m.architecture not in FORECASTERS:
        raise ConfigError(f"task: forecast needs a forecasting model; set model.architecture to one of "
                          f"{', '.join(FORECASTERS)} (it is {m.architecture!r})")
    if m.parscale.enabled:
        raise ConfigError(f"model.parscale.streams={m.parscale.streams}: parallel streams are for language models "
                          "(task: lm); set model.parscale.streams=1")
    if abs(sum(f.split) - 1) > 1e-6:
        raise ConfigError(f"forecast.split={f.split} must sum to 1 (train, validation, test fractions)")
    if f.source == "csv" and not f.csv:
        raise ConfigError("forecast.source=csv needs forecast.csv (the path of the CSV file)")
    if f.source != "csv" and f.csv:
        raise ConfigError(f"forecast.csv is set but forecast.source={f.source!r}; set forecast.source=csv to read it")
    if m.architecture == "spacetime":
        sec, st = m.companion, m.spacetime
        decoder_kernels = st.decoder_kernels or sec.n_kernels
        for key, k in (("model.companion.n_kernels", sec.n_kernels), ("model.spacetime.decoder_kernels", decoder_kernels)):
            if m.d_model % k:
                raise ConfigError(f"{key}={k} does not divide model.d_model={m.d_model}; every SSM serves the same "
                                  f"number of channels (pick one of {_divisors(m.d_model)})")
        if st.ssm == "diagonal" and sec.state_dim % 2:
            raise ConfigError(f"model.companion.state_dim={sec.state_dim} must be even for model.spacetime.ssm=diagonal "
                              "(complex conjugate pairs)")
        long = [w for w in st.ma_windows if w > f.lookback]
        if long:
            raise ConfigError(f"model.spacetime.ma_windows {long} are longer than forecast.lookback={f.lookback}; "
                              "shorten them or lengthen the lookback")
    if m.architecture == "dlinear" and m.linear.trend_window % 2 == 0:
        raise ConfigError(f"model.linear.trend_window={m.linear.trend_window} must be odd (a centred moving average)")


TASK_CHECKS = {"lm": _check_lm, "forecast": _check_forecast}


def validate(cfg: Config, num_devices: int) -> dict[str, int]:
    """All cross-field checks for this many devices; returns the resolved mesh shape."""
    mesh = resolve_mesh_shape(cfg.mesh, num_devices)
    check_consistency(cfg, mesh)
    m, t = cfg.model, cfg.train
    batch_shards = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    micro = t.global_batch_size // t.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} / train.microbatches={t.microbatches} = {micro} rows "
            f"per microbatch is not divisible by the batch-parallel size mesh.data*mesh.fsdp*mesh.expert={batch_shards}; "
            f"use a global batch that is a multiple of {batch_shards * t.microbatches}"
        )
    # How many rows each process loads depends on which devices the mesh gives it: checked with the mesh
    # (jaxeff.parallel.mesh.process_row_shards).
    if cfg.task != "lm":
        if mesh["sequence"] > 1:
            raise ConfigError(f"mesh.sequence={mesh['sequence']}: sequence parallelism splits a language model's "
                              f"token sequence; task {cfg.task!r} has none to split. Set mesh.sequence=1")
        return mesh
    sp = mesh["sequence"]
    if cfg.data.seq_len % sp:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by mesh.sequence={sp}: every device "
                          f"takes an equal chunk of each row; use a seq_len that is a multiple of {sp}")
    tp = mesh["tensor"]
    for prefix, layer in _layers(m):
        n_kv = layer.n_kv_heads or layer.n_heads
        for key, value in {"n_heads": layer.n_heads, "n_kv_heads": n_kv, "mlp_dim": layer.mlp_dim}.items():
            if value % tp:
                raise ConfigError(f"{prefix}{key}={value} is not divisible by mesh.tensor={tp}: tensor parallelism "
                                  f"splits every layer's heads and hidden units evenly; change one of them")
    if m.vocab_multiple % tp:
        raise ConfigError(f"model.vocab_multiple={m.vocab_multiple} is not divisible by mesh.tensor={tp}")
    param_shards = mesh["fsdp"] * sp  # parameters are sharded over fsdp x sequence along `embed`
    if m.d_model % param_shards:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp*mesh.sequence={param_shards} "
                          f"(parameters are sharded over both along d_model); change one of them")
    return mesh


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]
