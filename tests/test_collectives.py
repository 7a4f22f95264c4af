"""jaxeff.parallel.collectives: collective counts and bytes per device read from compiled HLO."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxeff.parallel.collectives import (
    collective_stats,
    collective_stats_from_hlo_text,
    format_report,
    shape_bytes,
    wire_bytes,
)


def _counted(kind_stats: dict) -> dict:
    """The counting fields (wire bytes are checked on their own below)."""
    return {k: v for k, v in kind_stats.items() if k != "wire_bytes"}

# ---------------------------------------------------------------------------------------------------
# Hand-written HLO, in the syntax XLA prints (checked against Compiled.as_text() on jax 0.10.2 CPU).

ADD = """
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
"""


def _while_module(trip_count_config: str, body_collective: str = "all-reduce") -> str:
    """ENTRY -> while(body: one f32[256] collective) with the given backend_config suffix."""
    return ADD + f"""
%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {{
  %p = (s32[], f32[256]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{{0}} get-tuple-element(%p), index=1
  %r = f32[256]{{0}} {body_collective}(%x), channel_id=1, replica_groups={{{{0,1,2,3,4,5,6,7}}}}, to_apply=%add
  ROOT %t = (s32[], f32[256]{{0}}) tuple(%i, %r)
}}

%cond (q: (s32[], f32[256])) -> pred[] {{
  %q = (s32[], f32[256]{{0}}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}}

ENTRY %main (x0: f32[256]) -> f32[256] {{
  %x0 = f32[256]{{0}} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256]{{0}}) tuple(%zero, %x0)
  %w = (s32[], f32[256]{{0}}) while(%init), condition=%cond, body=%body{trip_count_config}
  ROOT %out = f32[256]{{0}} get-tuple-element(%w), index=1
}}
"""


F32_256 = 256 * 4


def test_plain_all_reduce_with_tuple_shape_sums_the_parts():
    text = ADD + """
