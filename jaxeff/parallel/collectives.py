"""Collective-communication statistics read from the compiled (optimised) HLO of a jitted function.

``collective_stats(compiled)`` answers "how many collectives run per call of this compiled program, and how
many bytes does each device put into them?" by parsing ``compiled.as_text()`` (the HLO after SPMD
partitioning and XLA's optimisation passes, so it shows what really runs, not what was traced).

Counting rules
--------------
Kinds: ``all-to-all``, ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``collective-permute``,
``ragged-all-to-all`` and ``collective-broadcast``. ``send``/``recv`` are not counted.

Bytes are per device and per execution, computed from the element type and the (per-device, post-SPMD)
dimensions of the collective's **operands**; tuple-shaped operands, and collectives with several operands,
sum their parts. Element sizes: pred/s8/u8/f8* = 1, bf16/f16/s16/u16 = 2, f32/s32/u32 = 4,
f64/s64/u64/c64 = 8, c128 = 16; sub-byte types (s4, u4, s2, u2, f4e2m1fn, ...) are rounded up per array.
Bounded dynamic dimensions (``<=N``) count at their bound. Which side is counted:

* all-reduce, all-to-all, collective-permute, collective-broadcast: the operand (= the result size).
* reduce-scatter: the operand, i.e. the full buffer each device reduces (the result is 1/group of it).
* all-gather: the operand, i.e. what one device *contributes*; the result is group-size times larger.
* ragged-all-to-all: only the first operand (the input buffer, an upper bound on what is sent); the
  output buffer and the offset/size operands are not counted.
* collective-permute in its in-place form (has ``slice_sizes=``): only the first operand (the input).

All-to-alls also get ``bytes_off_device``: ``bytes * (g - 1) / g`` for replica groups of g devices (each
device keeps its own 1/g chunk), when the groups are readable (``{{0,1,2,3},...}``, ``[2,4]<=[8]`` or
``mesh[...] {axes}``); this is the figure closed-form all-to-all volumes (e.g. BigMac's) describe.

Async pairs: ``all-gather-start``/``-done``, ``all-reduce-start``/``-done``, ``collective-permute-start``/
``-done`` and the sugared ``<kind>-start``/``-update``/``-done`` forms count once, at the start.
``async-start(...) calls=%c`` counts whatever collective the called computation ``%c`` contains;
``async-update``/``async-done`` (which repeat ``calls=``) are ignored.

Call graph: the walk starts at the ENTRY computation and follows every called computation, so a
computation called from two places is counted twice. Multipliers:

* ``while``: the ``body=`` computation is multiplied by the trip count that XLA records in the while's
  ``backend_config`` as ``"known_trip_count":{"n":"6"}``; the ``condition=`` computation by trip count + 1
  (the times it is evaluated). Nested loops multiply. A while without a readable trip count counts its
  body and condition once and is reported in ``result["total"]["unknown_trip_count"]`` (the number of
  distinct such while instructions reached from ENTRY).
* ``conditional``: every branch (``branch_computations=``/``true_computation=``/``false_computation=``) is
  counted once, i.e. as if every branch ran: an upper bound, since only one branch runs per call.
* ``call``/``fusion``/``async-start``/``custom-call`` and any other ``calls=``/``to_apply=``/
  ``called_computations=`` reference: the caller's multiplier.

Limitations: the text must be HLO as XLA prints it, one instruction per line (as ``Compiled.as_text()``
gives); with no ENTRY computation the last computation is used. Trip counts that XLA did not record are
not inferred from the loop condition.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

KINDS: tuple[str, ...] = (
    "all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute", "ragged-all-to-all",
    "collective-broadcast",
)

_ELEMENT_BITS: dict[str, int] = {
    "pred": 8, "s8": 8, "u8": 8,
    "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
    "f32": 32, "s32": 32, "u32": 32,
    "f64": 64, "s64": 64, "u64": 64, "c64": 64,
    "c128": 128,
    "s4": 4, "u4": 4, "s2": 2, "u2": 2, "s1": 1, "u1": 1, "f4e2m1fn": 4,
    "token": 0,
}

_ARRAY_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_LEADING_ARRAY_SHAPE = re.compile(r"[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")
_INSTRUCTION = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{$")
_COMMENT = re.compile(r"/\*.*?\*/")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_TRIP_COUNT = re.compile(r'known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"?(\d+)')
_SINGLE_CALLEE = re.compile(r"(?<![\w.\-])(calls|to_apply|body|condition|true_computation|false_computation)"
                            r"=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"(?<![\w.\-])(calls|called_computations|branch_computations)=\{([^}]*)\}")


@dataclass
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attributes``."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attributes: str


@dataclass
class Computation:
    """A named computation: its instructions in order and each instruction's result shape by name."""

    name: str
    instructions: list[Instruction] = field(default_factory=list)
    shapes: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Shapes and bytes


