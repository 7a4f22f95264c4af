"""Mixture-of-experts channel mixer (`model.channel_mixer_pattern: [moe]`, settings in `model.moe`).

Shape letters: B batch, S sequence, N = B S tokens (flattened), D model width, E experts, A expert choices per
token (top_k), P payload width (what travels to the experts: D, or r D for dcca), M expert hidden width,
Q capacity slots per expert (docs/architecture.md). Flattened token-choices carry no suffix; their shapes are
written as products, e.g. [N*A, P].

    logits_NE = x W_router                                 routing always reads the full-width x [N, D]
    payload_NP = x (cdac, residual) | x W_descend (dcca)   what travels to the experts
    y_payload = sum_{a < A} gate_a E_{expert_a}(payload)   E_i(z) = gelu(z W_in_i) W_out_i
    y = y_payload (cdac) | y_payload W_ascend (dcca) | c_0 y_payload + c_1 MLP(x) (residual, c = softmax(x W_c))

The router runs once per layer: the same logits, probabilities, choices and gates feed the dispatch and the
auxiliary losses (routing is per token, so routing all N tokens before splitting them over devices is the same as
each device routing its own).

Dispatch with capacity (the default): each expert takes at most Q = ceil(capacity_factor * N * A / E) of a
device's token-choices (N = that device's tokens), in the order (choice rank, token index): all first choices
before any second choice, earlier tokens first. A token-choice beyond Q is dropped (it contributes nothing; the
residual stream carries the token on). Kept token-choices are scattered into a buffer [E, Q, P].
With expert parallelism (`mesh.expert` = ep > 1) the layer runs under `jax.shard_map`: the buffer's expert axis is
split over the `expert` mesh axis by an all-to-all, each device runs its E / ep experts on the tokens of all
ep devices, and a second all-to-all brings the results home, where the gates are applied. Only payloads travel
(gates stay where the token lives), so dcca's all-to-alls carry exactly r times cdac's bytes. With
`capacity_factor: null` (dropless) token-choices are sorted by expert and the experts run as grouped matmuls
(`jax.lax.ragged_dot`); across expert-parallel devices the sorted token-choices travel by ragged all-to-all
(emulated by a padded dense all-to-all on XLA:CPU, which cannot compile the ragged one).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.errors import ConfigError
from jaxeff.layers.common import normal_init, output_std, projection
from jaxeff.layers.registry import ChannelMixerSpec, register_channel_mixer
from jaxeff.parallel.sharding import BATCH_AXES, sequence_axis

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig

# ---------------------------------------------------------------------------------------------- routing


def route(logits_NE, top_k: int, normalize: bool, bias_E=None):
    """(experts [N, A] int32, gates [N, A] float32, probs [N, E]). The bias (balancing) changes which experts are
    chosen, never the gate values."""
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    scores_NE = probs_NE if bias_E is None else probs_NE + jax.lax.stop_gradient(bias_E)
    _, experts_NA = jax.lax.top_k(jax.lax.stop_gradient(scores_NE), top_k)
    gates_NA = jnp.take_along_axis(probs_NE, experts_NA, axis=-1)
    if normalize:
        gates_NA = gates_NA / jnp.sum(gates_NA, axis=-1, keepdims=True)
    return experts_NA.astype(jnp.int32), gates_NA, probs_NE


def expert_load(experts_NA, n_experts: int):
    """f [E]: the share of all token-choices assigned to each expert (before any dropping)."""
    counts_E = jnp.sum(jax.nn.one_hot(experts_NA, n_experts, dtype=jnp.float32), axis=(0, 1))
    return counts_E / experts_NA.size


def load_balance_loss(probs_NE, experts_NA):
    """Switch-style E * sum_i f_i P_i; 1 when routing is uniform."""
    n_experts = probs_NE.shape[-1]
    return n_experts * jnp.sum(expert_load(experts_NA, n_experts) * jnp.mean(probs_NE, axis=0))


def router_z_loss(logits_NE):
    return jnp.mean(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1) ** 2)


def router_entropy(probs_NE):
    return jnp.mean(-jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), axis=-1))


def capacity(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * tokens * top_k / n_experts))


def dispatch_slots(experts_NA, n_experts: int, slots_per_expert: int):
    """(slot [N, A], kept [N, A]): slot = expert * Q + position among that expert's token-choices, ordered by
    (choice rank, token); token-choices at position >= Q are dropped (slot = E * Q, out of range)."""
    n, a = experts_NA.shape
    choices = experts_NA.T.reshape(-1)  # [A*N], choice-major: every token's first choice, then every second
    onehot = jax.nn.one_hot(choices, n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    kept = position < slots_per_expert
    slot = jnp.where(kept, choices * slots_per_expert + position, n_experts * slots_per_expert)
    return slot.reshape(a, n).T, kept.reshape(a, n).T


def _scatter(payload_NP, slot_NA, n_experts: int, slots_per_expert: int):
    """buffer [E, Q, P] with each kept token-choice's payload in its slot (dropped ones go nowhere)."""
    n, a = slot_NA.shape
    width = payload_NP.shape[-1]
    rows = jnp.broadcast_to(payload_NP[:, None], (n, a, width)).reshape(n * a, width)  # [N*A, P]
    buffer = jnp.zeros((n_experts * slots_per_expert, width), payload_NP.dtype)
    buffer = buffer.at[slot_NA.reshape(-1)].set(rows, mode="drop")
    return buffer.reshape(n_experts, slots_per_expert, width)


