"""SpaceTime (Zhang et al., ICLR 2023): an SSM encoder and a closed-loop SSM decoder for forecasting.

    x_BLC --embed--> h_BLD                                  (C input channels -> D = model.d_model)
    layer 0:  h = h + SSM(preprocess(h));  h = h + MLP(LayerNorm(h))
    layer i:  h = h + SSM(h);              h = h + MLP(LayerNorm(h))
    decoder:  encode h into the final state x, roll x_t = (A + b k^T) x_{t-1} for `horizon` steps, y_t = c . x_t
    head:     y_BFD --dense--> forecast_BFO                 (F = horizon steps, O output channels)

Every SSM is one of `n_kernels` (U) independent state-space models (state size X) repeated over the D channels
(channel i uses kernel i mod n_kernels). `model.spacetime.ssm` picks the state matrix: `companion` (shift + a
learned last column, SpaceTime) or `diagonal` (complex diagonal, S4D-like: the baseline that cannot express AR
processes exactly).
The preprocessing is fixed FIR filters (differencing, moving-average residual), i.e. companion SSMs with a = 0,
b = e_1 and c = the taps (see jaxeff/layers/spacetime.py), applied directly as causal convolutions.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import ModelConfig
from jaxeff.layers.companion import l1_normalise
from jaxeff.layers.spacetime import closed_loop_rollout, difference_kernel, moving_average_residual_kernel
from pallas_kernels.companion_ssm import causal_conv, companion_kernel


def repeat_over_channels(x, channels: int):
    """[U, ...] -> [D, ...] (D = channels): channel i gets kernel i mod n_kernels."""
    return jnp.tile(x, (channels // x.shape[0],) + (1,) * (x.ndim - 1))


def preprocessing_taps(difference_orders: list[int], ma_windows: list[int]) -> np.ndarray:
    """[n_filters, max taps] fixed filters (taps_UX: FIR filters are companion SSMs with c = taps), differencing
    rows first, then moving-average residuals."""
    taps = [np.asarray(difference_kernel(o)) for o in difference_orders]
    taps += [np.asarray(moving_average_residual_kernel(w)) for w in ma_windows]
    width = max(len(t) for t in taps)
    return np.stack([np.pad(t, (0, width - len(t))) for t in taps])


class Preprocess(nn.Module):
    """Fixed causal filters over the channels (filter i mod n_filters on channel i); no parameters."""

    taps_UX: np.ndarray

    def __call__(self, u_BLD):
        length, channels = u_BLD.shape[1], u_BLD.shape[2]
        taps_DL = np.resize(self.taps_UX, (channels, self.taps_UX.shape[1]))[:, :length]  # cycles the filters
        taps_DL = np.pad(taps_DL, ((0, 0), (0, length - taps_DL.shape[1])))
        return causal_conv(u_BLD, jnp.asarray(taps_DL, u_BLD.dtype))


def _normal(std: float):
    return nn.initializers.normal(std)


class _CompanionParams(nn.Module):
    """Parameters (a, b, c[, k]) of `n_kernels` companion SSMs of state size d; a L1-normalised if asked."""

    n_kernels: int
    state_dim: int
    norm_order: int
    with_k: bool = False

    @nn.compact
    def __call__(self):
        shape, d = (self.n_kernels, self.state_dim), self.state_dim
        a = self.param("a", _normal(1.0), shape, jnp.float32)
        b = self.param("b", _normal(d**-0.5), shape, jnp.float32)
        c = self.param("c", _normal(d**-0.5), shape, jnp.float32)
        a = l1_normalise(a) if self.norm_order == 1 else a
        if not self.with_k:
            return a, b, c
        return a, b, c, self.param("k", _normal(d**-0.5), shape, jnp.float32)


class _CompanionLayer(nn.Module):
    """Sizes shared by the open- and closed-loop companion layers."""

    n_kernels: int
    state_dim: int
    norm_order: int = 1
    kernel_impl: str = "auto"


class CompanionSSMs(_CompanionLayer):
    """Open loop: y_i = K_i * u_i + skip_i u_i with K_l = c^T A^l b (FFT convolution)."""

    @nn.compact
    def __call__(self, u_BLD):
        length, channels = u_BLD.shape[1], u_BLD.shape[2]
        a, b, c = _CompanionParams(self.n_kernels, self.state_dim, self.norm_order, name="ssm")()
        k_DL = repeat_over_channels(companion_kernel(a, b, c, length, impl=self.kernel_impl), channels)
        skip = self.param("skip", nn.initializers.ones, (channels,), jnp.float32)
        return causal_conv(u_BLD, k_DL) + skip * u_BLD


def companion_final_state(u_BLD, a_UX, b_UX, kernel_impl: str = "auto"):
    """x after the last input, x_{L-1} = sum_l A^l b u_{L-1-l}, as [B, D, X], without a sequential scan: the
    Krylov vectors (A^l b)_i are the companion kernels with c = e_i."""
    length, channels = u_BLD.shape[1], u_BLD.shape[2]
    k, d = a_UX.shape
    eye = jnp.tile(jnp.eye(d, dtype=a_UX.dtype), (k, 1))  # row j: e_{j mod d}
    krylov_UXL = companion_kernel(jnp.repeat(a_UX, d, axis=0), jnp.repeat(b_UX, d, axis=0), eye, length,
                                  impl=kernel_impl).reshape(k, d, length)
    return jnp.einsum("hil,blh->bhi", repeat_over_channels(krylov_UXL, channels), u_BLD[:, ::-1])


class ClosedLoopCompanion(_CompanionLayer):
    """The decoder: encode u into the state, then x_t = (A + b k^T) x_{t-1}, y_t = c . x_t for `horizon` steps."""

    @nn.compact
    def __call__(self, u_BLD, horizon: int):
        channels = u_BLD.shape[2]
        a, b, c, k = _CompanionParams(self.n_kernels, self.state_dim, self.norm_order, with_k=True, name="ssm")()
        x = companion_final_state(u_BLD, a, b, self.kernel_impl)
        a, b, c, k = (repeat_over_channels(p, channels) for p in (a, b, c, k))
        y_BFD, _ = closed_loop_rollout(x, a, b, c, k, horizon)
        return y_BFD


class _DiagonalParams(nn.Module):
    """d/2 complex modes per kernel (the state axis X): lambda = exp(dt (-exp(log_decay) + i freq)), b, c (and k)
    complex."""

    n_kernels: int
    state_dim: int
    with_k: bool = False

    @nn.compact
    def __call__(self):
        n = self.state_dim // 2
        shape = (self.n_kernels, n)

        def log_dt_init(key, s, dtype):
            return jax.random.uniform(key, s, dtype, math.log(1e-3), math.log(1e-1))

        log_dt = self.param("log_dt", log_dt_init, (self.n_kernels, 1), jnp.float32)
        log_decay = self.param("log_decay", nn.initializers.constant(math.log(0.5)), shape, jnp.float32)
        freq = self.param("freq", lambda key, s, dt: jnp.broadcast_to(jnp.pi * jnp.arange(s[1], dtype=dt), s), shape,
                          jnp.float32)
        log_lam = jnp.exp(log_dt) * (-jnp.exp(log_decay) + 1j * freq)  # |lambda| < 1 always

        def complex_param(name, std):
            re = self.param(f"{name}_re", _normal(std), shape, jnp.float32)
            im = self.param(f"{name}_im", _normal(std), shape, jnp.float32)
            return re + 1j * im

        b = complex_param("b", n**-0.5)
        c = complex_param("c", n**-0.5)
        return (log_lam, b, c, complex_param("k", n**-0.5)) if self.with_k else (log_lam, b, c)


class DiagonalSSMs(nn.Module):
    """Open loop with a diagonal state matrix: K_l = 2 Re(sum_n c_n b_n lambda_n^l)."""

    n_kernels: int
    state_dim: int

    @nn.compact
    def __call__(self, u_BLD):
        length, channels = u_BLD.shape[1], u_BLD.shape[2]
        log_lam, b, c = _DiagonalParams(self.n_kernels, self.state_dim, name="ssm")()
        powers_UXL = jnp.exp(log_lam[..., None] * jnp.arange(length))
        k_UL = 2 * jnp.real(jnp.einsum("kn,knl->kl", c * b, powers_UXL))
        skip = self.param("skip", nn.initializers.ones, (channels,), jnp.float32)
        return causal_conv(u_BLD, repeat_over_channels(k_UL, channels)) + skip * u_BLD


class ClosedLoopDiagonal(nn.Module):
    """The decoder with a diagonal state matrix: x_t = lambda x_{t-1} + b u_hat, u_hat = 2 Re(k . x_{t-1})."""

    n_kernels: int
    state_dim: int

    @nn.compact
    def __call__(self, u_BLD, horizon: int):
        length, channels = u_BLD.shape[1], u_BLD.shape[2]
        log_lam, b, c, k = _DiagonalParams(self.n_kernels, self.state_dim, with_k=True, name="ssm")()
        log_lam, b, c, k = (repeat_over_channels(p, channels) for p in (log_lam, b, c, k))
        powers_DXL = jnp.exp(log_lam[..., None] * jnp.arange(length))
        x = b[None] * jnp.einsum("hnl,blh->bhn", powers_DXL, u_BLD[:, ::-1].astype(powers_DXL.dtype))
        lam = jnp.exp(log_lam)

        def step(x, _):
            u_hat = 2 * jnp.real(jnp.sum(k * x, axis=-1))
            x = lam * x + b * u_hat[..., None]
            return x, 2 * jnp.real(jnp.sum(c * x, axis=-1))

        _, y_FBD = jax.lax.scan(step, x, None, length=horizon)
        return jnp.swapaxes(y_FBD, 0, 1)


class SpaceTime(nn.Module):
    cfg: ModelConfig
    n_outputs: int
    horizon: int

    @nn.compact
    def __call__(self, x_BLC):
        m, st, sec = self.cfg, self.cfg.spacetime, self.cfg.companion
        decoder_kernels = st.decoder_kernels or sec.n_kernels
        if st.ssm == "companion":
            def encoder_ssm(name):
                return CompanionSSMs(sec.n_kernels, sec.state_dim, sec.norm_order, sec.kernel_impl, name=name)
            decoder = ClosedLoopCompanion(decoder_kernels, sec.state_dim, sec.norm_order, sec.kernel_impl,
                                          name="decoder")
        else:
            def encoder_ssm(name):
                return DiagonalSSMs(sec.n_kernels, sec.state_dim, name=name)
            decoder = ClosedLoopDiagonal(decoder_kernels, sec.state_dim, name="decoder")

        h = nn.Dense(m.d_model, name="embed")(x_BLC.astype(jnp.float32))
        taps = st.difference_orders or st.ma_windows
        for i in range(m.n_layers):
            u = Preprocess(preprocessing_taps(st.difference_orders, st.ma_windows))(h) if i == 0 and taps else h
            h = h + encoder_ssm(f"ssm_{i}")(u)
            z = nn.LayerNorm(name=f"norm_{i}")(h)
            z = nn.Dense(m.mlp_dim, name=f"mlp_in_{i}")(z)
            h = h + nn.Dense(m.d_model, name=f"mlp_out_{i}")(nn.gelu(z))
        y_BFD = decoder(h, self.horizon)
        return nn.Dense(self.n_outputs, name="head")(y_BFD)