ENTRY %main (a: f32[1024], b: bf16[512]) -> (f32[1024], bf16[512]) {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[512]{0} parameter(1)
  ROOT %ar = (f32[1024]{0}, bf16[512]{0}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-reduce"]) == {"count": 1, "bytes": 1024 * 4 + 512 * 2}
    assert _counted(stats["total"]) == {"count": 1, "bytes": 1024 * 4 + 512 * 2, "unknown_trip_count": 0}


def test_all_gather_start_done_pair_counts_once_with_the_operand_bytes():
    text = """
ENTRY %main (p: f32[8,16]) -> f32[64,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %ags = (f32[8,16]{1,0}, f32[64,16]{1,0}) all-gather-start(%p), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  ROOT %agd = f32[64,16]{1,0} all-gather-done(%ags)
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-gather"]) == {"count": 1, "bytes": 8 * 16 * 4}  # what one device contributes
    assert set(stats) == {"all-gather", "total"}


def test_other_async_forms_count_once():
    text = ADD + """
%wrapped_rs (wp: f32[64]) -> f32[8] {
  %wp = f32[64]{0} parameter(0)
  ROOT %rs = f32[8]{0} reduce-scatter(%wp), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (p: f32[64], q: f32[32]) -> (f32[8], f32[8], f32[32], f32[32]) {
  %p = f32[64]{0} parameter(0)
  %q = f32[32]{0} parameter(1)
  %s1 = ((f32[64]{0}), f32[8]{0}) async-start(%p), calls=%wrapped_rs
  %u1 = ((f32[64]{0}), f32[8]{0}) async-update(%s1), calls=%wrapped_rs
  %d1 = f32[8]{0} async-done(%u1), calls=%wrapped_rs
  %s2 = ((f32[64]{0}), f32[8]{0}) reduce-scatter-start(f32[64]{0} %p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  %d2 = f32[8]{0} reduce-scatter-done(%s2)
  %s3 = f32[32]{0} all-reduce-start(%q), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %d3 = f32[32]{0} all-reduce-done(%s3)
  %s4 = (f32[32]{0}, f32[32]{0}, u32[], u32[]) collective-permute-start(%q), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %d4 = f32[32]{0} collective-permute-done(%s4)
  ROOT %t = (f32[8]{0}, f32[8]{0}, f32[32]{0}, f32[32]{0}) tuple(%d1, %d2, %d3, %d4)
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["reduce-scatter"]) == {"count": 2, "bytes": 2 * 64 * 4}  # operand = the full buffer
    assert _counted(stats["all-reduce"]) == {"count": 1, "bytes": 32 * 4}
    assert _counted(stats["collective-permute"]) == {"count": 1, "bytes": 32 * 4}
    assert stats["total"]["count"] == 4


def test_collective_in_while_body_is_multiplied_by_the_known_trip_count():
    config = ', backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"5"}}'
    stats = collective_stats_from_hlo_text(_while_module(config))
    assert _counted(stats["all-reduce"]) == {"count": 5, "bytes": 5 * F32_256}
    assert stats["total"]["unknown_trip_count"] == 0


def test_escaped_backend_config_trip_count_is_read():
    config = r', backend_config="{\"known_trip_count\":{\"n\":\"7\"}}"'
    assert collective_stats_from_hlo_text(_while_module(config))["all-reduce"]["count"] == 7


def test_unknown_trip_count_counts_the_body_once_and_is_reported():
    stats = collective_stats_from_hlo_text(_while_module(""))
    assert _counted(stats["all-reduce"]) == {"count": 1, "bytes": F32_256}
    assert stats["total"]["unknown_trip_count"] == 1


def test_nested_while_loops_multiply():
    text = ADD + """
%inner_body (ip: (s32[], f32[128])) -> (s32[], f32[128]) {
  %ip = (s32[], f32[128]{0}) parameter(0)
  %ii = s32[] get-tuple-element(%ip), index=0
  %ix = f32[128]{0} get-tuple-element(%ip), index=1
  %ir = f32[128]{0} all-reduce(%ix), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %it = (s32[], f32[128]{0}) tuple(%ii, %ir)
}

%inner_cond (ic: (s32[], f32[128])) -> pred[] {
  %ic = (s32[], f32[128]{0}) parameter(0)
  ROOT %ib = pred[] constant(true)
}

%outer_body (op: (s32[], f32[128])) -> (s32[], f32[128]) {
  %op = (s32[], f32[128]{0}) parameter(0)
  %ow = (s32[], f32[128]{0}) while(%op), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
  %oi = s32[] get-tuple-element(%ow), index=0
  %ox = f32[128]{0} get-tuple-element(%ow), index=1
  %og = f32[1024]{0} all-gather(%ox), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %os = f32[128]{0} slice(%og), slice={[0:128]}
  ROOT %ot = (s32[], f32[128]{0}) tuple(%oi, %os)
}

%outer_cond (oc: (s32[], f32[128])) -> pred[] {
  %oc = (s32[], f32[128]{0}) parameter(0)
  ROOT %ob = pred[] constant(true)
}

ENTRY %main (p: (s32[], f32[128])) -> (s32[], f32[128]) {
  %p = (s32[], f32[128]{0}) parameter(0)
  ROOT %w = (s32[], f32[128]{0}) while(%p), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-reduce"]) == {"count": 3 * 4, "bytes": 3 * 4 * 128 * 4}
    assert _counted(stats["all-gather"]) == {"count": 3, "bytes": 3 * 128 * 4}
    assert _counted(stats["total"]) == {"count": 15, "bytes": 15 * 128 * 4, "unknown_trip_count": 0}


def test_computation_called_twice_is_counted_for_each_call_and_fusions_are_followed():
    text = ADD + """
%reduce_it (cp: bf16[64,32]) -> bf16[64,32] {
  %cp = bf16[64,32]{1,0} parameter(0)
  ROOT %car = bf16[64,32]{1,0} all-reduce(%cp), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}

%fused (fp: bf16[64,32]) -> bf16[64,32] {
  %fp = bf16[64,32]{1,0} parameter(0)
  ROOT %fa2a = bf16[64,32]{1,0} all-to-all(%fp), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

ENTRY %main (p: bf16[64,32]) -> bf16[64,32] {
  %p = bf16[64,32]{1,0} parameter(0)
  %c1 = bf16[64,32]{1,0} call(%p), to_apply=%reduce_it
  %c2 = bf16[64,32]{1,0} call(%c1), to_apply=%reduce_it
  ROOT %f = bf16[64,32]{1,0} fusion(%c2), kind=kCustom, calls=%fused
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-reduce"]) == {"count": 2, "bytes": 2 * 64 * 32 * 2}
    assert _counted(stats["all-to-all"]) == {"count": 1, "bytes": 64 * 32 * 2, "bytes_off_device": 64 * 32 * 2 * 7 // 8}


def test_conditional_counts_each_branch_once():
    text = ADD + """
%then (tp: f32[16]) -> f32[16] {
  %tp = f32[16]{0} parameter(0)
  ROOT %tr = f32[16]{0} all-reduce(%tp), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}

%else (ep: f32[16]) -> f32[16] {
  %ep = f32[16]{0} parameter(0)
  ROOT %er = f32[16]{0} collective-permute(%ep), source_target_pairs={{0,1},{1,0}}
}

ENTRY %main (i: s32[], x: f32[16]) -> f32[16] {
  %i = s32[] parameter(0)
  %x = f32[16]{0} parameter(1)
  ROOT %c = f32[16]{0} conditional(%i, %x, %x), branch_computations={%then, %else}
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-reduce"]) == {"count": 1, "bytes": 64}
    assert _counted(stats["collective-permute"]) == {"count": 1, "bytes": 64}


@pytest.mark.parametrize("element_type,size", [
    ("pred", 1), ("s8", 1), ("u8", 1), ("bf16", 2), ("f16", 2), ("s16", 2), ("u16", 2), ("f32", 4),
    ("s32", 4), ("u32", 4), ("f64", 8), ("s64", 8), ("u64", 8), ("c64", 8), ("c128", 16),
])
def test_element_sizes(element_type, size):
    assert shape_bytes(f"{element_type}[3,5]{{1,0}}") == 15 * size
    assert shape_bytes(f"({element_type}[2], /*index=1*/{element_type}[])") == 3 * size


def test_format_report_is_one_json_object_per_kind_then_total():
    stats = collective_stats_from_hlo_text(_while_module(""))
    lines = [json.loads(line) for line in format_report(stats)]
    assert lines == [
        {"kind": "all-reduce", "count": 1, "bytes_per_device": F32_256},
        {"kind": "total", "count": 1, "bytes_per_device": F32_256, "unknown_trip_count": 1},
    ]


# ---------------------------------------------------------------------------------------------------
# Real programs compiled for 8 simulated CPU devices (tests/conftest.py).


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("x",))


def _compile(mesh, fn, in_specs, out_specs, *args):
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(mapped).lower(*args).compile()


def test_psum_compiles_to_one_all_reduce_of_the_operand(mesh):
    x = jnp.ones((1024,), jnp.float32)
    compiled = _compile(mesh, lambda v: jax.lax.psum(v, "x"), P(), P(), x)
    stats = collective_stats(compiled)
    assert _counted(stats["all-reduce"]) == {"count": 1, "bytes": x.size * x.dtype.itemsize}, compiled.as_text()
    assert stats["total"]["count"] == 1


def test_all_to_all_bytes_are_the_per_device_block(mesh):
    per_device = (8, 16, 32)
    x = jnp.ones((8 * per_device[0],) + per_device[1:], jnp.float32)  # sharded on axis 0 -> (8, 16, 32) each
    compiled = _compile(mesh, lambda v: jax.lax.all_to_all(v, "x", 0, 0), P("x"), P("x"), x)
    stats = collective_stats(compiled)
    expected = int(np.prod(per_device)) * x.dtype.itemsize
    # 8 devices in the group: each keeps its own 1/8 chunk
    assert _counted(stats["all-to-all"]) == {"count": 1, "bytes": expected, "bytes_off_device": expected * 7 // 8}, \
        compiled.as_text()


def test_scan_with_psum_keeps_the_while_loop_and_counts_each_iteration(mesh):
    length = 6
    x = jnp.ones((1024,), jnp.float32)

    def body(carry, _):
        return jax.lax.psum(carry, "x") * 0.5, None

    compiled = _compile(mesh, lambda v: jax.lax.scan(body, v, None, length=length, unroll=1)[0], P(), P(), x)
    text = compiled.as_text()
    assert " while(" in text and f'"known_trip_count":{{"n":"{length}"}}' in text, text
    assert text.count(" all-reduce(") == 1, text  # one all-reduce in the HLO, run `length` times
    stats = collective_stats(compiled)
    assert _counted(stats["all-reduce"]) == {"count": length, "bytes": length * x.size * x.dtype.itemsize}, text
    assert stats["total"]["unknown_trip_count"] == 0


def test_data_dependent_while_loop_reports_an_unknown_trip_count(mesh):
    x = jnp.ones((1024,), jnp.float32)
    fn = lambda v: jax.lax.while_loop(lambda c: c[0] < 100.0, lambda c: jax.lax.psum(c, "x"), v)  # noqa: E731
    compiled = _compile(mesh, fn, P(), P(), x)
    stats = collective_stats(compiled)
    assert stats["all-reduce"]["count"] == 1, compiled.as_text()
    assert stats["total"]["unknown_trip_count"] == 1, compiled.as_text()


def test_group_size_and_off_device_all_to_all_bytes():
    from jaxeff.parallel.collectives import collective_stats_from_hlo_text, group_size

    assert group_size("channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, metadata={}") == 4
    assert group_size("replica_groups=[2,4]<=[8], x") == 4
    assert group_size("replica_groups=mesh['a'=4,'b'=1,'c'=2], device_ids=([2,4]T(1,0)) {'a','c'}, x") == 8
    assert group_size("replica_groups={}") is None
    text = """HloModule m

ENTRY %main (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %a2a = f32[4,8]{1,0} all-to-all(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}
"""
    stats = collective_stats_from_hlo_text(text)
    assert _counted(stats["all-to-all"]) == {"count": 1, "bytes": 128, "bytes_off_device": 96}


@pytest.mark.parametrize("kind, group, expected", [
    ("all-reduce", 4, 2 * 3 / 4 * 1000),  # ring: reduce-scatter then all-gather
    ("all-gather", 4, 3 * 1000),  # receives/forwards the other 3 contributions
    ("reduce-scatter", 8, 7 / 8 * 1000),
    ("all-to-all", 2, 500),
    ("collective-permute", 8, 1000),
    ("all-reduce", None, 1000),  # unreadable group: counted as 2 devices
])
def test_wire_bytes_follow_ring_algorithms(kind, group, expected):
    assert wire_bytes(kind, 1000, group) == pytest.approx(expected)


def test_wire_bytes_of_a_compiled_all_gather_and_all_reduce():
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    x = jax.ShapeDtypeStruct((4, 256), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P("d")))

    def f(x):  # an all-gather of each device's row, and an all-reduce of a per-device partial sum
        full = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, P()))
        return full * 2, jnp.sum(x, axis=0)

    stats = collective_stats(jax.jit(f).lower(x).compile())
    for kind, v in stats.items():
        if kind != "total":
            group = 4
            assert v["wire_bytes"] == int(wire_bytes(kind, v["bytes"], group)), (kind, v)
    assert stats["total"]["wire_bytes"] == sum(v["wire_bytes"] for k, v in stats.items() if k != "total")
    assert stats["total"]["wire_bytes"] > 0
