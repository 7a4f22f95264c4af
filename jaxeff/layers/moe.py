"""Mixture-of-experts channel mixer (`model.channel_mixer_pattern: [moe]`, settings in `model.moe`).

    logits = x W_router                                   routing always reads the full-width x [T, h]
    payload = x (cdac, residual) | x W_descend (dcca)      what travels to the experts: [T, P], P = h or r h
    y_payload = sum_{i in top-k} gate_i E_i(payload)       E_i(z) = gelu(z W_in_i) W_out_i
    y = y_payload (cdac) | y_payload W_ascend (dcca) | c_0 y_payload + c_1 MLP(x) (residual, c = softmax(x W_c))

Dispatch with capacity (the default): every device routes its own tokens; each expert takes at most
C = ceil(capacity_factor * T * top_k / E) of them per device, in the order (choice rank, token index): all
first choices before any second choice, earlier tokens first. A token-choice beyond C is dropped (it contributes
nothing; the residual stream carries the token on). Kept assignments are scattered into a buffer [E, C, P].
With expert parallelism (`mesh.expert` = ep > 1) the layer runs under `jax.shard_map`: the buffer's expert axis is
split over the `expert` mesh axis by an all-to-all, each device runs its E / ep experts on the tokens of all
ep devices, and a second all-to-all brings the results home, where the gates are applied. Only payloads travel
(gates stay where the token lives), so dcca's all-to-alls carry exactly r times cdac's bytes. With
`capacity_factor: null` (dropless) assignments are sorted by expert and the experts run as grouped matmuls
(`jax.lax.ragged_dot`); across expert-parallel devices the sorted token-choices travel by ragged all-to-all
(emulated by a padded dense all-to-all on XLA:CPU, which cannot compile the ragged one).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.config import ModelConfig
from jaxeff.layers.common import normal_init, output_std, projection
from jaxeff.layers.registry import ChannelMixerSpec, register_channel_mixer
from jaxeff.parallel.sharding import BATCH_AXES

# ---------------------------------------------------------------------------------------------- routing


def route(logits_TE, top_k: int, normalize: bool, bias_E=None):
    """(experts [T, k] int32, gates [T, k] float32, probs [T, E]). The bias (balancing) changes which experts are
    chosen, never the gate values."""
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    scores = probs_TE if bias_E is None else probs_TE + jax.lax.stop_gradient(bias_E)
    _, experts_TK = jax.lax.top_k(jax.lax.stop_gradient(scores), top_k)
    gates_TK = jnp.take_along_axis(probs_TE, experts_TK, axis=-1)
    if normalize:
        gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
    return experts_TK.astype(jnp.int32), gates_TK, probs_TE


def expert_load(experts_TK, n_experts: int):
    """f [E]: the share of all token-choices assigned to each expert (before any dropping)."""
    counts = jnp.sum(jax.nn.one_hot(experts_TK, n_experts, dtype=jnp.float32), axis=(0, 1))
    return counts / experts_TK.size


def load_balance_loss(probs_TE, experts_TK):
    """Switch-style E * sum_i f_i P_i; 1 when routing is uniform."""
    n_experts = probs_TE.shape[-1]
    return n_experts * jnp.sum(expert_load(experts_TK, n_experts) * jnp.mean(probs_TE, axis=0))


def router_z_loss(logits_TE):
    return jnp.mean(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1) ** 2)


def router_entropy(probs_TE):
    return jnp.mean(-jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1))


def capacity(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * tokens * top_k / n_experts))


def dispatch_slots(experts_TK, n_experts: int, slots_per_expert: int):
    """(slot [T, k], kept [T, k]): slot = expert * C + position among that expert's assignments, ordered by
    (choice rank, token); assignments at position >= C are dropped (slot = E * C, out of range)."""
    t, k = experts_TK.shape
    flat = experts_TK.T.reshape(-1)  # choice-major: every token's first choice, then every second choice
    onehot = jax.nn.one_hot(flat, n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    kept = position < slots_per_expert
    slot = jnp.where(kept, flat * slots_per_expert + position, n_experts * slots_per_expert)
    return slot.reshape(k, t).T, kept.reshape(k, t).T


def _scatter(payload_TP, slot_TK, n_slots: int):
    """[n_slots, P] with each kept token-choice's payload in its slot (dropped ones go nowhere)."""
    t, k = slot_TK.shape
    rows = jnp.broadcast_to(payload_TP[:, None], (t, k, payload_TP.shape[-1])).reshape(t * k, -1)
    return jnp.zeros((n_slots, payload_TP.shape[-1]), payload_TP.dtype).at[slot_TK.reshape(-1)].set(rows, mode="drop")