def _array_bytes(element_type: str, dims: str) -> int:
    if element_type not in _ELEMENT_BITS:
        if element_type.startswith("f8"):
            bits = 8
        else:
            raise ValueError(f"unknown HLO element type {element_type!r}")
    else:
        bits = _ELEMENT_BITS[element_type]
    elements = math.prod(int(d) for d in re.findall(r"\d+", dims))
    return (elements * bits + 7) // 8


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string such as ``f32[8,16]{1,0}`` or ``(f32[4]{0}, bf16[2,2])`` (tuples summed)."""
    return sum(_array_bytes(t, dims) for t, dims in _ARRAY_SHAPE.findall(_COMMENT.sub("", shape)))


# --------------------------------------------------------------------------------------------------
# Parsing


def _matching_paren(text: str, open_index: int) -> int:
    """Index of the ``)`` that closes the ``(`` at ``open_index`` (``len(text)`` if unbalanced)."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not nested inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_instruction(name: str, rhs: str) -> Instruction | None:
    """Parse the right-hand side ``shape opcode(operands), attributes`` of an instruction line."""
    rhs = _COMMENT.sub("", rhs).strip()
    if rhs.startswith("("):
        end = _matching_paren(rhs, 0) + 1
        shape, rest = rhs[:end], rhs[end:].lstrip()
    else:
        m = _LEADING_ARRAY_SHAPE.match(rhs)
        shape, rest = (m.group(0), rhs[m.end():].lstrip()) if m else ("", rhs)
    m = _OPCODE.match(rest)
    if m is None:
        return None
    close = _matching_paren(rest, m.end() - 1)
    return Instruction(name=name, shape=shape, opcode=m.group(1),
                       operands=_split_top_level(rest[m.end():close]), attributes=rest[close + 1:])


def parse_hlo_module(text: str) -> tuple[dict[str, Computation], str]:
    """Computations by name and the name of the entry computation (ENTRY, else the last one)."""
    computations: dict[str, Computation] = {}
    entry, current = None, None
    for raw in text.splitlines():
        line = raw.strip()
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = computations.setdefault(header.group(2), Computation(header.group(2)))
                if header.group(1):
                    entry = current.name
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        instruction = _parse_instruction(m.group(1), m.group(2)) if m else None
        if instruction is not None:
            current.instructions.append(instruction)
            current.shapes[instruction.name] = instruction.shape
    if not computations:
        raise ValueError("no HLO computation found in the text")
    return computations, entry if entry is not None else list(computations)[-1]


# --------------------------------------------------------------------------------------------------
# Classification and per-instruction bytes


def _collective_kind(opcode: str) -> str | None:
    """The kind an instruction counts as (``<kind>`` or ``<kind>-start``), else None."""
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    return base if base in KINDS else None


def _is_ignored_async_part(opcode: str) -> bool:
    """``-done``/``-update`` halves of an async pair: counted at their start, never walked."""
    return opcode.endswith("-done") or opcode.endswith("-update")


def _operand_bytes(operand: str, computation: Computation, module_shapes: dict[str, str]) -> int:
    """Bytes of one operand: its inline shape if printed (``f32[8]{0} %x``), else its definition's shape."""
    head, _, name = operand.rpartition(" ")
    if head.strip():
        return shape_bytes(head)
    name = name.lstrip("%")
    shape = computation.shapes.get(name, module_shapes.get(name))
    if shape is None:
        raise ValueError(f"operand %{name} is not defined in computation %{computation.name}")
    return shape_bytes(shape)


_GROUP_LIST = re.compile(r"replica_groups=\{\{([^}]*)\}")
_GROUP_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_GROUP_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*\{([^}]*)\}")


def group_size(attributes: str) -> int | None:
    """Devices in one replica group of a collective (its first group), or None when the text does not say."""
    if m := _GROUP_LIST.search(attributes):
        return len(m.group(1).split(","))
    if m := _GROUP_IOTA.search(attributes):
        return int(m.group(1).split(",")[-1])
    if m := _GROUP_MESH.search(attributes):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    return None


def _off_device_bytes(kind: str, nbytes: int, instruction: Instruction) -> int | None:
    """All-to-alls keep 1/g of their buffer on the device (its own chunk): the rest crosses the interconnect."""
    size = group_size(instruction.attributes) if kind in ("all-to-all", "ragged-all-to-all") else None
    return None if size is None else nbytes * (size - 1) // size


def wire_bytes(kind: str, nbytes: int, group: int | None) -> float:
    """Bytes one device sends over links for a collective of `nbytes` (counted as above) over `group` devices,
    with the bandwidth-optimal (ring) algorithms: all-reduce 2(g-1)/g of its buffer, all-gather g-1 times its
    contribution, reduce-scatter and all-to-all (g-1)/g, a permute or broadcast its buffer. An unreadable group
    counts as 2 devices (the least any collective can span)."""
    g = group or 2
    factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": g - 1, "reduce-scatter": (g - 1) / g,
              "all-to-all": (g - 1) / g, "ragged-all-to-all": (g - 1) / g}.get(kind, 1.0)
    return nbytes * factor


def _collective_bytes(kind: str, instruction: Instruction, computation: Computation,
                      module_shapes: dict[str, str]) -> int:
    operands = instruction.operands
    if kind == "ragged-all-to-all" or (kind == "collective-permute" and "slice_sizes=" in instruction.attributes):
        operands = operands[:1]
    return sum(_operand_bytes(op, computation, module_shapes) for op in operands)


