"""SIGKILL a training process at random moments while it writes asynchronous checkpoints.

    python scripts/crash_during_save.py --kills 20 --out benchmarks/results/faults_crash.json

A child process trains the tiny transformer of `tests/tiny_transformer.py` (ZeRO-3, 8 simulated CPU
devices, AdamW) and saves every step asynchronously (`save_total_limit=3`, so old steps are deleted
while new ones are written). It resumes from the folder's latest step, as a restarted job does. The
parent waits for a random save to start, sleeps a random 0-`--max-delay` seconds and SIGKILLs it; then
it checks, with a read-only manager, that

- no temporary (half-written) folder is listed as a step, and the folder's newest step is newer than or
  equal to the previous trial's,
- the newest step passes its integrity check and restores bit-identically to the uninterrupted
  reference run at that step (stepped in this process),

and records whether the kill landed while a save was being written (a temporary folder was left), how
long the restore took, and whether older steps (possibly half-deleted by rotation) verify. Exit code 1
if any check fails. The next trial's child starts on the same folder (its manager deletes leftovers).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAX_STEPS, BATCH = 200, 16


def _setup():
    import optax

    import zerojax as zj
    from tests import tiny_transformer as T

    plan = zj.make_plan(T.init_params(), optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=3))
    return zj, T, plan


def child(folder: str) -> None:
    """Trains from the folder's latest step (or from scratch), saving every step, until killed."""
    from zerojax.checkpoint import CheckpointManager, CheckpointOptions

    zj, T, plan = _setup()
    step_fn = zj.make_train_step(T.loss_fn, plan)
    data = T.batches(MAX_STEPS, BATCH)
    manager = CheckpointManager(folder, CheckpointOptions(save_total_limit=3))
    state = manager.restore(plan).state if manager.latest_step() is not None else zj.init_state(T.init_params(), plan)
    print("ready", int(state.step), flush=True)
    for s in range(int(state.step), MAX_STEPS):
        state, _ = step_fn(state, data[s])
        manager.save(state)  # returns once the arrays are copied; files are written in the background
        print("saving", s + 1, flush=True)
    manager.close()
    print("finished", flush=True)


class Reference:
    """The uninterrupted run, stepped in this process as far as asked: `at(n)` is its state after n steps."""

    def __init__(self):
        import jax

        self.zj, self.T, self.plan = _setup()
        self.step_fn = self.zj.make_train_step(self.T.loss_fn, self.plan)
        self.data = self.T.batches(MAX_STEPS, BATCH)
        self.state = self.zj.init_state(self.T.init_params(), self.plan)
        self.states = [jax.device_get(self.state)]

    def at(self, step: int):
        import jax

        while len(self.states) <= step:
            self.state, _ = self.step_fn(self.state, self.data[len(self.states) - 1])
            self.states.append(jax.device_get(self.state))
        return self.states[step]


def _tmp_folders(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n)


def trial(folder: str, rng: random.Random, max_delay: float, ref: Reference, previous: int | None) -> dict:
    """One kill: start the child, kill it during a random save, check the folder."""
    import jax
    import numpy as np

    from zerojax.checkpoint import CheckpointManager

    proc = subprocess.Popen([sys.executable, __file__, "--child", folder], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline().split()
    if first[:1] != ["ready"]:
        proc.kill()
        raise RuntimeError(f"child did not start: {first}")
    target_save = rng.randint(1, 4)
    saves = 0
    for line in proc.stdout:
        if line.startswith("saving"):
            saves += 1
            if saves == target_save:
                break
    delay = rng.uniform(0.0, max_delay)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = _tmp_folders(folder)
    manager = CheckpointManager(folder, read_only=True)
    steps = manager.all_steps()
    latest = manager.latest_step()
    half_written = [int(n.split(".")[0]) for n in leftovers]
    record = {"resumed_from": int(first[1]), "killed_after_save_start": target_save, "delay_s": round(delay, 3),
              "latest": latest, "steps": steps, "tmp_folders_left": leftovers,
              "killed_mid_write": bool(leftovers)}
    problems = []
    if any(h in steps for h in half_written):
        problems.append(f"a half-written step is listed: {half_written} in {steps}")
    if previous is not None and (latest is None or latest < previous):
        problems.append(f"latest step went back from {previous} to {latest}")
    t0 = time.perf_counter()
    restored = manager.restore(ref.plan, latest)  # verifies the integrity manifest first
    record["restore_s"] = round(time.perf_counter() - t0, 3)
    got, want = jax.tree.leaves(jax.device_get(restored.state)), jax.tree.leaves(ref.at(latest))
    if len(got) != len(want) or not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want)):
        problems.append(f"step {latest} does not match the reference run")
    older_bad = []
    for s in steps[:-1]:
        try:
            manager.verify(s)
        except Exception as e:  # a half-deleted older step: reported, not a failure of the latest
            older_bad.append([s, type(e).__name__])
    record["older_steps_failing_verify"] = older_bad
    record["problems"] = problems
    manager.close()
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--max-delay", type=float, default=0.4, help="largest sleep after the chosen save starts (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", help="checkpoint folder (default: a new temporary one)")
    p.add_argument("--out", help="write the JSON summary here")
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    folder = args.folder or tempfile.mkdtemp(prefix="crash_during_save_")
    t0 = time.perf_counter()
    ref = Reference()
    rng, previous, trials = random.Random(args.seed), None, []
    for i in range(args.kills):
        record = trial(folder, rng, args.max_delay, ref, previous)
        previous = record["latest"]
        trials.append(record)
        print(json.dumps({"trial": i + 1, **{k: record[k] for k in ("resumed_from", "latest", "killed_mid_write",
                                                                     "restore_s", "problems")}}), flush=True)
    summary = {
        "command": "python scripts/crash_during_save.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "kills": len(trials),
        "killed_mid_write": sum(t["killed_mid_write"] for t in trials),
        "latest_restored_bit_identical": sum(not t["problems"] for t in trials),
        "half_written_step_listed": sum(any("half-written" in p for p in t["problems"]) for t in trials),
        "older_steps_failing_verify": sum(len(t["older_steps_failing_verify"]) for t in trials),
        "restore_s_max": max(t["restore_s"] for t in trials),
        "final_step": previous,
        "wall_s": round(time.perf_counter() - t0, 1),
        "trials": trials,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}))
    return 0 if summary["latest_restored_bit_identical"] == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