def _gather_combine(out_SP, slot_TK, gates_TK):
    """y [T, P] = sum_k gate * output of the token's slot (0 for dropped assignments)."""
    picked = jnp.take(out_SP, slot_TK, axis=0, mode="fill", fill_value=0)  # [T, k, P]
    return jnp.sum(picked * gates_TK[..., None].astype(picked.dtype), axis=1)


def _experts(buf_ECP, w_in_EPF, w_out_EFP):
    h = nn.gelu(jnp.einsum("ecp,epf->ecf", buf_ECP, w_in_EPF))
    return jnp.einsum("ecf,efp->ecp", h, w_out_EFP)


# ---------------------------------------------------------------------------------------------- one device's share


def _capacity_moe(logits_TE, payload_TP, w_in, w_out, bias_E, *, top_k, normalize, factor, expert_axis, ep,
                  tensor_axis):
    """The tokens of one device through the experts; returns (y [T, P], dropped share)."""
    n_experts = logits_TE.shape[-1]
    experts, gates, _ = route(logits_TE, top_k, normalize, bias_E)
    c = capacity(payload_TP.shape[0], top_k, n_experts, factor)
    slot, kept = dispatch_slots(experts, n_experts, c)
    buf = _scatter(payload_TP, slot, n_experts * c).reshape(n_experts, c, -1)
    if ep > 1:  # [E, C, P] -> [E / ep, ep * C, P]: this device's experts, every device's tokens
        buf = jax.lax.all_to_all(buf, expert_axis, split_axis=0, concat_axis=1, tiled=True)
    out = _experts(buf, w_in, w_out)
    if tensor_axis is not None:  # the hidden width is split over "tensor": partial sums
        out = jax.lax.psum(out, tensor_axis)
    if ep > 1:
        out = jax.lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y = _gather_combine(out.reshape(n_experts * c, -1), slot, gates)
    return y, jnp.mean((~kept).astype(jnp.float32))


