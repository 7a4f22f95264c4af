"""Speculative decoding: a draft LM proposes k tokens, the target LM scores them all in one call and keeps the
longest accepted prefix plus one token of its own, so the output follows the target's distribution exactly.

Rollback without touching any mixer: JAX caches are values, so a cache "snapshot" is just the old pytree.
- Draft: the cache after each drafted token is kept (k pytrees); after verification the one holding the accepted
  prefix is selected.
- Target: one jitted call feeds the tokens the target has not seen yet (`pending`: the last accepted tokens), then
  the k drafts, and returns the cache after each part. All accepted: the cache after everything is kept. A
  rejection: the cache after `pending` is kept and the accepted drafts plus the correction become the next call's
  `pending` (recomputed from the last accepted state, inside the next call's single forward). This works alike for
  KV caches, recurrent states (lightning, mLSTM, ...) and pruned caches.
See docs/serving/speculative.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.models.decoding import decode_caches


# ------------------------------------------------------------------ distributions and the acceptance rule


def token_probs(logits_NV, temperature: float, top_k: int):
    """The distribution `sample_next` samples from (temperature > 0): temperature, then top-k, softmax. -inf
    logits (ids outside the vocabulary or an FR-Spec subset) get probability 0."""
    logits_NV = logits_NV / temperature
    if 0 < top_k < logits_NV.shape[-1]:
        kth_N1 = jax.lax.top_k(logits_NV, top_k)[0][:, -1:]
        logits_NV = jnp.where(logits_NV < kth_N1, -jnp.inf, logits_NV)
    return jax.nn.softmax(logits_NV, axis=-1)


@jax.jit
def accept_greedy(drafts_K, target_logits_K1V):
    """(accepted count n, next token): drafts are kept while each equals the target's argmax; the next token is the
    target's argmax after them (the correction, or the bonus token when all k are kept)."""
    best_K1 = jnp.argmax(target_logits_K1V, axis=-1)
    n = jnp.sum(jnp.cumprod(drafts_K == best_K1[:-1]))
    return n, best_K1[n]


@jax.jit
def accept_sampled(key, drafts_K, q_KV, p_K1V):
    """(accepted count n, next token) by speculative rejection sampling.

    Draft j (sampled from q_j) is kept with probability min(1, p_j(x)/q_j(x)); at the first rejection the next token
    is drawn from normalize(max(0, p_j - q_j)); with all k kept, from p_k (the bonus). The emitted tokens then follow
    p exactly, whatever q is (q must be the distribution the drafts were really drawn from).
    """
    k = drafts_K.shape[0]
    key_u, key_x = jax.random.split(key)
    rows_K = jnp.arange(k)
    p_x_K, q_x_K = p_K1V[rows_K, drafts_K], q_KV[rows_K, drafts_K]
    u_K = jax.random.uniform(key_u, (k,))
    n = jnp.sum(jnp.cumprod(u_K * q_x_K < p_x_K))  # u < p/q without dividing by q
    q_pad_K1V = jnp.concatenate([q_KV, jnp.zeros_like(q_KV[:1])])  # row k: nothing to subtract for the bonus
    residual_V = jnp.maximum(p_K1V[n] - q_pad_K1V[n], 0.0)
    # Rounding can leave an all-zero residual when p == q; the rejection then had probability ~0: fall back to p.
    residual_V = jnp.where(residual_V.sum() > 0, residual_V, p_K1V[n])
    return n, jax.random.categorical(key_x, jnp.log(residual_V))


# ------------------------------------------------------------------ the two models' calls


def _logits_in_vocab(logits_NV, vocab_size: int):
    return logits_NV[..., :vocab_size]  # the tokenizer's ids: both models' padded tables agree up to here


def make_verify(model, vocab_size: int, temperature: float, top_k: int):
    """Jitted (params, pending_1P, pending_start, drafts ([1, 1] each), q_rows ([V] each), caches, key, round) ->
    (n accepted, next token, drafts [K], cache after `pending`, cache after `pending` + drafts): the target's one call
    of a round, with the acceptance rule applied to its logits at the k drafted positions and the bonus."""

    @jax.jit
    def verify(params, pending_1P, pending_start, drafts, q_rows, caches, key, round_index):
        p, k = pending_1P.shape[1], len(drafts)
        drafts_1K = jnp.concatenate(drafts, axis=1)
        positions_1P = (pending_start + jnp.arange(p))[None]
        positions_1K = (pending_start + p + jnp.arange(k))[None]
        logits_1PV, caches_p, _ = model.apply({"params": params}, pending_1P, positions_1P, caches)
        logits_1KV, caches_all, _ = model.apply({"params": params}, drafts_1K, positions_1K, caches_p)
        logits_K1V = _logits_in_vocab(jnp.concatenate([logits_1PV[0, -1:], logits_1KV[0]]), vocab_size)
        key = jax.random.fold_in(jax.random.fold_in(key, round_index), k)
        n, token = accept(key, drafts_1K[0], jnp.stack(q_rows), logits_K1V, temperature=temperature, top_k=top_k)
        return n, token, drafts_1K[0], caches_p, caches_all

    return verify


