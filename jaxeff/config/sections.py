"""The run configuration: one pydantic model per YAML section.

`ModelConfig` holds what every model shares; settings of one mixer family live in that family's
section (`model.lightning`, see mixers.py). Fields marked `MAY_CHANGE` may differ when a run is
resumed (resume.py). docs/config.md and configs/jaxeff.schema.json are generated from these classes
(`make docs`); a test fails when they are stale.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from jaxeff.config.base import (MAY_CHANGE, ConfigError, Float, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                                PositiveInt, Section)
from jaxeff.config.forecast import ForecastConfig, LinearForecasterConfig, SpacetimeConfig
from jaxeff.config.layer_scaling import LayerScalingConfig
from jaxeff.config.lora import LoraConfig
from jaxeff.config.parscale import ParScaleConfig
from jaxeff.config.qat import QatConfig
from jaxeff.config.sst import SstConfig
from jaxeff.config.zo import ZoConfig
from jaxeff.config.mixers import CompanionConfig, InfllmConfig, LightningConfig, MlstmConfig, MoeConfig, S2Config
# Importing jaxeff.layers (the package of this module) imports every layer file: the registries are complete.
from jaxeff.layers.registry import CHANNEL_MIXERS, TOKEN_MIXERS, unknown_name_message

FORECASTERS = ("spacetime", "linear", "dlinear")


def _mixer_names(table: dict[str, Any], key: str):
    """The type of a list of mixer names: checked against a registry when the config loads (with a did-you-mean),
    its JSON schema enumerating the registered names (read when the schema is generated, so never hand-kept)."""

    def check(names: list[str]) -> list[str]:
        for name in names:
            message = unknown_name_message(name, table)
            if message:
                raise ConfigError(f"{key}: {message}")
        return names

    def schema(field_schema: dict[str, Any]) -> None:
        field_schema["items"] = {"type": "string", "enum": sorted(table)}

    return Annotated[list[str], AfterValidator(check), Field(min_length=1, json_schema_extra=schema)]


TokenMixerNames = _mixer_names(TOKEN_MIXERS, "model.mixer_pattern")
ChannelMixerNames = _mixer_names(CHANNEL_MIXERS, "model.channel_mixer_pattern")


class ModelConfig(Section):
    """Model shape and numerics shared by every architecture; mixer-specific settings are in subsections."""

    architecture: Literal["lm", "spacetime", "linear", "dlinear"] = "lm"
    """`lm` (decoder language model, `task: lm`) or a forecaster for `task: forecast`: `spacetime`, `linear`, `dlinear`"""
    d_model: PositiveInt = 128
    """residual stream width"""
    n_layers: PositiveInt = 4
    """number of blocks"""
    n_heads: PositiveInt = 4
    """query heads (must divide `d_model` unless `head_dim` is set)"""
    n_kv_heads: PositiveInt | None = None
    """key/value heads for grouped-query attention; null = `n_heads`"""
    head_dim: PositiveInt | None = None
    """per-head width; null = `d_model / n_heads` (must be even, for RoPE)"""
    mlp_dim: PositiveInt = 384
    """hidden width of the channel mixer"""
    mixer_pattern: TokenMixerNames = Field(default_factory=lambda: ["attention"])
    """token mixer per layer, cycled over the layers (a list as long as `n_layers` places each layer)"""
    channel_mixer_pattern: ChannelMixerNames = Field(default_factory=lambda: ["swiglu"])
    """channel mixer per layer, cycled over the layers"""
    tie_embeddings: bool = True
    """output head reuses the embedding matrix"""
    rope_theta: PositiveFloat = 10000.0
    """rotary embedding base"""
    norm_eps: PositiveFloat = 1e-6
    """RMSNorm epsilon"""
    init_std: PositiveFloat = 0.02
    """std of weight init (output projections are scaled by `1/sqrt(2 n_layers)`)"""
    compute_dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], MAY_CHANGE] = "auto"
    """`auto` (bfloat16 on GPU/TPU, float32 on CPU), `float32`, `bfloat16`, `float16`; parameters stay float32"""
    remat: Annotated[Literal["none", "full", "dots_saveable"], MAY_CHANGE] = "none"
    """activation checkpointing per block: `none`, `full`, `dots_saveable`"""
    loss_chunk: Annotated[NonNegativeInt, MAY_CHANGE] = 0
    """training computes the output logits and loss this many tokens per device at a time, recomputing them in
    the backward (0: all at once). Long rows need it: 131072 tokens x 64000 vocabulary are 31 GiB of float32
    logits per device"""
    vocab_multiple: PositiveInt = 128
    """the embedding table is padded to a multiple of this (keeps tensor sharding even)"""
    norm: Literal["rms", "srms"] = "rms"
    """block norms: `rms` (RMSNorm with a learned scale) or `srms` (scale-free SRMSNorm, TransNormerLLM)"""
    scale_embeddings: bool = False
    """multiply token embeddings by `sqrt(d_model)` (TransNormerLLM)"""
    logit_soft_cap: PositiveFloat | None = None
    """soft cap `c tanh(logits / c)` on the output logits (xLSTM 7B: 30); null disables it"""
    vocab_size: PositiveInt | None = None
    """embedding rows before padding; null = the tokenizer's vocabulary (set it to match a released model)"""
    qk_norm: bool = False
    """RMSNorm (learned scale per head width) on attention queries and keys before RoPE (OpenELM)"""
    layer_scaling: LayerScalingConfig = Field(default_factory=LayerScalingConfig)
    """per-layer head counts and channel-mixer widths (OpenELM's layer-wise scaling)"""
    qkv_bias: bool = False
    """biases on the attention query, key and value projections (Qwen2)"""
    parscale: ParScaleConfig = Field(default_factory=ParScaleConfig)
    """parallel streams of each input with learned prefixes and a learned aggregation (ParScale)"""

    lightning: LightningConfig = Field(default_factory=LightningConfig)
    """lightning attention mixers (TransNormerLLM)"""
    mlstm: MlstmConfig = Field(default_factory=MlstmConfig)
    """mLSTM mixers (xLSTM 7B)"""
    companion: CompanionConfig = Field(default_factory=CompanionConfig)
    """companion-matrix SSM mixers (SpaceTime)"""
    moe: MoeConfig = Field(default_factory=MoeConfig)
    """mixture-of-experts channel mixers"""
    s2: S2Config = Field(default_factory=S2Config)
    """S2-Attention and sink + window attention mixers"""
    infllm: InfllmConfig = Field(default_factory=InfllmConfig)
    """InfLLM v2 sparse attention mixers (MiniCPM4)"""
    spacetime: SpacetimeConfig = Field(default_factory=SpacetimeConfig)
    """SpaceTime forecaster (`architecture: spacetime`)"""
    linear: LinearForecasterConfig = Field(default_factory=LinearForecasterConfig)
    """linear forecasting baselines (`architecture: linear | dlinear`)"""

    def token_mixer(self, layer: int) -> str:
        """The token mixer of layer `layer` (the pattern cycles over the layers)."""
        return self.mixer_pattern[layer % len(self.mixer_pattern)]

    def channel_mixer(self, layer: int) -> str:
        return self.channel_mixer_pattern[layer % len(self.channel_mixer_pattern)]

    def for_layer(self, layer: int) -> "ModelConfig":
        """The config layer `layer` is built from: this one, with the layer's own head counts and channel-mixer
        width under `layer_scaling` (mixers read n_heads, n_kv_heads and mlp_dim and need not know)."""
        shapes = self.layer_shapes()
        if shapes is None:
            return self
        shape = shapes[layer]
        return self.model_copy(update={"n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads,
                                       "mlp_dim": shape.mlp_dim})

    def layer_shapes(self):
        """Every layer's LayerShape under `layer_scaling`, or None when all layers share the model's."""
        return self.layer_scaling.shapes(self.n_layers, self.d_model, self.head_dim)


