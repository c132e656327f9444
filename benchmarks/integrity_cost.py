"""Cost of the checkpoint integrity manifest: SHA-256 of every file at save, verification at restore.

    python benchmarks/integrity_cost.py [--mib 256]

Saves a ZeRO-3 AdamW state of about `--mib` MiB (random fp32 weights, 8 simulated CPU devices), then
times: the save (async write + wait, manifest included), hashing the step's files again (what the
manifest adds to the save, in orbax's background thread on the primary process), the verification
alone, and a restore with and without verification. Prints one JSON line.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import json
import tempfile
import time

import numpy as np
import optax

import zerojax as zj
from zerojax.checkpoint import CheckpointManager, CheckpointOptions
from zerojax.checkpoint.integrity import checksums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="size of the whole state (params + 2 Adam moments)")
    args = p.parse_args()
    n = max(1, args.mib * 2**20 // 3 // 4 // (1024 * 1024))  # 1024x1024 fp32 matrices per copy of the weights
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.normal(size=(1024, 1024)).astype(np.float32) for i in range(n)}
    plan = zj.make_plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))
    state = zj.init_state(params, plan)
    state = state._replace(opt_state=jax_tree_fill(state.opt_state))
    folder = tempfile.mkdtemp(prefix="integrity_cost_")
    with CheckpointManager(folder) as manager:
        t0 = time.perf_counter()
        manager.save(state)
        manager.wait()
        save_s = time.perf_counter() - t0
    step = os.path.join(folder, "0")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step) for f in fs)
    t0 = time.perf_counter()
    checksums(step)
    hash_s = time.perf_counter() - t0
    reader = CheckpointManager(folder, read_only=True)
    t0 = time.perf_counter()
    reader.verify(0)
    verify_s = time.perf_counter() - t0
    timings = {}
    for verify in (False, True):
        m = CheckpointManager(folder, CheckpointOptions(verify_integrity=verify), read_only=True)
        t0 = time.perf_counter()
        restored = m.restore(plan)
        restored.state.params["w0"].block_until_ready()
        timings[verify] = time.perf_counter() - t0
    print(json.dumps({
        "state_mib_on_disk": round(size / 2**20, 1), "save_and_wait_s": round(save_s, 3),
        "manifest_hash_s": round(hash_s, 3), "hash_mib_per_s": round(size / 2**20 / hash_s),
        "verify_s": round(verify_s, 3), "restore_without_verify_s": round(timings[False], 3),
        "restore_with_verify_s": round(timings[True], 3), "cpu_count": os.cpu_count(),
    }))


def jax_tree_fill(tree):
    """Random moments (zeros compress to nothing and would understate the files)."""
    import jax

    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype) if x.ndim else x,
                                                 x.sharding), tree)


if __name__ == "__main__":
    main()
