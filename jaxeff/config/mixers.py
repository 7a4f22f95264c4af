"""One config section per mixer family (`model.lightning`, `model.mlstm`, ...): plain settings, nothing else.

A section's fields are type- and range-checked whenever a config is loaded, whether or not a layer uses the
mixer. Which mixers read a section, and the checks that relate it to the rest of the config (its layers, the
sequence length, the mesh), live with the mixer in its layer file (`jaxeff/layers/<mixer>.py`, its
`TokenMixerSpec` / `ChannelMixerSpec`) and run only when a layer uses it.

To add a family: a `Section` subclass here, and a field for it on `ModelConfig` (sections.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from jaxeff.config.base import MAY_CHANGE, Float, PositiveFloat, PositiveInt, Section


class LightningConfig(Section):
    """Lightning attention (TransNormerLLM) token mixers: `model.mixer_pattern: [lightning]`."""


    impl: Annotated[Literal["auto", "reference", "chunked", "pallas"], MAY_CHANGE] = "auto"
    """implementation: `auto` (Pallas on GPU/TPU, chunked on CPU), `reference`, `chunked`, `pallas`"""
    block_size: Annotated[PositiveInt, MAY_CHANGE] = 64
    """sequence block of the chunked / Pallas forms (the Pallas kernels round it up to a power of two)"""
    decay_convention: Literal["code", "paper"] = "code"
    """decay per head and layer: `code` (released TransNormerLLM code, ALiBi slopes) or `paper` (eq. 10); see [models/tnl.md](models/tnl.md)"""
    lrpe_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    """layers whose lightning mixer applies LRPE-d to q and k"""



class MlstmConfig(Section):
    """mLSTM token mixers (xLSTM 7B blocks): `model.mixer_pattern: [mlstm]`; see [models/xlstm.md](models/xlstm.md)."""


    impl: Annotated[Literal["auto", "reference", "chunked", "pallas"], MAY_CHANGE] = "auto"
    """cell implementation: `auto` (Pallas on GPU/TPU, chunked on CPU), `reference` (quadratic), `chunked`, `pallas`"""
    chunk_size: Annotated[PositiveInt, MAY_CHANGE] = 64
    """chunk length of the chunked / Pallas forms"""
    qk_dim_factor: Annotated[Float, Field(gt=0, le=4)] = 0.5
    """q/k width as a fraction of `d_model` (split over `n_heads`)"""
    v_dim_factor: Annotated[Float, Field(gt=0, le=4)] = 1.0
    """v / output-gate width as a fraction of `d_model` (split over `n_heads`)"""
    gate_soft_cap: PositiveFloat | None = 15.0
    """soft cap `c tanh(x / c)` on the input and forget gate pre-activations; null disables it"""
    cell_eps: Annotated[Float, Field(ge=0)] = 1e-6
    """added to the cell's normaliser `max(|n.q|, exp(-m))`"""
    norm_eps: PositiveFloat = 1e-6
    """epsilon of the per-head layer norm of the cell output"""
    igate_bias_init: Float = -10.0
    """initial input-gate bias (xLSTM 7B: -10, so that new inputs start small)"""
    fgate_bias_init: list[Float] = Field(default_factory=lambda: [3.0, 6.0], min_length=2, max_length=2)
    """forget-gate biases start as linspace(a, b) over the heads (xLSTM 7B: 3 to 6)"""


    def head_dims(self, d_model: int, n_heads: int) -> tuple[int, int]:
        """(d_qk, d_v) per head."""
        return int(d_model * self.qk_dim_factor) // n_heads, int(d_model * self.v_dim_factor) // n_heads


class CompanionConfig(Section):
    """Companion-matrix SSM token mixers (SpaceTime): `model.mixer_pattern: [companion]`. Every channel of the
    residual stream runs its own SSM (kernel `i mod n_kernels`), then a linear layer mixes the channels."""


    state_dim: PositiveInt = 64
    """state size d of each SSM (the companion matrix is d x d)"""
    n_kernels: PositiveInt = 16
    """independent SSMs, repeated over the channels (must divide model.d_model)"""
    norm_order: Literal[0, 1] = 1
    """1: L1-normalise the companion column a before use (SpaceTime's default, keeps |eigenvalues| <= 1); 0: as is"""
    skip: bool = True
    """add a learned per-channel skip `D u_t`"""
    kernel_impl: Annotated[Literal["auto", "reference", "krylov", "fast"], MAY_CHANGE] = "auto"
    """how the convolution kernel is computed: `fast` (= auto), `krylov`, `reference` (sequential)"""