def draft_logits_fn(model, vocab_size: int, subset: np.ndarray | None):
    """(params, tokens_1S, positions_1S, caches) -> (draft logits [V] at the last position, -inf outside `subset`;
    caches). With a subset (FR-Spec) only its rows of the output layer are multiplied: the full logits are never
    used, so XLA drops their matmul."""
    if subset is None or model.cfg.parscale.enabled:  # ParScale aggregates after the final norm: mask instead
        mask_V = None if subset is None else jnp.zeros(vocab_size, bool).at[subset].set(True)

        def logits(params, tokens_1S, positions_1S, caches):
            logits_1SV, caches, _ = model.apply({"params": params}, tokens_1S, positions_1S, caches)
            logits_V = _logits_in_vocab(logits_1SV[0, -1], vocab_size)
            return (logits_V if mask_V is None else jnp.where(mask_V, logits_V, -jnp.inf)), caches

        return logits

    cfg = model.cfg
    subset_U = jnp.asarray(subset, jnp.int32)

    def subset_logits(params, tokens_1S, positions_1S, caches):
        (_, caches, _), state = model.apply(
            {"params": params}, tokens_1S, positions_1S, caches,
            capture_intermediates=lambda mdl, method: mdl.name == "final_norm" and method == "__call__",
            mutable=["intermediates"])
        x_D = state["intermediates"]["final_norm"]["__call__"][0][0, -1]
        if cfg.tie_embeddings:
            w_UD = params["embed"]["embedding"][subset_U]
        else:
            w_UD = params["head"]["kernel"][:, subset_U].T
        logits_U = jnp.einsum("d,ud->u", x_D, w_UD.astype(x_D.dtype)).astype(jnp.float32)
        if cfg.logit_soft_cap is not None:
            logits_U = cfg.logit_soft_cap * jnp.tanh(logits_U / cfg.logit_soft_cap)
        return jnp.full((vocab_size,), -jnp.inf, jnp.float32).at[subset_U].set(logits_U), caches

    return subset_logits


def make_draft_step(model, vocab_size: int, subset: np.ndarray | None, temperature: float, top_k: int):
    """Jitted (params, tokens_1S, start, caches, key, round, j) -> (token [1, 1], q_V, caches): the draft's next
    token (the j-th of the round) and the distribution it was drawn from (greedy: its argmax; q_V is then unused).
    Positions and keys are made inside: every eager op outside a jitted call is a dispatch in the decoding loop."""
    logits_fn = draft_logits_fn(model, vocab_size, subset)

    @jax.jit
    def step(params, tokens_1S, start, caches, key, round_index, j):
        positions_1S = (start + jnp.arange(tokens_1S.shape[1]))[None]
        key = jax.random.fold_in(jax.random.fold_in(key, round_index), j)
        logits_V, caches = logits_fn(params, tokens_1S, positions_1S, caches)
        if temperature <= 0:
            return jnp.argmax(logits_V).reshape(1, 1).astype(jnp.int32), logits_V, caches
        q_V = token_probs(logits_V[None], temperature, top_k)[0]
        return jax.random.categorical(key, jnp.log(q_V)).reshape(1, 1).astype(jnp.int32), q_V, caches

    return step


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def accept(key, drafts_K, q_KV, target_logits_K1V, *, temperature: float, top_k: int):
    """(n accepted, next token) for the round: greedy or rejection sampling against the target's distribution."""
    if temperature <= 0:
        return accept_greedy(drafts_K, target_logits_K1V)
    return accept_sampled(key, drafts_K, q_KV, token_probs(target_logits_K1V, temperature, top_k))


# ------------------------------------------------------------------ the decoding loop


@dataclasses.dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept
    generated: int = 0  # tokens emitted
    seconds: float = 0.0
    accepted_per_round: list = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"speculative: {self.generated} tokens in {self.rounds} rounds, acceptance {self.acceptance_rate:.1%} "
                f"({self.accepted}/{self.drafted} drafts), {self.generated / max(self.rounds, 1):.2f} tokens per "
                f"target call, {self.tokens_per_s:,.1f} tokens/s")


