"""Sparse Spectral Training settings (`train.sst`): selected matrices trained as U diag(s) V^T (docs/methods/sst.md)."""

from __future__ import annotations

from jaxeff.config.base import NonNegativeInt, PositiveInt, Section


class SstConfig(Section):
    """Sparse Spectral Training (Zhao et al. 2025); `rank: 0` turns it off."""

    rank: NonNegativeInt = 0
    """r: singular-vector pairs of each factorised matrix updated per step (0 = off; at most min(in, out) are used)"""
    layers: str = r"^layer_\d+/(mixer|channel)/[^/]+/kernel$"
    """regular expression on parameter paths (`layer_0/mixer/q/kernel`): the matrices stored as U diag(s) V^T"""
    resample_every: PositiveInt = 50
    """steps between redraws of the r active pairs (their Adam moments start from zero at each redraw)"""
    svd_every: NonNegativeInt = 200
    """steps between re-orthogonalisations of U diag(s) V^T by SVD (a multiple of resample_every; 0 = never)"""