class DataConfig(Section):
    """Where the training text comes from and how it becomes batches."""

    source: Literal["stdlib", "text", "jsonl", "arrayrecord"] = "stdlib"
    """`stdlib` (the interpreter's standard library sources, tests excluded), `text`, `jsonl`, `arrayrecord`"""
    paths: list[str] = Field(default_factory=list)
    """files or glob patterns for `text` (one document per file), `jsonl` (`text` field per line), `arrayrecord` (UTF-8 records)"""
    tokenizer: str = "byte"
    """`byte` (256 bytes + PAD/BOS/EOS) or the path of a Hugging Face `tokenizer.json`"""
    seq_len: PositiveInt = 128
    """tokens per training sequence"""
    validation_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.02
    """share of documents held out for evaluation"""
    split_seed: int = 0
    """seed of the train/validation document split"""
    shuffle_seed: int = 0
    """seed of the window shuffle (reshuffled every epoch)"""
    max_documents: PositiveInt | None = None
    """read at most this many documents (null = all)"""
    num_workers: Annotated[NonNegativeInt, MAY_CHANGE] = 0
    """grain worker processes (0 = in the training process)"""


class MeshConfig(Section):
    """Axis sizes of the device mesh; their product must not exceed the devices present. One axis may be
    `-1`: all devices not used by the others. Any of them may change when a run is resumed."""

    may_change_on_resume: ClassVar[bool] = True

    data: int = -1
    """data parallelism (batch rows)"""
    fsdp: int = 1
    """fully sharded data parallelism (batch rows, and parameters/optimizer state over `embed`)"""
    sequence: int = 1
    """sequence (context) parallelism: each row's tokens split into contiguous chunks over it; parameters are
    sharded over `fsdp x sequence` (see docs/architecture.md, "Sequence parallelism")"""
    tensor: int = 1
    """tensor parallelism (heads, MLP width, vocabulary)"""
    expert: int = 1
    """expert parallelism: MoE experts are split over it; everywhere else it splits the batch rows like `data`"""


