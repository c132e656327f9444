"""Collectives and host-memory bytes read from a step's program text.

Collective bytes count whole tensors: an all-gather moves its result, a reduce-scatter its operand,
an all-reduce twice its operand (reduce-scatter + all-gather, the ZeRO paper's accounting). The
lowered StableHLO carries the dtypes a GPU runs; the compiled HLO also holds the collectives GSPMD
inserts when it partitions the optimizer update, and `step_collectives` combines the two.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce")


def _itemsize(dtype: str) -> int:
    """Bytes of one element of an MLIR or HLO element type (`bf16`, `f32`, `i1`, `pred`, `f8E4M3FN`)."""
    if dtype in ("pred", "i1"):
        return 1
    m = re.match(r"[a-zA-Z]+(\d+)", dtype)
    if not m:
        raise ValueError(f"unknown element type {dtype!r} in the program text")
    return max(int(m.group(1)) // 8, 1)


def _tensor_bytes(dims: str, dtype: str) -> int:
    n = math.prod(int(d) for d in dims.split("x") if d) if dims else 1
    return n * _itemsize(dtype)


_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-zA-Z][a-zA-Z0-9]*)>")
_MLIR_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)\(")
_MLIR_CALL = re.compile(r"call @([\w.$-]+)\(")
_MLIR_COLLECTIVE = re.compile(r'"stablehlo\.(all_gather|reduce_scatter|all_reduce)"')


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _mlir_types(signature: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(operand types, result types) of an op signature `(tensor<..>, ..) -> tensor<..>`."""
    operands, _, results = signature.rpartition("->")
    return _MLIR_TENSOR.findall(operands), _MLIR_TENSOR.findall(results)


def _mlir_trip_count(lines: list[str], start: int, cond: list[str]) -> int:
    """The trip count of a `stablehlo.while` whose condition is `iv < constant` (how `lax.scan` lowers)."""
    for line in cond:
        m = re.search(r"stablehlo\.compare\s+LT,\s*%[\w#]+,\s*(%[\w#]+)", line)
        if m:
            name = re.escape(m.group(1))
            const = re.compile(name + r" = stablehlo\.constant dense<(-?\d+)> : tensor<i(?:32|64)>")
            for candidate in cond + lines[start::-1]:
                c = const.search(candidate)
                if c:
                    return int(c.group(1))
    raise ValueError("a stablehlo.while loop has no constant trip count; cannot count its collectives")


def _scan_mlir_function(lines: list[str]) -> tuple[list, list]:
    """(collectives, calls) of one function body: `(kind, dtype, bytes, times)` and `(callee, times)`."""
    collectives, calls, loops = [], [], []  # loops: (indent of the while, trip count)
    i = 0
    while i < len(lines):
        line = lines[i]
        ind = _indent(line)
        if loops and ind == loops[-1][0] and line.strip() == "}":  # the end of a loop body
            loops.pop()
            i += 1
            continue
        times = math.prod(t for _, t in loops)
        if "stablehlo.while" in line:
            j = i + 1
            while not (lines[j].strip() == "} do {" and _indent(lines[j]) == ind):
                j += 1
            loops.append((ind, _mlir_trip_count(lines, i, lines[i + 1:j])))
            i = j + 1
            continue
        m = _MLIR_COLLECTIVE.search(line)
        if m:
            kind = m.group(1).replace("_", "-")
            j = i
            if line.rstrip().endswith("({"):  # a reducer region: the signature follows it
                j = i + 1
                while not (lines[j].strip().startswith("})") and _indent(lines[j]) == ind):
                    j += 1
            signature = lines[j].rsplit(" : ", 1)[-1]
            operands, results = _mlir_types(signature)
            counted = results if kind == "all-gather" else operands
            factor = 2 if kind == "all-reduce" else 1
            for dims, dtype in counted:
                collectives.append((kind, dtype, factor * _tensor_bytes(dims, dtype), times))
            i = j + 1
            continue
        for callee in _MLIR_CALL.findall(line):
            calls.append((callee, times))
        i += 1
    return collectives, calls


def _total(functions: dict, entry: str) -> dict:
    """kind -> dtype -> bytes of `entry`, following calls and multiplying loop bodies by trip counts."""
    memo: dict[str, dict] = {}

    def visit(name: str) -> dict:
        if name not in memo:
            out: dict = defaultdict(lambda: defaultdict(int))
            collectives, calls = functions.get(name, ([], []))
            for kind, dtype, nbytes, times in collectives:
                out[kind][dtype] += nbytes * times
            for callee, times in calls:
                for kind, by_dtype in visit(callee).items():
                    for dtype, nbytes in by_dtype.items():
                        out[kind][dtype] += nbytes * times
            memo[name] = out
        return memo[name]

    return {k: dict(v) for k, v in visit(entry).items()}