class MoeConfig(Section):
    """Mixture-of-experts channel mixers: `model.channel_mixer_pattern: [moe]` (or `[swiglu, moe]` for every other
    layer); see [models/moe.md](models/moe.md). Experts live on the `mesh.expert` axis."""


    structure: Literal["cdac", "dcca", "residual"] = "cdac"
    """`cdac`: fine-grained experts h -> `expert_dim` -> h, tokens travel at width h; `dcca` (BigMac): a shared
    h -> r h projection before the dispatch and r h -> h after the combine, experts r h -> `expert_dim` -> r h;
    `residual` (DeepSpeed): a dense MLP (`model.mlp_dim`) plus a top-1 expert, mixed by a learned softmax"""
    n_experts: PositiveInt | list[PositiveInt] = 8
    """experts per MoE layer; a list gives each MoE layer its own count in order (pyramid MoE)"""
    top_k: PositiveInt = 2
    """experts per token (`residual` needs 1)"""
    ratio: Annotated[Float, Field(gt=0, le=1)] = 0.25
    """r: the width the tokens travel at in `dcca` (r h), and the default hidden width r h of `cdac` experts"""
    expert_dim: PositiveInt | None = None
    """hidden width of an expert; null = r h (`cdac`), h (`dcca`, as BigMac), `model.mlp_dim` (`residual`)"""
    capacity_factor: Annotated[Float, Field(gt=0)] | None = 1.25
    """slots per expert = ceil(factor * tokens * top_k / experts) per device; extra tokens are dropped (they pass
    through the residual). null = dropless (sort by expert + `jax.lax.ragged_dot`; across expert-parallel devices
    by ragged all-to-all, emulated with a padded all-to-all on CPU)"""
    normalize_top_k: bool = True
    """renormalise the top-k router probabilities of a token to sum to 1"""
    load_balance_weight: Annotated[Float, Field(ge=0)] = 0.01
    """weight of the load-balancing loss E * sum_i f_i P_i (f: share of assignments, P: mean probability)"""
    z_loss_weight: Annotated[Float, Field(ge=0)] = 1e-3
    """weight of the router z-loss mean(logsumexp(logits)^2)"""
    bias_balancing: bool = False
    """auxiliary-loss-free balancing: a per-expert bias added to the scores for the top-k choice only, pushed down
    for overloaded experts and up for underloaded ones every step (by the optimiser; see models/moe.md)"""

    def experts_in_layer(self, moe_layer: int) -> int:
        """Experts of the `moe_layer`-th MoE layer (counting MoE layers only)."""
        if isinstance(self.n_experts, int):
            return self.n_experts
        return self.n_experts[moe_layer]

    def hidden_dim(self, d_model: int, mlp_dim: int) -> int:
        if self.expert_dim is not None:
            return self.expert_dim
        return {"cdac": max(1, round(self.ratio * d_model)), "dcca": d_model, "residual": mlp_dim}[self.structure]

    def low_dim(self, d_model: int) -> int:
        """r h: the width of dcca's shared projections."""
        return max(1, round(self.ratio * d_model))



class S2Config(Section):
    """S2-Attention token mixers (`model.mixer_pattern: [s2, attention]` alternates sparse and dense layers) and
    LongGen's `sink_window` mixer; see [models/s2.md](models/s2.md). Blocks are `block_size` tokens; patterns are
    per KV head."""


    block_size: PositiveInt = 64
    """tokens per block"""
    local_blocks: PositiveInt = 4
    """sliding window in blocks, the diagonal block included (both mixers)"""
    vert_stride: PositiveInt = 4
    """`s2`: every `vert_stride`-th block (by absolute position, shifted per head) is also read"""
    head_sliding_step: Annotated[int, Field(ge=0)] | None = None
    """shift of the vertical residue per KV head; null = max(1, vert_stride // n_heads); 0 = every head the same
    residue (the homogeneous ablation)"""
    head_offset: Annotated[int, Field(ge=0)] = 0
    """added to every head's residue"""
    num_dense_heads: Annotated[int, Field(ge=0)] = 0
    """`s2`: the last this many KV heads read every causal block"""
    sink_blocks: Annotated[int, Field(ge=0)] = 1
    """`sink_window`: the first this many blocks are always read (attention sinks)"""
    impl: Annotated[Literal["auto", "reference", "xla", "pallas"], MAY_CHANGE] = "auto"
    """`auto` (Pallas on GPU/TPU, xla on CPU), `reference` (dense attention, masked), `xla` (gathers kept blocks), `pallas`"""


class InfllmConfig(Section):
    """InfLLM v2 sparse attention (MiniCPM4): `model.mixer_pattern: [infllm]`; see [models/infllm.md](models/infllm.md).
    No parameters of its own: each query scores mean-pooled keys, keeps the best blocks and attends only those.
    Defaults keep the blocks MiniCPM4's current code keeps for its `sparse_config` (topk 64, window 2048 = 32 blocks
    of 64): the query's block and the 32 before it forced, 1 init block, 62 chosen: 96 per late query."""

    kernel_size: PositiveInt = 32
    """keys per pooled key ("semantic kernel"): the mean of `kernel_size` consecutive keys"""
    kernel_stride: PositiveInt = 16
    """tokens between the starts of consecutive pooled keys"""
    block_size: PositiveInt = 64
    """tokens per selectable KV block"""
    init_blocks: Annotated[int, Field(ge=0)] = 1
    """the first this many blocks are always read (they count towards `topk`, as in MiniCPM4's code)"""
    local_blocks: PositiveInt = 33
    """the query's own block and the `local_blocks - 1` before it are always read (the local window; MiniCPM4's
    `window_size / block_size` + 1)"""
    topk: Annotated[int, Field(ge=0)] = 63
    """blocks chosen per query by score, init blocks included (the local window comes on top; MiniCPM4's `topk` - 1,
    as its top-k also holds the forced local blocks)"""
    dense_len: Annotated[int, Field(ge=0)] = 8192
    """a query whose context (position + 1) is shorter than this reads every causal block, so shorter sequences are
    dense causal attention; 0 = always sparse"""
    impl: Annotated[Literal["auto", "reference", "xla", "pallas"], MAY_CHANGE] = "auto"
    """`auto` (Pallas on GPU/TPU, xla on CPU), `reference` (dense attention, masked), `xla` (masked, one query block at a time), `pallas`"""
