"""What catches a flipped byte in a checkpoint's array data: orbax/tensorstore alone, or the manifest.

    python scripts/corruption_scan.py [--flips 50]

Saves a 512x512 fp32 random weight (ZeRO-3, 8 simulated CPU devices), finds the step's largest file (the
OCDBT data file with the array chunks) and, for `--flips` offsets spread evenly over it, flips one bit in
a copy and restores it with `verify_integrity=False` (orbax alone: error, identical, or silently
different weights) and runs the manifest check (`CheckpointManager.verify`). Prints one JSON line.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import collections
import json
import shutil
import tempfile

import jax
import numpy as np
import optax

import zerojax as zj
from zerojax.checkpoint import CheckpointManager, CheckpointOptions, CorruptCheckpointError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flips", type=int, default=50)
    args = p.parse_args()
    params = {"w": np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)}
    plan = zj.make_plan(params, optax.sgd(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))
    state = zj.init_state(params, plan)
    work = tempfile.mkdtemp(prefix="corruption_scan_")
    src = os.path.join(work, "ck")
    with CheckpointManager(src) as manager:
        manager.save(state)
    reference = jax.tree.leaves(jax.device_get(state))
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(src, "0")) for n in ns]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    counts = collections.Counter()
    for offset in range(0, size, max(1, size // args.flips)):
        copy = os.path.join(work, "copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        path = copy + target[len(src):]
        data = bytearray(open(path, "rb").read())
        data[offset] ^= 0x01
        open(path, "wb").write(data)
        try:
            got = CheckpointManager(copy, CheckpointOptions(verify_integrity=False), read_only=True).restore(plan)
            leaves = jax.tree.leaves(jax.device_get(got.state))
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, reference))
            counts["orbax: identical" if same else "orbax: SILENTLY DIFFERENT"] += 1
        except Exception:  # noqa: BLE001 - any error counts as detected
            counts["orbax: error"] += 1
        try:
            CheckpointManager(copy, read_only=True).verify(0)
            counts["manifest: missed"] += 1
        except CorruptCheckpointError:
            counts["manifest: caught"] += 1
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"file": os.path.relpath(target, os.path.join(src, "0")).split("/d/")[0] + "/d/*",
                      "file_bytes": size, "flips": sum(counts.values()) // 2, **dict(sorted(counts.items()))}))


if __name__ == "__main__":
    main()