def lowered_collectives(text: str) -> dict:
    """kind -> dtype -> bytes per step of a lowered StableHLO module (`lowered.as_text()`).

    Calls are followed; a `stablehlo.while` body counts its trip count times (read from its `iv < c`
    condition, as `lax.scan` and `fori_loop` lower); ops in the branches of a conditional count once.
    """
    functions, name, body = {}, None, []
    for line in text.splitlines():
        m = _MLIR_FUNC.match(line)
        if m:
            name, body = m.group(1), []
            functions[name] = body
        elif name is not None:
            body.append(line)
    if "main" not in functions:
        raise ValueError("lowered program has no @main function")
    return _total({k: _scan_mlir_function(v) for k, v in functions.items()}, "main")


_HLO_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_HLO_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?)\s(all-gather|reduce-scatter|all-reduce)(-start)?\(")
_HLO_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HLO_GROUPS = re.compile(r"replica_groups=(\{\{[0-9,]*\}|\[\d+,(\d+)\]<=)")


def _hlo_group_size(line: str) -> int:
    m = _HLO_GROUPS.search(line)
    if not m:
        raise ValueError(f"collective without replica_groups in the compiled program: {line.strip()[:120]}")
    return int(m.group(2)) if m.group(2) else len(m.group(1).strip("{}").split(","))


def compiled_collectives(text: str) -> dict:
    """kind -> dtype -> bytes per step of a compiled HLO module (`compiled.as_text()`).

    While bodies count `known_trip_count` times; a conditional's branches each count once.
    """
    functions: dict[str, tuple[list, list]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HLO_COMPUTATION.match(line)
        if m:
            current = ([], [])
            functions[m.group(2)] = current
            entry = m.group(2) if m.group(1) else entry
            continue
        if current is None or " = " not in line:
            continue
        line = re.sub(r"/\*index=\d+\*/", "", line)  # tuple shapes carry these comments
        c = _HLO_COLLECTIVE.search(line)
        if c:
            kind = c.group(2)
            shapes = _HLO_SHAPE.findall(c.group(1))
            if c.group(3) and kind == "all-gather":  # an async start returns (operands, results)
                shapes = shapes[len(shapes) // 2:]
            factor = _hlo_group_size(line) if kind == "reduce-scatter" else (2 if kind == "all-reduce" else 1)
            for dtype, dims in shapes:
                nbytes = math.prod(int(d) for d in dims.split(",") if d) * _itemsize(dtype)
                current[0].append((kind, dtype, factor * nbytes, 1))
            continue
        if " while(" in line:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if not trip:
                raise ValueError("a while loop in the compiled program has no known trip count")
            current[1].append((re.search(r"body=%([\w.\-]+)", line).group(1), int(trip.group(1))))
            continue
        for key in ("calls", "to_apply", "branch_computations"):
            for group in re.findall(key + r"=(\{[^}]*\}|%[\w.\-]+)", line):
                current[1].extend((name.strip(" {}%"), 1) for name in group.split(",") if name.strip(" {}"))
    if entry is None:
        raise ValueError("compiled program has no ENTRY computation")
    return _total(functions, entry)


_HOST_ARGUMENT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]\{[0-9,]*:S\(5\)\}")


def host_layout_bytes(hlo_text: str) -> int:
    """Bytes per device of the entry computation's parameters that a compiled HLO module places in
    host memory (memory space S(5) in `entry_computation_layout`)."""
    found = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo_text)
    if found is None:
        return 0
    return sum(_tensor_bytes(dims.replace(",", "x"), dtype) for dtype, dims in _HOST_ARGUMENT.findall(found.group(1)))


def step_collectives(lowered: dict, compiled: dict) -> dict[str, int]:
    """Bytes per step by kind: the lowered program's, plus the elements that only the compiled program
    moves (GSPMD's partitioning of the optimizer update), priced at the lowered itemsize of that kind
    (the compute itemsize when the lowered program has none of that kind: 2 bytes)."""
    out = {}
    for kind in COLLECTIVES:
        low, comp = lowered.get(kind, {}), compiled.get(kind, {})
        low_elems = sum(b / _itemsize(d) for d, b in low.items())
        comp_elems = sum(b / _itemsize(d) for d, b in comp.items())
        width = (sum(low.values()) / low_elems) if low_elems else 2
        out[kind] = int(sum(low.values()) + max(comp_elems - low_elems, 0) * width)
    return out
