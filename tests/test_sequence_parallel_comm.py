"""What crosses devices under `mesh.sequence` is what the design says (`jaxeff comm-report`'s compiled step).

Linear mixers exchange one fixed-size state per layer and direction: an all-gather in the forward, its transpose (a
reduce-scatter) in the backward, each moving (g-1) x rows x heads x d_k x d_v x 4 bytes into (out of) a device,
whatever the sequence length. Attention all-gathers keys and values, which grow with the length.
"""

import math
import re

import jax
import pytest

from helpers import tiny_config
from jaxeff.parallel.collectives import collective_stats, parse_hlo_module
from jaxeff.train.comm_report import compile_train_step

G = 8  # mesh.sequence
ROWS, HEADS, WIDTH = 8, 4, 8  # global batch on one data replica, model.n_heads, d_model / n_heads


def state_collectives(hlo: str, trailing: tuple[int, ...]):
    """[(opcode, result dims)] of the all-gathers/reduce-scatters over a leading chunk axis whose other dims are
    (rows, *trailing): the per-layer state exchanges."""
    computations, _ = parse_hlo_module(hlo)
    found = []
    for c in computations.values():
        for i in c.instructions:
            if i.opcode.removesuffix("-start") not in ("all-gather", "reduce-scatter"):
                continue
            m = re.match(r"f32\[([\d,]+)\]", i.shape)
            dims = tuple(int(d) for d in m.group(1).split(",")) if m else ()
            if dims[1:] == (ROWS, *trailing) and dims[0] in (1, G):
                found.append((i.opcode.removesuffix("-start"), dims))
    return found


def compiled_step(mixer_overrides: dict, seq_len: int):
    cfg = tiny_config(**{"data.seq_len": seq_len, "mesh.data": 1, "mesh.sequence": G, **mixer_overrides})
    return compile_train_step(cfg, jax.devices()[:8], with_data=False).compiled


LINEAR = {
    # lightning: the [B, H, d_k, d_v] state (no LRPE, so d_k = d_v = 8)
    "lightning": ({"model.mixer_pattern": "[lightning]", "model.lightning.block_size": 16,
                   "model.lightning.lrpe_layers": "[]"}, (HEADS, WIDTH, WIDTH)),
    # mLSTM: C [B, H, d_qk, d_v] with d_qk = d_model * 0.5 / H = 4 (n, m and the chunk's log forget gate ride along)
    "mlstm": ({"model.mixer_pattern": "[mlstm]", "model.mlstm.chunk_size": 16, "model.n_kv_heads": "null"},
              (HEADS, WIDTH // 2, WIDTH)),
}


@pytest.mark.parametrize("mixer", list(LINEAR))
def test_linear_mixers_exchange_one_state_per_layer_whatever_the_length(mixer):
    overrides, state_dims = LINEAR[mixer]
    per_length = {}
    for seq_len in (64, 128):
        compiled = compiled_step(overrides, seq_len)
        found = state_collectives(compiled.as_text(), state_dims)
        # n_layers = 2: one all-gather (forward) and one reduce-scatter (backward) of the state each
        assert sorted(op for op, _ in found) == ["all-gather"] * 2 + ["reduce-scatter"] * 2, found
        closed_form = (G - 1) * ROWS * math.prod(state_dims) * 4  # received per layer and direction
        for op, dims in found:
            chunk_bytes = math.prod(dims[1:]) * 4  # one device's state, as the HLO has it
            assert dims[0] == (G if op == "all-gather" else 1)  # gathered from / scattered to all G chunks
            assert (G - 1) * chunk_bytes == closed_form
        per_length[seq_len] = collective_stats(compiled)
    assert per_length[64] == per_length[128]  # nothing that crosses devices grows with the sequence


def test_attention_exchanges_grow_with_the_length():
    gathered = {seq_len: collective_stats(compiled_step({"model.mixer_pattern": "[attention]"}, seq_len))
                ["all-gather"]["bytes"] for seq_len in (64, 128)}
    assert gathered[128] > gathered[64]