def _dropless_moe(logits_TE, payload_TP, w_in, w_out, bias_E, *, top_k, normalize, tensor_axis, **_):
    """Every assignment computed: sort by expert, grouped matmuls, unsort. Needs all experts on this device."""
    n_experts = logits_TE.shape[-1]
    experts, gates, _ = route(logits_TE, top_k, normalize, bias_E)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = payload_TP[order // top_k]
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    hidden = nn.gelu(jax.lax.ragged_dot(rows, w_in, group_sizes))
    out = jax.lax.ragged_dot(hidden, w_out, group_sizes)
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(*experts.shape, -1)
    return jnp.sum(unsorted * gates[..., None].astype(out.dtype), axis=1), jnp.zeros((), jnp.float32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_size: int):
    """`jax.lax.ragged_all_to_all` built from a dense all-to-all (each peer's slice padded to the operand's length):
    the same result, for XLA:CPU, which cannot compile the ragged collective. Tests run the dropless
    expert-parallel path through it."""
    n = operand.shape[0]
    rows = jnp.arange(n)
    send = jnp.take(operand, jnp.clip(input_offsets[:, None] + rows[None], 0, n - 1), axis=0)  # [ep, N, P]
    send = jnp.where((rows[None] < send_sizes[:, None])[..., None], send, 0)
    got = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [ep (source), N, P]
    where_on_me = jax.lax.all_to_all(output_offsets.reshape(axis_size, 1), axis_name, 0, 0, tiled=True)[:, 0]
    target = jnp.where(rows[None] < recv_sizes[:, None], where_on_me[:, None] + rows[None], output.shape[0])
    return output.at[target.reshape(-1)].set(got.reshape(-1, got.shape[-1]), mode="drop")


def _exchange_offsets(values_ep, axis_name, ep):
    """Each device's [ep] vector, transposed across devices: entry s of the result is device s's entry for me."""
    return jax.lax.all_to_all(values_ep.reshape(ep, 1), axis_name, 0, 0, tiled=True)[:, 0]


def _dropless_ep_moe(logits_TE, payload_TP, w_in, w_out, bias_E, *, top_k, normalize, expert_axis, ep,
                     tensor_axis, ragged_exchange, **_):
    """Dropless with experts on several devices: token-choices sorted by expert travel by ragged all-to-all
    (exact sizes, nothing dropped), are regrouped by local expert for grouped matmuls, and go back the same way."""
    n_experts = logits_TE.shape[-1]
    local = n_experts // ep
    experts, gates, _ = route(logits_TE, top_k, normalize, bias_E)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = payload_TP[order // top_k]  # [A, P], sorted by global expert, so contiguous per destination device
    per_expert = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    send_sizes = per_expert.reshape(ep, local).sum(-1)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_counts = jax.lax.all_to_all(per_expert.reshape(ep, local), expert_axis, 0, 0, tiled=True)  # [src, local]
    recv_sizes = recv_counts.sum(-1)
    my_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where each source's slice starts in my buffer
    output_offsets = _exchange_offsets(my_offsets, expert_axis, ep)  # where my slices start on each receiver
    capacity_rows = ep * rows.shape[0]  # every device could send me all of its token-choices
    # Output buffers derived from `rows` so that they vary over the devices like the data they receive.
    received = ragged_exchange(rows, jnp.broadcast_to(rows[:1] * 0, (capacity_rows, rows.shape[-1])), input_offsets,
                               send_sizes, output_offsets, recv_sizes, axis_name=expert_axis)
    # group by local expert (stable: source order kept inside a group); unused rows sort last
    expert_of_row = jnp.repeat(jnp.tile(jnp.arange(local), ep), recv_counts.reshape(-1),
                               total_repeat_length=capacity_rows)
    expert_of_row = jnp.where(jnp.arange(capacity_rows) < recv_sizes.sum(), expert_of_row, local)
    regroup = jnp.argsort(expert_of_row, stable=True)
    group_sizes = recv_counts.sum(0)
    hidden = nn.gelu(jax.lax.ragged_dot(received[regroup], w_in, group_sizes))
    out = jax.lax.ragged_dot(hidden, w_out, group_sizes)
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    out = jnp.zeros_like(out).at[regroup].set(out)  # back to the received order
    back_offsets = _exchange_offsets(input_offsets, expert_axis, ep)  # where each source keeps its slice for me
    returned = ragged_exchange(out, rows * 0, my_offsets, recv_sizes, back_offsets, send_sizes,
                               axis_name=expert_axis)
    unsorted = jnp.zeros_like(returned).at[order].set(returned).reshape(*experts.shape, -1)
    return jnp.sum(unsorted * gates[..., None].astype(returned.dtype), axis=1), jnp.zeros((), jnp.float32)


def expert_layer(logits_BSE, payload_BSP, w_in_EPF, w_out_EFP, bias_E=None, *, top_k: int, normalize: bool,
                 capacity_factor: float | None):
    """(y [B, S, P], dropped share) for the whole batch. Under a mesh (`jax.set_mesh`) the work is split by
    `jax.shard_map`: tokens over the batch axes, experts over "expert", expert hidden width over "tensor"."""
    local = functools.partial(_dropless_moe if capacity_factor is None else _capacity_moe, top_k=top_k,
                              normalize=normalize, factor=capacity_factor)
    mesh = jax.sharding.get_abstract_mesh()
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    if mesh.empty or mesh.size == 1:
        y, dropped = local(flat(logits_BSE), flat(payload_BSP), w_in_EPF, w_out_EFP, bias_E, expert_axis=None, ep=1,
                           tensor_axis=None)
        return y.reshape(payload_BSP.shape), dropped
    ep, tp = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if capacity_factor is None and ep > 1:  # dropless across devices: ragged all-to-all (emulated on CPU)
        def ragged_exchange(*args, axis_name):
            def emulated():
                return emulated_ragged_all_to_all(*args, axis_name=axis_name, axis_size=ep)

            def native():
                return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

            return jax.lax.platform_dependent(cpu=emulated, default=native)

        local = functools.partial(_dropless_ep_moe, top_k=top_k, normalize=normalize, ragged_exchange=ragged_exchange)

    def body(logits, payload, w_in, w_out, bias):
        y, dropped = local(flat(logits), flat(payload), w_in, w_out, bias, expert_axis="expert", ep=ep,
                           tensor_axis="tensor" if tp > 1 else None)
        return y.reshape(payload.shape), jax.lax.pmean(dropped, batch_axes)

    tokens = P(batch_axes, None, None)
    bias = jnp.zeros(logits_BSE.shape[-1], jnp.float32) if bias_E is None else bias_E
    tensor = "tensor" if tp > 1 else None  # a size-1 axis in the specs would make the outputs "vary" over it
    run = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, P("expert", None, tensor), P("expert", tensor, None),
                                                  P()),
                        out_specs=(tokens, P()))
    return run(logits_BSE, payload_BSP, w_in_EPF, w_out_EFP, bias)


