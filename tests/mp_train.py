"""ZeRO training of the tiny transformer, the same script on one process or under `zerojax launch`.

`python -m tests.mp_train [--steps N] [--stage S] [--save DIR --save-at K | --restore DIR] [--forever]`:
every process prints one line `RESULT {json}` with its rank, the process and device counts and the
losses of the steps it ran. `--save` writes a checkpoint after step K; `--restore` resumes from the
latest checkpoint in DIR (onto this run's processes, devices and stage) and runs the remaining steps.
`--hf-model SRC --save DIR` trains the Hugging Face model in SRC at stage 3 instead and saves it.
With `--forever` each process prints `READY <pid> <device count>` and then keeps summing an array over
every device of every process (for the failure tests).
"""

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np
import optax

import zerojax as zj
import zerojax.distributed as zd
from tests import tiny_transformer as tiny
from zerojax import models
from zerojax.checkpoint import CheckpointManager
from zerojax.hf import load_pretrained

STEPS, BATCH, MICRO = 6, 16, 2


def train(mesh, stage=3, steps=STEPS, save=None, save_at=None, restore=None):
    """Losses of a ZeRO run on `mesh`; each process feeds only its own rows of every global batch."""
    params = tiny.init_params()
    plan = zj.make_plan(params, optax.adamw(2e-2, weight_decay=0.1), zj.ZeroRules(mesh, stage=stage))
    if restore:
        with CheckpointManager(restore, read_only=True) as manager:
            state = manager.restore(plan).state
    else:
        state = zj.init_state(params, plan)
    step = zj.make_train_step(tiny.loss_fn, plan, micro_batches=MICRO, max_grad_norm=1.0)
    rows = zd.process_rows(BATCH, mesh)
    losses = []
    for batch in tiny.batches(steps, BATCH)[int(state.step):]:
        state, metrics = step(state, zd.global_batch({"tokens": batch["tokens"][rows]}, mesh))
        losses.append(float(metrics["loss"]))
        if save and int(state.step) == save_at:
            with CheckpointManager(save) as manager:
                manager.save(state)
    return losses


def train_hf(mesh, src, save, steps=2, batch=8, length=12):
    """Losses of stage-3 training of the Hugging Face model in folder `src`, saved to `save` with its config."""
    config = json.loads((Path(src) / "config.json").read_text())
    graphdef, abstract = models.abstract_model(config)
    plan = zj.make_plan(abstract, optax.adamw(1e-2), zj.ZeroRules(mesh, stage=3), zj.Precision.fp32())
    state = zj.init_state(load_pretrained(src, plan), plan)
    step = zj.make_train_step(models.causal_lm_loss(graphdef), plan)
    rows = zd.process_rows(batch, mesh)
    losses = []
    for seed in range(steps):
        ids = np.random.RandomState(seed).randint(0, config["vocab_size"], (batch, length)).astype(np.int32)
        state, metrics = step(state, zd.global_batch({"input_ids": ids[rows]}, mesh))
        losses.append(float(metrics["loss"]))
    with CheckpointManager(save) as manager:
        manager.save(state, hf_config=config)
    return losses


def sum_forever(mesh):
    """Sums a global array over every device, again and again: processes that wait on each other."""
    total = jax.jit(lambda x: x.sum())
    x = zd.global_batch(np.ones(len(mesh.local_devices), np.float32), mesh)
    print(f"READY {os.getpid()} {float(total(x))}", flush=True)
    while True:
        total(x).block_until_ready()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--save")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--restore")
    parser.add_argument("--hf-model", help="train this Hugging Face folder instead (saved to --save)")
    parser.add_argument("--forever", action="store_true")
    args = parser.parse_args()
    processes = zd.initialize()
    if args.forever:
        sum_forever(zj.make_mesh())
    if args.hf_model:
        losses = train_hf(zj.make_mesh(), args.hf_model, args.save)
    else:
        losses = train(zj.make_mesh(), args.stage, args.steps, args.save, args.save_at, args.restore)
    print("RESULT " + json.dumps({
        "rank": processes.process_id, "processes": jax.process_count(), "source": processes.source,
        "devices": jax.device_count(), "local_devices": jax.local_device_count(), "losses": losses,
    }), flush=True)


if __name__ == "__main__":
    main()
