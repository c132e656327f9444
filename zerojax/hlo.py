"""Collectives and host-memory bytes read from a step's program text.

Collective bytes count whole tensors: an all-gather moves its result, a reduce-scatter and an
all-to-all their operands, an all-reduce twice its operand (reduce-scatter + all-gather, the ZeRO
paper's accounting). The lowered StableHLO carries the dtypes a GPU runs; the compiled HLO also holds
the collectives GSPMD inserts when it partitions the optimizer update, and `step_collectives` combines
the two.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")


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
_MLIR_COLLECTIVE = re.compile(r'"stablehlo\.(all_gather|reduce_scatter|all_reduce|all_to_all)"')


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
            bound = m.group(1)
            for other in cond:  # a bound behind a sharding constraint (partially manual shard_map)
                alias = re.match(r"\s*" + re.escape(bound) + r" = sdy\.sharding_constraint (%[\w#]+)", other)
                bound = alias.group(1) if alias else bound
            name = re.escape(bound)
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
_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HLO_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HLO_GROUPS = re.compile(r"replica_groups=(\{\{[0-9,]*\}|\[\d+,(\d+)\]<=)")
_HLO_OPERAND = re.compile(r"%([\w.\-]+)")
# What an instruction between a collective's start and done must be to count as overlapping compute.
_NOT_COMPUTE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-start", "copy-done",
                "after-all", "partition-id", "replica-id", "opt-barrier"}


def _hlo_group_size(line: str) -> int:
    m = _HLO_GROUPS.search(line)
    if not m:
        raise ValueError(f"collective without replica_groups in the compiled program: {line.strip()[:120]}")
    return int(m.group(2)) if m.group(2) else len(m.group(1).strip("{}").split(","))


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, as the ZeRO paper prices it (see the module docstring).

    `times`: how often it runs per step (loop trip counts); `asynchronous`: issued as a start and a done;
    `overlapped`: an asynchronous collective with compute scheduled between its start and its done;
    `rewrite_of`: the collective the program asked for when its op name says the compiler implements it
    as another kind, None otherwise (XLA:TPU's combined all-reduces carry no op name: see `rewritten`).
    """

    kind: str
    dtype: str
    nbytes: int
    times: int = 1
    asynchronous: bool = False
    overlapped: bool = False
    rewrite_of: str | None = None


def _collective_shapes(kind: str, started: bool, lhs: str, line: str) -> tuple[list, int]:
    """(shapes counted, factor) of a collective: an all-gather's results, a reduce-scatter's operands (the
    results times the group size when only they are shown), an all-to-all's operands (its results' shapes),
    an all-reduce's operands twice."""
    shapes = _HLO_SHAPE.findall(lhs)
    if started and kind != "all-reduce":  # an async start returns ((operands), (results))
        half = len(shapes) // 2
        return (shapes[half:], 1) if kind == "all-gather" else (shapes[:half], 1)
    if kind == "reduce-scatter":
        return shapes, _hlo_group_size(line)
    return shapes, 2 if kind == "all-reduce" else 1


def _rewrite_of(kind: str, line: str) -> str | None:
    """The collective JAX asked for (read from the op name) when the compiler emitted another kind."""
    name = re.search(r'op_name="([^"]*)"', line)
    asked = name.group(1).rsplit("/", 1)[-1] if name else ""
    asked = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "psum_scatter": "reduce-scatter"}.get(asked)
    return asked if asked and asked != kind else None