# ---------------------------------------------------------------------------------------------- the layer


def moe_layer_index(cfg: ModelConfig, layer: int) -> int:
    """How many MoE layers come before `layer` (its index among the MoE layers)."""
    pattern = cfg.channel_mixer_pattern
    return sum(1 for i in range(layer) if pattern[i % len(pattern)] == "moe")


class MoE(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD):
        cfg, sec = self.cfg, self.cfg.moe
        d, n_experts = cfg.d_model, sec.experts_in_layer(moe_layer_index(cfg, self.layer_index))
        hidden = sec.hidden_dim(d, cfg.mlp_dim)
        router = self.param("router", normal_init(cfg.init_std, ("embed", None)), (d, n_experts), jnp.float32)
        logits = jnp.einsum("bsd,de->bse", x_BSD.astype(jnp.float32), router)
        bias = None
        if sec.bias_balancing:
            bias = self.param("balance_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                              (n_experts,), jnp.float32)

        payload = x_BSD
        if sec.structure == "dcca":  # BigMac: descend before the dispatch
            payload = projection(sec.low_dim(d), -1, ("embed", None), cfg.init_std, self.dtype, "descend")(x_BSD)
        width = payload.shape[-1]
        w_in = self.param("w_in", normal_init(cfg.init_std, ("expert", None, "mlp")), (n_experts, width, hidden),
                          jnp.float32)
        w_out = self.param("w_out", normal_init(output_std(cfg), ("expert", "mlp", None)), (n_experts, hidden, width),
                           jnp.float32)
        y, dropped = expert_layer(logits, payload, w_in.astype(self.dtype), w_out.astype(self.dtype), bias,
                                  top_k=sec.top_k, normalize=sec.normalize_top_k, capacity_factor=sec.capacity_factor)
        if sec.structure == "dcca":  # ... and ascend after the combine
            y = projection(d, -1, (None, "embed"), output_std(cfg), self.dtype, "ascend")(y)
        if sec.structure == "residual":
            dense = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "dense_in")(x_BSD)
            dense = projection(d, -1, ("mlp", "embed"), output_std(cfg), self.dtype, "dense_out")(nn.gelu(dense))
            mix = jax.nn.softmax(projection(2, -1, ("embed", None), cfg.init_std, jnp.float32, "mix")(x_BSD), -1)
            y = mix[..., :1].astype(y.dtype) * y + mix[..., 1:].astype(y.dtype) * dense
        return y.astype(x_BSD.dtype), self._aux(logits, bias, dropped)

    def _aux(self, logits_BSE, bias_E, dropped):
        """Losses (added to the training loss) and per-layer routing statistics, from the global routing."""
        sec = self.cfg.moe
        logits = logits_BSE.reshape(-1, logits_BSE.shape[-1])
        experts, _, probs = route(logits, sec.top_k, sec.normalize_top_k, bias_E)
        load = expert_load(experts, logits.shape[-1])
        tag = f"moe/layer{self.layer_index}"
        aux = {f"loss/{tag}/balance": sec.load_balance_weight * load_balance_loss(probs, experts),
               f"loss/{tag}/z": sec.z_loss_weight * router_z_loss(logits),
               f"aux/{tag}/dropped": dropped, f"aux/{tag}/entropy": router_entropy(probs),
               f"aux/{tag}/max_load": jnp.max(load) * load.shape[0]}  # 1 = perfectly even
        if bias_E is not None:
            # Zero-valued; its gradient w.r.t. the bias is (load - mean load), so the optimiser lowers the bias of
            # overloaded experts and raises it for underloaded ones (auxiliary-loss-free balancing).
            push = jnp.sum(bias_E * jax.lax.stop_gradient(load - jnp.mean(load)))
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


def inactive_expert_params(cfg: ModelConfig) -> int:
    """Expert weights a token does not use: (E - top_k) experts of every MoE layer. Total minus this = active."""
    sec, pattern = cfg.moe, cfg.channel_mixer_pattern
    width = sec.low_dim(cfg.d_model) if sec.structure == "dcca" else cfg.d_model
    per_expert = 2 * width * sec.hidden_dim(cfg.d_model, cfg.mlp_dim)
    moe_layers = [i for i in range(cfg.n_layers) if pattern[i % len(pattern)] == "moe"]
    return sum((sec.experts_in_layer(j) - sec.top_k) * per_expert for j in range(len(moe_layers)))


register_channel_mixer(ChannelMixerSpec("moe", MoE, moe_flops_per_token))