def speculative_generate_ids(target, target_params, draft, draft_params, prompt_ids: list[int], max_new_tokens: int,
                             *, draft_tokens: int = 4, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                             vocab_size: int, stop_id: int | None = None, draft_subset: np.ndarray | None = None,
                             ) -> tuple[list[int], SpeculativeStats]:
    """The generated ids (prompt excluded, as `generate_ids`) and statistics. Greedy (temperature 0) output equals
    `generate_ids`'s; sampled output has the target's distribution (different random numbers than plain sampling)."""
    k = draft_tokens
    if k < 1:
        raise ValueError(f"draft_tokens={k}: must be at least 1")
    # Room for the drafts past the last emitted token.
    max_len = len(prompt_ids) + max_new_tokens + k + 2
    verify = _cached(make_verify, target, vocab_size, float(temperature), int(top_k))
    draft_step = _cached(make_draft_step, draft, vocab_size, draft_subset, float(temperature), int(top_k))
    t_caches = decode_caches(target, target_params, 1, max_len)
    d_caches = decode_caches(draft, draft_params, 1, max_len)
    prompt = np.asarray(prompt_ids, np.int32)
    t0 = time.perf_counter()
    if len(prompt) > 1:  # both models see all but the last prompt token; it is the first `pending` token
        t_caches = _prefill(target, target_params, prompt[:-1], t_caches)
        d_caches = _prefill(draft, draft_params, prompt[:-1], d_caches)
    t_len = d_len = len(prompt) - 1  # tokens in each cache
    t_pending, d_pending = [int(prompt[-1])], [int(prompt[-1])]
    key = jax.random.key(seed)
    stats, out = SpeculativeStats(), []
    while len(out) < max_new_tokens:
        r = stats.rounds
        # Draft k tokens, keeping the cache after each fed token; tokens stay on the device until verified.
        token_11, q_V, cache = draft_step(draft_params, _row(d_pending), d_len, d_caches, key, r, 0)
        d_cache_after, drafts, q_rows = [cache], [token_11], [q_V]
        pos = d_len + len(d_pending)
        for j in range(1, k):
            token_11, q_V, cache = draft_step(draft_params, token_11, pos + j - 1, cache, key, r, j)
            d_cache_after.append(cache)
            drafts.append(token_11)
            q_rows.append(q_V)
        # Score pending + drafts in one target call, which also applies the acceptance rule.
        start = t_len + len(t_pending)
        n, token, drafts_K, t_after_pending, t_after_all = verify(
            target_params, _row(t_pending), t_len, tuple(drafts), tuple(q_rows), t_caches, key, r)
        n, token, drafts = jax.device_get((n, token, drafts_K))
        n, token, drafts = int(n), int(token), drafts.tolist()
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + k, stats.accepted + n
        stats.accepted_per_round.append(n)
        if n == k:
            t_caches, t_len, t_pending = t_after_all, start + k, [token]
            d_caches, d_len, d_pending = d_cache_after[k - 1], pos + k - 1, [drafts[-1], token]
        else:
            t_caches, t_len, t_pending = t_after_pending, start, drafts[:n] + [token]
            d_caches, d_len, d_pending = d_cache_after[n], pos + n, [token]
        new = drafts[:n] + [token]
        if stop_id is not None and stop_id in new:
            out.extend(new[:new.index(stop_id)])
            break
        out.extend(new)
    out = out[:max_new_tokens]
    stats.generated, stats.seconds = len(out), time.perf_counter() - t0
    return out, stats


def _row(ids):
    return jnp.asarray([list(ids)], jnp.int32)


def _prefill(model, params, ids, caches):
    _, caches, _ = _cached(_make_prefill, model)(params, _row(ids), _row(range(len(ids))), caches)
    return caches


def _make_prefill(model):
    return jax.jit(lambda params, tokens, positions, caches: model.apply({"params": params}, tokens, positions,
                                                                          caches))


_JITTED: dict = {}  # (factory, id(model), args) -> (model, jitted function): compiled once per model, not per call


def _cached(factory, model, *args):
    key = (factory.__name__, id(model), *(a.tobytes() if isinstance(a, np.ndarray) else a for a in args))
    if key not in _JITTED or _JITTED[key][0] is not model:
        _JITTED[key] = (model, factory(model, *args))
    return _JITTED[key][1]
