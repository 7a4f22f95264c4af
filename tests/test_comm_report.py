"""`jaxeff comm-report` and the collectives logged at the start of training (jaxeff.train.comm_report)."""

import json
import re

import jax
import pytest

from helpers import assert_user_error, run_jaxeff, tiny_overrides
from jaxeff.config import load_config
from jaxeff.parallel.collectives import collective_stats, format_report, parse_hlo_module, shape_bytes
from jaxeff.train import train
from jaxeff.train.comm_report import comm_report_lines, comm_scalars, comm_summary, compile_train_step


def _cfg(**extra):
    return load_config("configs/debug.yaml", tiny_overrides(**extra))


def _param_bytes(cfg, devices) -> int:
    """Bytes of all (float32) parameters = of the gradient each data-parallel replica must reduce."""
    from jaxeff.parallel.mesh import build_mesh
    from jaxeff.tasks import build_task
    from jaxeff.train.optimizer import make_optimizer
    from jaxeff.train.state import abstract_state_and_shardings

    task = build_task(cfg)
    abstract, _ = abstract_state_and_shardings(task.model, make_optimizer(cfg.train), build_mesh(cfg, devices),
                                               cfg.train.seed, task.init_input)
    leaves = jax.tree.leaves(abstract["params"])
    assert {str(x.dtype) for x in leaves} == {"float32"}
    return sum(x.size for x in leaves) * 4


def _lines(lines):
    parsed = [json.loads(line) for line in lines]
    return {p["kind"]: p for p in parsed}, parsed


def test_data_parallel_all_reduce_covers_the_gradients():
    cfg = _cfg(**{"mesh.data": 8})
    by_kind, parsed = _lines(comm_report_lines(cfg, jax.devices()))
    assert parsed[-1]["kind"] == "total"
    ar = by_kind["all-reduce"]
    assert ar["count"] > 0
    # Pure data parallelism: every device holds the whole gradient and all of it is summed over the 8 replicas
    # (on jax 0.10.2 CPU a bit more: the loss scalar, and the tied embedding's two gradient parts each).
    assert ar["bytes_per_device"] >= _param_bytes(cfg, jax.devices())
    assert parsed[-1]["bytes_per_device"] == sum(p["bytes_per_device"] for p in parsed[:-1])


def test_one_device_has_no_collectives():
    lines = comm_report_lines(_cfg(**{"mesh.data": 1}), jax.devices()[:1])
    assert [json.loads(line) for line in lines] == [
        {"kind": "total", "count": 0, "bytes_per_device": 0, "unknown_trip_count": 0}]


def _all_reduces_by_loop(hlo: str) -> list[tuple[int, int]]:
    """(multiplier, bytes) of every all-reduce in the HLO: the trip count of the while loop whose body holds it
    (1 outside loops; the step's loops are not nested around collectives here, which this asserts)."""
    computations, _ = parse_hlo_module(hlo)
    trips = {}
    for c in computations.values():
        for i in c.instructions:
            if i.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", i.attributes).group(1)
                trips[body] = int(re.search(r'known_trip_count":\{"n":"(\d+)"', i.attributes).group(1))
    found = []
    for c in computations.values():
        for i in c.instructions:
            if i.opcode in ("all-reduce", "all-reduce-start"):
                found.append((trips.get(c.name, 1), sum(shape_bytes(s) for s in re.findall(
                    r"[a-z0-9]+\[[^\]]*\]", i.shape))))
    return found


def test_microbatches_count_what_runs():
    """With 2 microbatches the gradients are accumulated in a scan (an HLO while with known_trip_count 2).
    Where XLA puts the gradient all-reduce decides the figures: hoisted after the loop it runs once per step;
    left in the loop body it runs once per microbatch. On jax 0.10.2 CPU it stays in the body, so the step
    really reduces the gradients twice and count and bytes are 2x those without microbatches: that is what
    runs, not double counting. The expectations come from the HLO, so a hoisting XLA keeps this test true."""
    stats, found = {}, {}
    for micro in (1, 2):
        compiled = compile_train_step(_cfg(**{"mesh.data": 8, "train.microbatches": micro,
                                              "train.global_batch_size": 16}), jax.devices()).compiled
        stats[micro] = collective_stats(compiled)["all-reduce"]
        found[micro] = _all_reduces_by_loop(compiled.as_text())
        # Exactly what runs: each all-reduce instruction times the trip count of the loop around it.
        assert stats[micro]["count"] == sum(n for n, _ in found[micro])
        assert stats[micro]["bytes"] == sum(n * b for n, b in found[micro])
    assert {n for n, _ in found[1]} == {1}
    assert {n for n, _ in found[2]} <= {1, 2}
    # The same tensors are reduced (per execution) with and without microbatches ...
    assert sum(b for _, b in found[2]) == stats[1]["bytes"]
    # ... and only the ones inside the loop run twice (on jax 0.10.2 CPU: all of them, so exactly 2x).
    in_loop = sum(b for n, b in found[2] if n == 2)
    assert stats[2]["bytes"] == stats[1]["bytes"] + in_loop <= 2 * stats[1]["bytes"]


def test_summary_and_scalars():
    stats = {"all-reduce": {"count": 12, "bytes": 3 * 2**20}, "all-gather": {"count": 2, "bytes": 2**19},
             "total": {"count": 14, "bytes": 3 * 2**20 + 2**19, "unknown_trip_count": 0}}
    line = comm_summary(stats)
    assert line.startswith("collectives per step: all-reduce 12 x (3.00 MiB), all-gather 2 x (0.50 MiB)")
    assert "\n" not in line
    assert comm_summary({"total": {"count": 0, "bytes": 0, "unknown_trip_count": 0}}) is None
    assert comm_scalars(stats) == {
        "comm/all-reduce/count": 12.0, "comm/all-reduce/bytes_per_device": 3.0 * 2**20,
        "comm/all-gather/count": 2.0, "comm/all-gather/bytes_per_device": 2.0**19,
        "comm/total/count": 14.0, "comm/total/bytes_per_device": 3.0 * 2**20 + 2**19}
    assert format_report(stats)[-1].startswith('{"kind": "total"')


def test_cli_prints_json_lines():
    proc = run_jaxeff("comm-report", "--config", "configs/debug.yaml", *tiny_overrides(**{"mesh.data": 2}), devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert parsed[-1]["kind"] == "total" and parsed[-1]["count"] > 0
    assert any(p["kind"] == "all-reduce" for p in parsed[:-1])


def test_cli_config_error_exits_2():
    proc = run_jaxeff("comm-report", "--config", "configs/debug.yaml", *tiny_overrides(**{"mesh.data": 3}), devices=2)
    assert_user_error(proc, "mesh")


def test_training_logs_collectives_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing import event_accumulator as ea

    cfg = load_config(None, tiny_overrides(**{"mesh.data": 2, "train.steps": 2, "train.warmup_steps": 1,
                                              "train.eval_every": 2, "checkpoint.every": 2}))
    train(cfg, tmp_path, console=False)
    header = [line for line in capsys.readouterr().out.splitlines() if "collectives per step" in line]
    assert len(header) == 1 and header[0].startswith("jaxeff: collectives per step: all-reduce "), header
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    events = acc.Scalars("comm/total/bytes_per_device")
    assert [e.step for e in events] == [0] and events[0].value > 0
    assert [e.value for e in acc.Scalars("comm/all-reduce/count")] == [pytest.approx(
        acc.Scalars("comm/total/count")[0].value)]
