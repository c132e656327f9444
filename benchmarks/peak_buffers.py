"""What is live at the peak of a compiled ZeRO train step: the largest buffers, from XLA's own dumps.

    python benchmarks/peak_buffers.py [--model llama-2-7b] [--devices 64] [--stage 3] [--top 12]

Compiles the step as `zerojax estimate --compiled` does (N simulated CPU devices, nothing allocated)
with XLA's buffer-assignment and live-range dumps switched on, then replays the live ranges of the
entry computation's buffers and prints the instruction where their total is largest and the biggest
buffers live there (name, HLO shape, MiB). The replay counts arguments and temporaries alike and
ignores buffers nested inside loop bodies, so its total is close to, not equal to, the memory analysis.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    dump = tempfile.mkdtemp(prefix="zerojax-dump-")
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} --xla_dump_to={dump} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step")
    from zerojax import estimate as est

    result = est.estimate(est.load_model_config(args.model), args.devices, args.stage, seq=args.seq, compiled=True)
    c = result.compiled
    print(f"{args.model}, stage {args.stage}, N = {args.devices}, seq {args.seq}: memory analysis arguments "
          f"{c.argument_bytes / 2**30:.2f} GiB + temporaries {c.temp_bytes / 2**30:.2f} GiB = peak {c.peak_bytes / 2**30:.2f} GiB")
    prefix = next(Path(dump).glob("*jit_step.cpu_after_optimizations-buffer-assignment.txt")).as_posix()
    prefix = prefix.removesuffix("-buffer-assignment.txt")
    sizes, shapes = {}, {}
    for m in re.finditer(r"value: <\d+ ([\w.\-]+)(?: ?\{?([\d,]*)\}?)? @\d+> \(size=(\d+),offset=\d+\): (\S+)",
                         Path(prefix + "-buffer-assignment.txt").read_text()):
        key = f"{m.group(1)}{{{m.group(2) or ''}}}"
        sizes[key], shapes[key] = int(m.group(3)), m.group(4).split("{")[0]
    sequence, ranges_text = Path(prefix + "-live-range.txt").read_text().split("BufferLiveRange:")
    ranges = {m.group(1): (int(m.group(2)), int(m.group(3)))
              for m in re.finditer(r"^\s+([\w.\-]+\{[\d,]*\}):(\d+)-(\d+)", ranges_text, re.M) if m.group(1) in sizes}
    end = max(e for _, e in ranges.values()) + 1
    total = [0] * end
    for key, (start, stop) in ranges.items():
        for t in range(start, stop + 1):
            total[t] += sizes[key]
    peak = max(range(end), key=total.__getitem__)
    names = dict(re.findall(r"^\s+(\d+):(\S+)$", sequence, re.M))
    print(f"replayed peak {total[peak] / 2**30:.2f} GiB at instruction {peak} ({names.get(str(peak))}); largest live buffers:")
    live = sorted(((sizes[k], k) for k, (s, e) in ranges.items() if s <= peak <= e), reverse=True)
    for size, key in live[: args.top]:
        print(f"  {size / 2**20:8.1f} MiB  {shapes[key]:28} {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
