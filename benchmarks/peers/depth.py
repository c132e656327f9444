"""How a compiled step's device temporaries grow with depth, and how much of them the compiler's own
buffer assignment accounts for.

    python benchmarks/peers/depth.py --target tpu-v5p --devices 8 --layers 8 16 24 32 [--remat offload] [--baseline]

Compiles the step of `compare.py` (zerojax ZeRO-3, or with `--baseline` the plain GSPMD FSDP step) for
Llama-2-7B shapes at each depth, with XLA's dumps switched on, and prints one JSON line per depth: the
memory analysis' temporaries (what `compare.py peak` reports) beside the device temporaries that the
buffer assignment places (the sizes of its preallocated temporary allocations in device memory,
memory space 0), and the difference, which the compiler reserves outside the buffer assignment. Then
the growth per layer of each, between consecutive depths. Nothing is allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="zerojax-depth-")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text " \
                          "--xla_dump_hlo_module_re=jit_step"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
from zerojax import estimate as est  # noqa: E402
from zerojax.targets import resolve  # noqa: E402

GIB = 2**30
_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$", re.M)


def dumped() -> set[str]:
    """The buffer assignments dumped so far."""
    return set(map(str, Path(DUMP).glob("*after_optimizations-buffer-assignment.txt")))


def assigned_temporaries(before: set[str]) -> int:
    """Bytes of the device-memory temporary allocations in the buffer assignment dumped since `before`."""
    new = sorted(dumped() - before)
    if not new:
        raise SystemExit(f"no buffer assignment was dumped to {DUMP}: this compiler ignores --xla_dump_to")
    text = Path(new[-1]).read_text()
    return sum(int(size) for size, rest in _ALLOCATION.findall(text)
               if "preallocated-temp" in rest and "color" not in rest)  # color > 0: VMEM, host, ...


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--remat", default="full", choices=["full", "offload"])
    parser.add_argument("--baseline", action="store_true", help="the GSPMD FSDP step (largest dimension) instead")
    args = parser.parse_args()
    target = resolve(args.target)
    devices = target.devices(args.devices)
    rows = []  # (JSON row, assigned temporaries in GiB, unrounded)
    for layers in args.layers:
        before = dumped()
        config = dict(est.PRESETS["llama-2-7b"], num_hidden_layers=layers)
        row = compare.compiled("gspmd" if args.baseline else "zerojax", config, devices, 1, 2048, remat=args.remat)
        assigned = assigned_temporaries(before) / GIB
        row.update(assigned_temporaries_gib=round(assigned, 3), unassigned_gib=round(row["temporaries_gib"] - assigned, 3))
        rows.append((row, assigned))
        print(json.dumps({"target": target.name, "devices": args.devices, "model": "llama-2-7b", **row}), flush=True)
    for (a, x), (b, y) in zip(rows, rows[1:]):
        span = b["layers"] - a["layers"]
        print(json.dumps({"target": target.name, "devices": args.devices, "step": a["step"],
                          "layers": f"{a['layers']}->{b['layers']}",
                          "temporaries_gib_per_layer": round((b["temporaries_gib"] - a["temporaries_gib"]) / span, 4),
                          "assigned_gib_per_layer": round((y - x) / span, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