def _gather_combine(out_EQP, slot_NA, gates_NA):
    """y [N, P] = sum over the A choices of gate * output of the token-choice's slot (0 where dropped)."""
    picked_NAP = jnp.take(out_EQP.reshape(-1, out_EQP.shape[-1]), slot_NA, axis=0, mode="fill", fill_value=0)
    return jnp.sum(picked_NAP * gates_NA[..., None].astype(picked_NAP.dtype), axis=1)


def _experts(buffer_EQP, w_in_EPM, w_out_EMP):
    hidden_EQM = nn.gelu(jnp.einsum("eqp,epm->eqm", buffer_EQP, w_in_EPM))
    return jnp.einsum("eqm,emp->eqp", hidden_EQM, w_out_EMP)


# ---------------------------------------------------------------------------------------------- one device's share


def _capacity_moe(experts_NA, gates_NA, payload_NP, w_in_EPM, w_out_EMP, *, n_experts, factor, expert_axis, ep,
                  tensor_axis):
    """The routed tokens of one device through the experts; returns (y [N, P], dropped share)."""
    slots = capacity(payload_NP.shape[0], experts_NA.shape[-1], n_experts, factor)
    slot_NA, kept_NA = dispatch_slots(experts_NA, n_experts, slots)
    buffer_EQP = _scatter(payload_NP, slot_NA, n_experts, slots)
    if ep > 1:  # [E, Q, P] -> [E / ep, ep * Q, P]: this device's experts, every device's tokens
        buffer_EQP = jax.lax.all_to_all(buffer_EQP, expert_axis, split_axis=0, concat_axis=1, tiled=True)
    out_EQP = _experts(buffer_EQP, w_in_EPM, w_out_EMP)
    if tensor_axis is not None:  # the hidden width is split over "tensor": partial sums
        out_EQP = jax.lax.psum(out_EQP, tensor_axis)
    if ep > 1:  # back to [E, Q, P]: every expert's results for this device's tokens
        out_EQP = jax.lax.all_to_all(out_EQP, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y_NP = _gather_combine(out_EQP, slot_NA, gates_NA)
    return y_NP, jnp.mean((~kept_NA).astype(jnp.float32))


def _dropless_moe(experts_NA, gates_NA, payload_NP, w_in_EPM, w_out_EMP, *, n_experts, tensor_axis, **_):
    """Every token-choice computed: sort by expert, grouped matmuls, unsort. Needs all experts on this device."""
    top_k = experts_NA.shape[-1]
    choices = experts_NA.reshape(-1)  # [N*A], token-major
    order = jnp.argsort(choices, stable=True)
    rows = payload_NP[order // top_k]  # [N*A, P]
    group_sizes_E = jnp.bincount(choices, length=n_experts).astype(jnp.int32)
    hidden = nn.gelu(jax.lax.ragged_dot(rows, w_in_EPM, group_sizes_E))  # [N*A, M]
    out = jax.lax.ragged_dot(hidden, w_out_EMP, group_sizes_E)  # [N*A, P]
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    unsorted_NAP = jnp.zeros_like(out).at[order].set(out).reshape(*experts_NA.shape, -1)
    return jnp.sum(unsorted_NAP * gates_NA[..., None].astype(out.dtype), axis=1), jnp.zeros((), jnp.float32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_size: int):
    """`jax.lax.ragged_all_to_all` built from a dense all-to-all (each peer's slice padded to the operand's length):
    the same result, for XLA:CPU, which cannot compile the ragged collective. Tests run the dropless
    expert-parallel path through it."""
    n = operand.shape[0]
    rows = jnp.arange(n)
    send = jnp.take(operand, jnp.clip(input_offsets[:, None] + rows[None], 0, n - 1), axis=0)  # [ep, n, width]
    send = jnp.where((rows[None] < send_sizes[:, None])[..., None], send, 0)
    got = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [ep (source), n, width]
    where_on_me = jax.lax.all_to_all(output_offsets.reshape(axis_size, 1), axis_name, 0, 0, tiled=True)[:, 0]
    target = jnp.where(rows[None] < recv_sizes[:, None], where_on_me[:, None] + rows[None], output.shape[0])
    return output.at[target.reshape(-1)].set(got.reshape(-1, got.shape[-1]), mode="drop")


def _exchange_offsets(values_ep, axis_name, ep):
    """Each device's [ep] vector, transposed across devices: entry s of the result is device s's entry for me."""
    return jax.lax.all_to_all(values_ep.reshape(ep, 1), axis_name, 0, 0, tiled=True)[:, 0]


def _dropless_ep_moe(experts_NA, gates_NA, payload_NP, w_in_EPM, w_out_EMP, *, n_experts, expert_axis, ep,
                     tensor_axis, ragged_exchange, **_):
    """Dropless with experts on several devices: token-choices sorted by expert travel by ragged all-to-all
    (exact sizes, nothing dropped), are regrouped by local expert for grouped matmuls, and go back the same way.
    Here w_in / w_out hold this device's E / ep experts."""
    top_k = experts_NA.shape[-1]
    local = n_experts // ep
    choices = experts_NA.reshape(-1)  # [N*A]
    order = jnp.argsort(choices, stable=True)
    rows = payload_NP[order // top_k]  # [N*A, P] sorted by global expert: contiguous per destination device
    per_expert_E = jnp.bincount(choices, length=n_experts).astype(jnp.int32)
    send_sizes = per_expert_E.reshape(ep, local).sum(-1)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_counts = jax.lax.all_to_all(per_expert_E.reshape(ep, local), expert_axis, 0, 0, tiled=True)  # [src, local]
    recv_sizes = recv_counts.sum(-1)
    my_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where each source's slice starts in my buffer
    output_offsets = _exchange_offsets(my_offsets, expert_axis, ep)  # where my slices start on each receiver
    capacity_rows = ep * rows.shape[0]  # every device could send me all of its token-choices
    # Output buffers derived from the rows so that they vary over the devices like the data they receive.
    received = ragged_exchange(rows, jnp.broadcast_to(rows[:1] * 0, (capacity_rows, rows.shape[-1])),
                               input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=expert_axis)
    # group by local expert (stable: source order kept inside a group); unused rows sort last
    expert_of_row = jnp.repeat(jnp.tile(jnp.arange(local), ep), recv_counts.reshape(-1),
                               total_repeat_length=capacity_rows)
    expert_of_row = jnp.where(jnp.arange(capacity_rows) < recv_sizes.sum(), expert_of_row, local)
    regroup = jnp.argsort(expert_of_row, stable=True)
    group_sizes = recv_counts.sum(0)
    hidden = nn.gelu(jax.lax.ragged_dot(received[regroup], w_in_EPM, group_sizes))  # [ep*N*A, M]
    out = jax.lax.ragged_dot(hidden, w_out_EMP, group_sizes)  # [ep*N*A, P]
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    out = jnp.zeros_like(out).at[regroup].set(out)  # back to the received order
    back_offsets = _exchange_offsets(input_offsets, expert_axis, ep)  # where each source keeps its slice for me
    returned = ragged_exchange(out, rows * 0, my_offsets, recv_sizes, back_offsets, send_sizes,
                               axis_name=expert_axis)
    unsorted_NAP = jnp.zeros_like(returned).at[order].set(returned).reshape(*experts_NA.shape, -1)
    return jnp.sum(unsorted_NAP * gates_NA[..., None].astype(returned.dtype), axis=1), jnp.zeros((), jnp.float32)


def expert_layer(experts_BSA, gates_BSA, payload_BSP, w_in_EPM, w_out_EMP, *, capacity_factor: float | None):
    """(y [B, S, P], dropped share) for the whole batch, from a routing already done (`route`). Under a mesh
    (`jax.set_mesh`) the work is split by `jax.shard_map`: tokens over the batch axes, experts over "expert",
    expert hidden width over "tensor"."""
    n_experts = w_in_EPM.shape[0]
    local = functools.partial(_dropless_moe if capacity_factor is None else _capacity_moe, n_experts=n_experts,
                              factor=capacity_factor)
    mesh = jax.sharding.get_abstract_mesh()
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    if mesh.empty or mesh.size == 1:
        y_NP, dropped = local(flat(experts_BSA), flat(gates_BSA), flat(payload_BSP), w_in_EPM, w_out_EMP,
                              expert_axis=None, ep=1, tensor_axis=None)
        return y_NP.reshape(payload_BSP.shape), dropped
    ep, tp = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if capacity_factor is None and ep > 1:  # dropless across devices: ragged all-to-all (emulated on CPU)
        def ragged_exchange(*args, axis_name):
            def emulated():
                return emulated_ragged_all_to_all(*args, axis_name=axis_name, axis_size=ep)

            def native():
                return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

            return jax.lax.platform_dependent(cpu=emulated, default=native)

        local = functools.partial(_dropless_ep_moe, n_experts=n_experts, ragged_exchange=ragged_exchange)

    def body(experts, gates, payload, w_in, w_out):
        y_NP, dropped = local(flat(experts), flat(gates), flat(payload), w_in, w_out, expert_axis="expert", ep=ep,
                              tensor_axis="tensor" if tp > 1 else None)
        return y_NP.reshape(payload.shape), jax.lax.pmean(dropped, token_axes)

    # Tokens are independent here: a sequence split is more batch (each device routes its own chunk of every row).
    sequence = sequence_axis()
    token_axes = batch_axes + ((sequence,) if sequence else ())
    tokens = P(batch_axes, sequence, None)
    tensor = "tensor" if tp > 1 else None  # a size-1 axis in the specs would make the outputs "vary" over it
    run = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, P("expert", None, tensor),
                                                  P("expert", tensor, None)),
                        out_specs=(tokens, P()))
    return run(experts_BSA, gates_BSA, payload_BSP, w_in_EPM, w_out_EMP)


# ---------------------------------------------------------------------------------------------- the layer


def moe_layer_index(cfg: ModelConfig, layer: int) -> int:
    """How many MoE layers come before `layer` (its index among the MoE layers)."""
    return sum(1 for i in range(layer) if cfg.channel_mixer(i) == "moe")


class MoE(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD):
        cfg, sec = self.cfg, self.cfg.moe
        d, n_experts = cfg.d_model, sec.experts_in_layer(moe_layer_index(cfg, self.layer_index))
        hidden = sec.hidden_dim(d, cfg.mlp_dim)
        router_DE = self.param("router", normal_init(cfg.init_std, ("embed", None)), (d, n_experts), jnp.float32)
        logits_NE = jnp.einsum("bsd,de->bse", x_BSD.astype(jnp.float32), router_DE).reshape(-1, n_experts)
        bias_E = None
        if sec.bias_balancing:
            bias_E = self.param("balance_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                                (n_experts,), jnp.float32)
        # The one routing of this layer: it drives the dispatch and the auxiliary losses.
        experts_NA, gates_NA, probs_NE = route(logits_NE, sec.top_k, sec.normalize_top_k, bias_E)

        payload_BSP = x_BSD
        if sec.structure == "dcca":  # BigMac: descend before the dispatch
            payload_BSP = projection(sec.low_dim(d), -1, ("embed", None), cfg.init_std, self.dtype, "descend")(x_BSD)
        width = payload_BSP.shape[-1]
        w_in_EPM = self.param("w_in", normal_init(cfg.init_std, ("expert", None, "mlp")), (n_experts, width, hidden),
                              jnp.float32)
        w_out_EMP = self.param("w_out", normal_init(output_std(cfg), ("expert", "mlp", None)),
                               (n_experts, hidden, width), jnp.float32)
        per_token = lambda a_NA: a_NA.reshape(*x_BSD.shape[:-1], sec.top_k)  # noqa: E731  [B, S, A]
        y_BSP, dropped = expert_layer(per_token(experts_NA), per_token(gates_NA), payload_BSP,
                                      w_in_EPM.astype(self.dtype), w_out_EMP.astype(self.dtype),
                                      capacity_factor=sec.capacity_factor)
        y_BSD = y_BSP
        if sec.structure == "dcca":  # ... and ascend after the combine
            y_BSD = projection(d, -1, (None, "embed"), output_std(cfg), self.dtype, "ascend")(y_BSP)
        if sec.structure == "residual":
            dense = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "dense_in")(x_BSD)
            dense = projection(d, -1, ("mlp", "embed"), output_std(cfg), self.dtype, "dense_out")(nn.gelu(dense))
            mix = jax.nn.softmax(projection(2, -1, ("embed", None), cfg.init_std, jnp.float32, "mix")(x_BSD), -1)
            y_BSD = mix[..., :1].astype(y_BSD.dtype) * y_BSD + mix[..., 1:].astype(y_BSD.dtype) * dense
        return y_BSD.astype(x_BSD.dtype), self._aux(logits_NE, probs_NE, experts_NA, bias_E, dropped)

    def _aux(self, logits_NE, probs_NE, experts_NA, bias_E, dropped):
        """Losses (added to the training loss) and per-layer routing statistics, from the layer's one routing."""
        sec = self.cfg.moe
        load_E = expert_load(experts_NA, logits_NE.shape[-1])
        tag = f"moe/layer{self.layer_index}"
        aux = {f"loss/{tag}/balance": sec.load_balance_weight * load_balance_loss(probs_NE, experts_NA),
               f"loss/{tag}/z": sec.z_loss_weight * router_z_loss(logits_NE),
               f"aux/{tag}/dropped": dropped, f"aux/{tag}/entropy": router_entropy(probs_NE),
               f"aux/{tag}/max_load": jnp.max(load_E) * load_E.shape[0]}  # 1 = perfectly even
        if bias_E is not None:
            # Zero-valued; its gradient w.r.t. the bias is (load - mean load), so the optimiser lowers the bias of
            # overloaded experts and raises it for underloaded ones (auxiliary-loss-free balancing).
            push = jnp.sum(bias_E * jax.lax.stop_gradient(load_E - jnp.mean(load_E)))
            aux[f"loss/{tag}/bias_balancing"] = push - jax.lax.stop_gradient(push)
        return aux


def moe_flops_per_token(cfg: ModelConfig, layer: int) -> float:
    """Forward FLOPs of the experts a token actually uses (top-k), the router and the shared projections."""
    sec = cfg.moe
    d, n_experts = cfg.d_model, sec.experts_in_layer(moe_layer_index(cfg, layer))
    width = sec.low_dim(d) if sec.structure == "dcca" else d
    flops = 2 * d * n_experts + sec.top_k * 2 * 2 * width * sec.hidden_dim(d, cfg.mlp_dim)
    if sec.structure == "dcca":
        flops += 2 * 2 * d * width
    if sec.structure == "residual":
        flops += 2 * 2 * d * cfg.mlp_dim + 2 * d * 2
    return flops


def inactive_expert_params(cfg: ModelConfig, layer: int) -> int:
    """Expert weights of MoE layer `layer` a token does not use: E - top_k experts. Total minus these = active."""
    sec = cfg.moe
    width = sec.low_dim(cfg.d_model) if sec.structure == "dcca" else cfg.d_model
    per_expert = 2 * width * sec.hidden_dim(cfg.d_model, cfg.mlp_dim)
    return (sec.experts_in_layer(moe_layer_index(cfg, layer)) - sec.top_k) * per_expert


def check_moe(cfg: Config, key: str, mesh_shape=None) -> None:
    """Expert counts against the layers and top_k; against mesh.expert once the mesh is resolved (-1 filled in)."""
    m, sec = cfg.model, cfg.model.moe
    n_moe = sum(1 for i in range(m.n_layers) if m.channel_mixer(i) == "moe")
    if isinstance(sec.n_experts, list) and len(sec.n_experts) != n_moe:
        raise ConfigError(f"{key}.n_experts has {len(sec.n_experts)} entries but the model has {n_moe} MoE layers; "
                          "give one count per MoE layer (or a single number)")
    counts = sec.n_experts if isinstance(sec.n_experts, list) else [sec.n_experts]
    if sec.top_k > min(counts):
        raise ConfigError(f"{key}.top_k={sec.top_k} is larger than the {min(counts)} experts of a layer")
    if sec.structure == "residual" and sec.top_k != 1:
        raise ConfigError(f"{key}.structure=residual uses one expert per token; set {key}.top_k=1")
    ep = mesh_shape["expert"] if mesh_shape else cfg.mesh.expert
    uneven = [n for n in counts if ep > 0 and n % ep]
    if uneven:
        resolved = f" (resolved from -1)" if mesh_shape and cfg.mesh.expert == -1 else ""
        raise ConfigError(f"{key}.n_experts {uneven} not divisible by mesh.expert={ep}{resolved}; every "
                          "expert-parallel device holds the same number of experts")


def dropless_for_decoding(cfg: ModelConfig) -> ModelConfig:
    """Decoding routes every token to its experts (capacity_factor None): with a capacity, a call over several
    tokens drops some of them and its logits differ from one-token calls' (speculative verification, prefill)."""
    return cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"capacity_factor": None})})


register_channel_mixer(ChannelMixerSpec("moe", MoE, moe_flops_per_token, section="moe", check=check_moe,
                                        inactive_params=inactive_expert_params, for_decoding=dropless_for_decoding))