def _while_trip_count(line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's `known_trip_count`, else its condition `counter < constant`
    (XLA:TPU's programs state no trip count; `lax.scan` counts from 0)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", line)
    body = computations.get(cond.group(1), []) if cond else []
    constants = dict(re.findall(r"%([\w.\-]+) = s(?:32|64)\[\][^ ]* constant\((-?\d+)\)", "\n".join(body)))
    for text in body:
        compare = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", text)
        if compare and compare.group(2) in constants:
            return int(constants[compare.group(2)])
    raise ValueError("a while loop in the compiled program has no known trip count and no `counter < constant` "
                     f"condition: {line.strip()[:160]}")


def compiled_program(text: str) -> list[Collective]:
    """Every collective of a compiled HLO module (`compiled.as_text()`, XLA:CPU, XLA:GPU or XLA:TPU) once,
    with how often it runs per step.

    While bodies count their trip count times (a body without collectives needs none: XLA:TPU adds loops
    of its own whose count it does not state); a conditional's branches and async computations count
    once; an async collective (`*-start`) is read from its start, its done is not counted again.
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HLO_COMPUTATION.match(line)
        if m:
            current = computations.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif current is not None and " = " in line:
            current.append(re.sub(r"/\*index=\d+\*/", "", line))  # tuple shapes carry these comments
    if entry is None:
        raise ValueError("compiled program has no ENTRY computation")
    memo: dict[str, list[Collective]] = {}

    def visit(name: str) -> list[Collective]:
        if name in memo:
            return memo[name]
        memo[name] = []  # a computation never calls itself; guards against malformed text
        found, pending = [], {}  # pending: async start -> ([indices in found], compute seen since the start)
        for line in computations.get(name, []):
            op = _HLO_OP.match(line)
            if not op:
                continue
            result, lhs, opcode = op.group(1), op.group(2), op.group(3)
            if opcode.endswith("-done") or opcode == "async-update":
                start = _HLO_OPERAND.search(op.group(4))
                indices, busy = pending.pop(start.group(1), ((), False)) if start else ((), False)
                for i in indices if busy else ():
                    found[i] = dataclasses.replace(found[i], overlapped=True)
                continue
            base, started = (opcode[:-6], True) if opcode.endswith("-start") else (opcode, False)
            first = len(found)
            if base in COLLECTIVES:
                shapes, factor = _collective_shapes(base, started, lhs, line)
                rewrite = _rewrite_of(base, line)
                for dtype, dims in shapes:
                    nbytes = math.prod(int(d) for d in dims.split(",") if d) * _itemsize(dtype)
                    found.append(Collective(base, dtype, factor * nbytes, asynchronous=started, rewrite_of=rewrite))
            else:
                if opcode not in _NOT_COMPUTE and not started:
                    pending = {k: (i, True) for k, (i, _) in pending.items()}
                callees = []
                if opcode == "while":  # a trip count is needed only when the body moves something
                    body = re.search(r"body=%([\w.\-]+)", line).group(1)
                    callees.append((body, _while_trip_count(line, computations) if visit(body) else 1))
                else:
                    for key in ("calls", "to_apply", "branch_computations"):
                        for group in re.findall(key + r"=(\{[^}]*\}|%[\w.\-]+)", line):
                            callees += [(c.strip(" {}%"), 1) for c in group.split(",") if c.strip(" {}")]
                for callee, times in callees:
                    found += [dataclasses.replace(c, times=c.times * times) for c in visit(callee)]
            if started and len(found) > first:  # an async collective, or an async wrapper of one
                for i in range(first, len(found)):
                    found[i] = dataclasses.replace(found[i], asynchronous=True)
                pending[result] = (tuple(range(first, len(found))), False)
        memo[name] = found
        return found

    return visit(entry)


def by_kind(collectives: list[Collective]) -> dict:
    """kind -> dtype -> bytes per step."""
    out: dict = defaultdict(lambda: defaultdict(int))
    for c in collectives:
        out[c.kind][c.dtype] += c.nbytes * c.times
    return {k: dict(v) for k, v in out.items()}


def compiled_collectives(text: str) -> dict:
    """kind -> dtype -> bytes per step of a compiled HLO module (see `compiled_program`)."""
    return by_kind(compiled_program(text))


def overlap(collectives: list[Collective]) -> dict[str, float] | None:
    """Per kind, and in `total`: the share of collective bytes whose async start and done have compute
    scheduled between them; None for a program that states no asynchronous collective (XLA:CPU, and
    XLA:TPU, whose program text shows collectives as single instructions)."""
    if not any(c.asynchronous for c in collectives):
        return None
    share = lambda cs: sum(c.nbytes * c.times for c in cs if c.overlapped) / max(sum(c.nbytes * c.times for c in cs), 1)
    kinds = sorted({c.kind for c in collectives})
    return {**{k: share([c for c in collectives if c.kind == k]) for k in kinds}, "total": share(collectives)}


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
        low_elems, comp_elems = _elements(low), _elements(comp)
        width = (sum(low.values()) / low_elems) if low_elems else 2
        out[kind] = int(sum(low.values()) + max(comp_elems - low_elems, 0) * width)
    return out


def _elements(by_dtype: dict) -> float:
    return sum(b / _itemsize(d) for d, b in by_dtype.items())


def rewritten(lowered: dict, compiled: dict) -> dict[str, int]:
    """Bytes of all-gathers and reduce-scatters the lowered program asks for that the compiled program
    does not move as such (XLA:TPU turns them into all-reduces of zero-padded buffers, which the compiled
    all-reduce bytes then carry), by the kind asked for, at the lowered dtypes."""
    out = {}
    for kind in ("all-gather", "reduce-scatter"):
        asked = lowered.get(kind, {})
        missing = _elements(asked) - _elements(compiled.get(kind, {}))
        if missing > 0 and asked:
            out[kind] = int(missing * sum(asked.values()) / _elements(asked))
    return out
