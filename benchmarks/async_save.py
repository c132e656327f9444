"""How long a checkpoint save blocks the training loop: asynchronous vs synchronous orbax saves.

A ZeRO-3 run (fp32 master + Adam moments, bf16 compute copy) over 8 simulated CPU devices trains a
wide MLP; at chosen steps it saves. Measured per save: the time `CheckpointManager.save` holds the loop
(async: until the arrays are copied off the training buffers; sync: until the files are committed),
the time until the async save is on disk, and the slowdown of the training steps that run while the
async save is being written. Run:

    python benchmarks/async_save.py [--width 2048] [--layers 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import zerojax as zj  # noqa: E402
from zerojax.checkpoint import CheckpointManager, CheckpointOptions  # noqa: E402

BATCH = 64


def init_params(width: int, layers: int) -> dict:
    rng = np.random.default_rng(0)
    return {"layers": [{"w": (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32),
                        "b": np.zeros(width, np.float32)} for _ in range(layers)]}


def loss_fn(params, batch):
    h = batch["x"].astype(jnp.bfloat16)
    for layer in params["layers"]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return jnp.mean((h.astype(jnp.float32) - batch["y"]) ** 2)


def measure(width: int, layers: int, repeats: int, folder: str) -> dict:
    params = init_params(width, layers)
    plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.bf16())
    state = zj.init_state(params, plan)
    step = zj.make_train_step(loss_fn, plan)
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(BATCH, width)).astype(np.float32),
             "y": rng.normal(size=(BATCH, width)).astype(np.float32)}

    def train(n):
        nonlocal state
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - t) / n

    train(3)  # compile and warm up
    step_time = statistics.median(train(3) for _ in range(3))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    out = {"state_bytes": state_bytes, "step_s": step_time, "sync": [], "async": [], "async_done": [],
           "steps_during_async": []}
    for mode in ("sync", "async"):
        for r in range(repeats):
            path = os.path.join(folder, f"{mode}-{r}")
            with CheckpointManager(path, CheckpointOptions(async_save=mode == "async")) as manager:
                jax.block_until_ready(state)
                t = time.perf_counter()
                manager.save(state)
                blocked = time.perf_counter() - t
                out[mode].append(blocked)
                if mode == "async":
                    out["steps_during_async"].append(train(3))  # steps while the files are written
                    manager.wait()
                    out["async_done"].append(time.perf_counter() - t)
            shutil.rmtree(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.ERROR)
    folder = args.dir or tempfile.mkdtemp(prefix="zerojax-async-save-")
    r = measure(args.width, args.layers, args.repeats, folder)
    med = {k: statistics.median(r[k]) for k in ("sync", "async", "async_done", "steps_during_async")}
    print(f"devices={jax.device_count()} ({jax.devices()[0].platform}), params={args.layers} x {args.width}^2, "
          f"state={r['state_bytes'] / 2**20:.0f} MiB (bf16 params + fp32 master + Adam m, v), "
          f"repeats={args.repeats} (median)")
    print(f"train step:                     {r['step_s'] * 1e3:8.1f} ms")
    print(f"sync save, loop blocked:        {med['sync'] * 1e3:8.1f} ms   {r['sync']}")
    print(f"async save, loop blocked:       {med['async'] * 1e3:8.1f} ms   {r['async']}")
    print(f"async save, on disk after:      {med['async_done'] * 1e3:8.1f} ms")
    print(f"train step during async write:  {med['steps_during_async'] * 1e3:8.1f} ms")
    print(f"blocked async / sync:           {med['async'] / med['sync'] * 100:8.1f} %  (target < 20 %)")


if __name__ == "__main__":
    main()