# --------------------------------------------------------------------------------------------------
# Call-graph walk


def _trip_count(instruction: Instruction) -> int | None:
    m = _TRIP_COUNT.search(instruction.attributes)
    return int(m.group(1)) if m else None


def _callees(instruction: Instruction) -> list[tuple[str, str]]:
    """(attribute, computation name) for every computation an instruction calls."""
    attributes = _STRING.sub('""', instruction.attributes)
    found = [(a, n) for a, n in _SINGLE_CALLEE.findall(attributes)]
    for attribute, names in _CALLEE_LIST.findall(attributes):
        found += [(attribute, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return found


class _Walker:
    """Per-execution (count, bytes) of each computation, memoised; callers scale by their multiplier."""

    def __init__(self, computations: dict[str, Computation]):
        self.computations = computations
        self.module_shapes = {k: v for c in computations.values() for k, v in c.shapes.items()}
        self.memo: dict[str, tuple[Counter, Counter]] = {}
        self.unknown_loops: set[str] = set()

    def stats(self, name: str) -> tuple[Counter, Counter, Counter, Counter]:
        if name not in self.memo:
            self.memo[name] = self._compute(self.computations[name])
        return self.memo[name]

    def _compute(self, computation: Computation) -> tuple[Counter, Counter, Counter]:
        """(count, bytes, off-device bytes, wire bytes) per kind for one execution of `computation`."""
        counts, nbytes, off, wire = Counter(), Counter(), Counter(), Counter()
        for instruction in computation.instructions:
            if _is_ignored_async_part(instruction.opcode):
                continue
            kind = _collective_kind(instruction.opcode)
            if kind is not None:
                size = _collective_bytes(kind, instruction, computation, self.module_shapes)
                counts[kind] += 1
                nbytes[kind] += size
                crossing = _off_device_bytes(kind, size, instruction)
                if crossing is not None:
                    off[kind] += crossing
                wire[kind] += wire_bytes(kind, size, group_size(instruction.attributes))
                continue
            for callee, multiplier in self._scaled_callees(instruction):
                for mine, theirs in zip((counts, nbytes, off, wire), self.stats(callee)):
                    for k, v in theirs.items():
                        mine[k] += multiplier * v
        return counts, nbytes, off, wire

    def _scaled_callees(self, instruction: Instruction) -> list[tuple[str, int]]:
        """Called computations with their multiplier: trip count for a while body, +1 for its condition."""
        body, condition = 1, 1
        if instruction.opcode == "while":
            trips = _trip_count(instruction)
            if trips is None:
                self.unknown_loops.add(instruction.name)
            else:
                body, condition = trips, trips + 1
        multiplier = {"body": body, "condition": condition} if instruction.opcode == "while" else {}
        return [(callee, multiplier.get(attribute, 1)) for attribute, callee in _callees(instruction)
                if callee in self.computations]


# --------------------------------------------------------------------------------------------------
# Public API


def collective_stats_from_hlo_text(text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count", "bytes"}}`` for the collective kinds present, plus ``"total"``.

    ``count`` is collectives executed per call, ``bytes`` the bytes per device per call (see the module
    docstring for the rules). ``total`` also carries ``unknown_trip_count``: the number of while loops whose
    trip count could not be read (their bodies were counted once).
    """
    computations, entry = parse_hlo_module(text)
    walker = _Walker(computations)
    counts, nbytes, off, wire = walker.stats(entry)
    result: dict[str, dict[str, int]] = {
        kind: {"count": int(counts[kind]), "bytes": int(nbytes[kind]), "wire_bytes": int(wire[kind])}
        for kind in KINDS if counts[kind]
    }
    for kind, v in off.items():  # all-to-alls whose replica groups were readable
        result[kind]["bytes_off_device"] = int(v)
    result["total"] = {
        "count": sum(v["count"] for v in result.values()),
        "bytes": sum(v["bytes"] for v in result.values()),
        "wire_bytes": sum(v["wire_bytes"] for v in result.values()),
        "unknown_trip_count": len(walker.unknown_loops),
    }
    return result


def collective_stats(compiled: Any) -> dict[str, dict[str, int]]:
    """Collective statistics of a ``jax.jit(f).lower(*args).compile()`` object, from its optimised HLO."""
    return collective_stats_from_hlo_text(compiled.as_text())


def format_report(stats: dict[str, dict[str, int]]) -> list[str]:
    """One JSON line per kind (``kind``, ``count``, ``bytes_per_device``), the ``total`` line last."""
    lines = [json.dumps({"kind": kind, "count": v["count"], "bytes_per_device": v["bytes"],
                         **({"bytes_off_device": v["bytes_off_device"]} if "bytes_off_device" in v else {})})
             for kind, v in stats.items() if kind != "total"]
    total = stats.get("total", {"count": 0, "bytes": 0, "unknown_trip_count": 0})
    lines.append(json.dumps({"kind": "total", "count": total["count"], "bytes_per_device": total["bytes"],
                             "unknown_trip_count": total.get("unknown_trip_count", 0)}))
    return lines