class TrainConfig(Section):
    """Optimisation: steps, batch, AdamW with warmup and cosine decay, evaluation cadence."""

    steps: Annotated[PositiveInt, MAY_CHANGE] = 300
    """optimizer steps in total (raise it to continue a finished run; the cosine schedule follows it)"""
    global_batch_size: PositiveInt = 16
    """sequences per step over all devices and processes"""
    microbatches: Annotated[PositiveInt, MAY_CHANGE] = 1
    """gradient accumulation: the batch is processed in this many parts"""
    learning_rate: Annotated[PositiveFloat, MAY_CHANGE] = 3e-3
    """peak AdamW learning rate"""
    warmup_steps: Annotated[NonNegativeInt, MAY_CHANGE] = 30
    """linear warmup from 0 (must be smaller than `steps`)"""
    min_lr_ratio: Annotated[NonNegativeFloat, MAY_CHANGE] = 0.1
    """cosine decay ends at `learning_rate * min_lr_ratio`"""
    weight_decay: Annotated[NonNegativeFloat, MAY_CHANGE] = 0.1
    """decoupled weight decay on matrices (not on norm scales)"""
    b1: Annotated[Float, Field(ge=0, lt=1), MAY_CHANGE] = 0.9
    """AdamW first-moment decay"""
    b2: Annotated[Float, Field(ge=0, lt=1), MAY_CHANGE] = 0.95
    """AdamW second-moment decay"""
    eps: Annotated[PositiveFloat, MAY_CHANGE] = 1e-8
    """AdamW epsilon"""
    grad_clip: Annotated[NonNegativeFloat, MAY_CHANGE] = 1.0
    """clip by global norm; 0 disables (switching between 0 and > 0 is refused on resume)"""
    seed: int = 0
    """parameter init and train RNG"""
    init_from: Annotated[str | None, MAY_CHANGE] = None
    """start a new run from the parameters of an export or `jaxeff import` directory (fine-tuning; the optimizer starts fresh); the model section must describe the same shapes. Ignored when resuming"""
    eval_every: Annotated[PositiveInt, MAY_CHANGE] = 100
    """evaluate on the held-out split every N steps (and at the end)"""
    eval_batches: Annotated[NonNegativeInt, MAY_CHANGE] = 4
    """batches per evaluation"""
    max_consecutive_nonfinite: Annotated[PositiveInt, MAY_CHANGE] = 5
    """steps with NaN/Inf gradients are skipped; stop after this many in a row"""
    jit: Annotated[bool, MAY_CHANGE] = True
    """false runs the step eagerly (for debuggers)"""
    optimizer: Literal["adamw", "zo"] = "adamw"
    """`adamw` (backpropagation), or `zo`: zeroth-order estimates from forward passes only (settings in `train.zo`)"""
    zo: ZoConfig = Field(default_factory=ZoConfig)
    """the zeroth-order optimizer (`train.optimizer: zo`)"""
    qat: QatConfig = Field(default_factory=QatConfig)
    """quantization-aware training"""
    sst: SstConfig = Field(default_factory=SstConfig)
    """Sparse Spectral Training: selected matrices as U diag(s) V^T, r singular-vector pairs updated per step"""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA: selected matrices frozen, a trained low-rank adapter added to each"""


class CheckpointConfig(Section):
    """Orbax checkpoints in `<workdir>/checkpoints`."""

    may_change_on_resume: ClassVar[bool] = True

    every: PositiveInt = 100
    """save every N steps (and always at the end or on SIGTERM/SIGINT)"""
    keep: PositiveInt = 3
    """keep the last N checkpoints"""
    async_save: bool = True
    """write in the background while training continues"""


class LoggingConfig(Section):
    """TensorBoard scalars and console progress."""

    may_change_on_resume: ClassVar[bool] = True

    every: PositiveInt = 10
    """TensorBoard scalars and progress updates every N steps"""
    progress_bar: bool = True
    """console progress (a live bar on a terminal, plain lines otherwise)"""
    peak_tflops_per_device: PositiveFloat | None = None
    """peak for the MFU estimate; known GPUs/TPUs need none, CPUs have no MFU unless set"""


class SampleConfig(Section):
    """Text generated at the end of training (and the defaults of `jaxeff generate`)."""

    may_change_on_resume: ClassVar[bool] = True

    prompt: str = "def "
    """prompt"""
    max_new_tokens: NonNegativeInt = 120
    """0 skips the sample"""
    temperature: NonNegativeFloat = 0.8
    """0 = greedy"""
    top_k: NonNegativeInt = 40
    """0 = no top-k filter"""
    seed: int = 0
    """sampling seed"""


class Config(Section):
    """A jaxeff run: `jaxeff train --config FILE.yaml [section.key=value ...]`."""

    task: Literal["lm", "forecast"] = "lm"
    """`lm` (next-token prediction on `data`) or `forecast` (time-series windows from `forecast`)"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """model shape and numerics"""
    data: DataConfig = Field(default_factory=DataConfig)
    """training data"""
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    """device mesh"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """optimisation"""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """checkpoints"""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """logging"""
    sample: SampleConfig = Field(default_factory=SampleConfig)
    """end-of-training sample"""
    forecast: ForecastConfig = Field(default_factory=ForecastConfig)
    """forecasting data (`task: forecast`)"""

    def to_dict(self) -> dict:
        """Plain YAML/JSON-ready values (the form written to `<workdir>/config.yaml`)."""
        return self.model_dump(mode="json")
