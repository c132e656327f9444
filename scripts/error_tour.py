"""Every user-facing entry point x bad input -> the message the user sees; writes `docs/errors.md`.

    python scripts/error_tour.py [--out docs/errors.md]

Each case runs the real entry point (library call, or the `zerojax` CLI in-process with its stderr and
exit code captured) on a bad input and records the exception's type and message (or the CLI's stderr).
A row is flagged `REVIEW` when the message spans more than a few lines, carries a traceback, looks like
a raw error from inside jax/XLA/tensorstore/python, or says nothing about what to do. The full-disk and
read-only cases need a small tmpfs (`mount -t tmpfs`, root); without it they are reported as skipped.
`tests/test_faults.py` runs selected cases and asserts their key words.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RAW_MARKERS = ("Traceback", "jaxlib", "XlaRuntimeError", "tensorstore", "pybind11", "File \"", "INTERNAL:",
               "FAILED_PRECONDITION", "DATA_LOSS", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "[Errno",
               # messages raised from inside jax/numpy/python for a user's mistake, not written for it
               "Indexer must have", "indices must have an integer type", "object has no attribute")
# A message written for the user says what to do: it has one of these words (else: REVIEW).
FIX_WORDS = re.compile(r"\b(use|pass|set|choose|check|fix|make|point|free|restore|build|expected|expects|must|put|"
                       r"write|enable|quote|save|start|needs?|ignored|agree|disagree|required)\b|"
                       r"argument \S+: invalid (int|float) value|invalid choice", re.I)
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str  # the entry point, as a user calls it
    bad_input: str  # what is wrong
    run: Callable[[str], None]  # raises (library) or returns (exit code, stderr) for a CLI; gets a scratch folder
    needs_tmpfs: bool = False
    note: str = ""  # why a REVIEW row is as it is, and the proposed fix


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: Case
    message: str
    ok: bool  # one clear message, no raw internals


class _ThisThread(io.StringIO):
    """Captures what the calling thread writes; other threads' writes (background orbax threads of earlier
    cases failing late) go on to `fallback`, as they would never reach a fresh `zerojax` process."""

    def __init__(self, fallback):
        super().__init__()
        self._thread, self._fallback = threading.get_ident(), fallback

    def write(self, text: str) -> int:
        return super().write(text) if threading.get_ident() == self._thread else self._fallback.write(text)


def cli(*argv: str) -> tuple[int, str]:
    """`zerojax ARGV` in this process: (exit code, stderr)."""
    from zerojax.cli import main

    err, out = _ThisThread(sys.stderr), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse errors
            code = e.code
        except Exception as e:  # escaped the command: the user would see a traceback
            return 1, f"Traceback (most recent call last): ... {type(e).__name__}: {e}"
    text = err.getvalue().strip()
    if text.startswith("usage:"):  # argparse: the usage, then one `error:` line; the error is the message
        text = text.splitlines()[-1]
    return code, text


# --- fixtures -------------------------------------------------------------------------------------
def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _plan(devices=None, stage=3, params=None, offload=None):
    import jax
    import optax

    import zerojax as zj
    from tests import tiny_transformer as T

    params = params if params is not None else T.init_params()
    mesh = zj.make_mesh(devices=devices or jax.devices())
    return zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(mesh, stage=stage), offload=offload)


def _checkpoint(folder: str, steps=(1, 2)) -> str:
    """A checkpoint folder of the tiny transformer (stage 3) with `steps` and the tiny Llama hf_config."""
    import zerojax as zj
    from tests import tiny_transformer as T
    from zerojax.checkpoint import CheckpointManager

    plan = _plan()
    state = zj.init_state(T.init_params(), plan)
    with CheckpointManager(folder) as manager:
        for s in steps:
            manager.save(state._replace(step=state.step * 0 + s))
        manager.wait()
    return folder


def _llama_checkpoint(folder: str) -> str:
    """A checkpoint of the tiny Llama with its hf_config (what `zerojax export` reads)."""
    import optax
    from flax import nnx

    import zerojax as zj
    from zerojax.checkpoint import CheckpointManager
    from zerojax.models import from_hf_config

    with nnx.use_eager_sharding(False):
        model = from_hf_config(TINY, seed=0)
    _, params = nnx.split(model, nnx.Param)
    plan = zj.make_plan(params, optax.sgd(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))
    with CheckpointManager(folder) as manager:
        manager.save(zj.init_state(params, plan), hf_config=TINY)
    return folder


def _flip_largest(folder: str, step: int) -> None:
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(folder, str(step))) for n in ns
             if n not in ("integrity.json", "_CHECKPOINT_METADATA")]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(data)


def _truncate(folder: str, step: int, name: str) -> None:
    path = os.path.join(folder, str(step), name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@contextlib.contextmanager
def tmpfs(size: str, readonly: bool = False):
    """A fresh tmpfs of `size` (read-only when asked) mounted on a temporary folder; needs root."""
    point = tempfile.mkdtemp(prefix="zerojax_tmpfs_")
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", point], capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(point)
        raise unittest_skip(f"cannot mount a tmpfs ({done.stderr.strip()}); run as root")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", point], capture_output=True)
        # orbax's background thread can still write after a failed save; with the tmpfs detached those
        # files land in the mount point's own folder, so remove it whole, never failing the case here
        shutil.rmtree(point, ignore_errors=True)


class unittest_skip(Exception):  # noqa: N801 - a marker, raised when a case cannot run here
    pass


def tmpfs_available() -> bool:
    try:
        with tmpfs("64k"):
            return True
    except unittest_skip:
        return False


# --- the cases ------------------------------------------------------------------------------------
def _config_cases() -> list[Case]:
    from zerojax.args import TrainingArguments
    from zerojax.config import load_config

    def bad_json(d):
        load_config(_write(f"{d}/ds.json", '{"zero_optimization": {"stage": 3,}'))

    def indivisible(d):
        load_config({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
                    world_size=4)

    def stage_auto(**zero):
        return load_config({"train_batch_size": 8, "zero_optimization": {"stage": "auto", **zero}}, world_size=8)

    return [
        Case("load_config", "missing file", lambda d: load_config(f"{d}/nope.json")),
        Case("load_config", "malformed JSON", bad_json),
        Case("load_config", "wrong type (stage 'three')", lambda d: load_config({"train_batch_size": 8, "zero_optimization": {"stage": "three"}})),
        Case("load_config", "wrong dtype (fp16 and bf16 both enabled)",
             lambda d: load_config({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}})),
        Case("load_config", "indivisible batch (10 = 4 x 1 x 4?)", indivisible),
        Case("load_config", "unknown key (typo)", lambda d: load_config({"train_batch_size": 8, "zero_optimisation": {"stage": 3}})),
        Case("load_config", "auto without TrainingArguments",
             lambda d: load_config({"train_micro_batch_size_per_gpu": "auto"}, world_size=1)),
        Case("load_config", "training_args of the wrong type", lambda d: load_config({}, training_args={"lr": 1})),
        Case("ZeroConfig.zero_rules", 'stage "auto" not yet resolved', lambda d: stage_auto().zero_rules(None)),
        Case("ZeroConfig.with_stage", "a stage the config rules out (hpZ at stage 1)",
             lambda d: stage_auto(zero_hpz_partition_size=2).with_stage(1)),
        Case("TrainingArguments.from_dict", "wrong type (learning_rate 'fast')",
             lambda d: TrainingArguments.from_dict({"learning_rate": "fast"})),
        Case("zerojax config", "missing file", lambda d: cli("config", f"{d}/nope.json")),
        Case("zerojax config", "malformed JSON", lambda d: cli("config", _write(f"{d}/bad.json", "{"))),
        Case("zerojax config", "--args is not a JSON object",
             lambda d: cli("config", _write(f"{d}/ok.json", "{}"), "--args", _write(f"{d}/a.json", "[1]"))),
        Case("zerojax config", "--world-size not a number", lambda d: cli("config", "x.json", "--world-size", "two")),
        # issue 17: config input
        Case("load_config", "Accelerate YAML with nested aliases (billion laughs)", lambda d: load_config(_write(
            f"{d}/bomb.yaml", "distributed_type: DEEPSPEED\na: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
                f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
            + "deepspeed_config:\n  zero_stage: *i\n"))),
        Case("load_config", "2,000 unknown zero_optimization keys",
             lambda d: load_config({"train_batch_size": 8, "zero_optimization": {f"k{i}": 1 for i in range(2000)}})),
        Case("load_config", "100,000 values", lambda d: load_config({"train_batch_size": 8, "wandb": [0] * 100_000})),
        Case("load_config", "config file over 256 KiB", lambda d: load_config(_write(f"{d}/big.json", " " * 300_000))),
        Case("load_config", "integer of 400 digits", lambda d: load_config({"train_batch_size": 8, "gradient_clipping": 10**400})),
        Case("load_config", "integer of 4301 digits (JSON)",
             lambda d: load_config(_write(f"{d}/ds.json", '{"steps_per_print": ' + "9" * 4301 + "}"))),
        Case("load_config", "nesting 600 deep", lambda d: load_config(_write(
            f"{d}/ds.json", '{"train_batch_size": 8, "wandb": ' + "[" * 600 + "]" * 600 + "}"))),
        Case("load_config", "YAML with mixed key types", lambda d: load_config(_write(
            f"{d}/acc.yaml", "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  1: a\n  b: c\n"))),
        Case("load_config", "Accelerate YAML that names itself as deepspeed_config_file", lambda d: load_config(_write(
            f"{d}/acc.yaml", "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: acc.yaml\n"))),
        Case("load_config", "deprecated key with a bad value (bfloat16: 1)",
             lambda d: load_config({"train_batch_size": 8, "bfloat16": 1})),
    ]


def _checkpoint_cases() -> list[Case]:
    import zerojax as zj
    from tests import tiny_transformer as T
    from zerojax.checkpoint import CheckpointManager, CheckpointOptions

    def flipped(d):
        _flip_largest(_checkpoint(f"{d}/ck"), 2)
        CheckpointManager(f"{d}/ck", read_only=True).restore(_plan())

    def truncated(d):
        _truncate(_checkpoint(f"{d}/ck"), 2, "state/_METADATA")
        CheckpointManager(f"{d}/ck", read_only=True).restore(_plan())

    def all_corrupt(d):
        _checkpoint(f"{d}/ck", steps=(1,))
        _flip_largest(f"{d}/ck", 1)
        CheckpointManager(f"{d}/ck", read_only=True).restore_latest_good(_plan())

    def other_model(d):
        _checkpoint(f"{d}/ck", steps=(1,))
        import optax
        params = {"w": __import__("numpy").ones((16, 8), "float32")}
        plan = zj.make_plan(params, optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))
        CheckpointManager(f"{d}/ck", read_only=True).restore(plan)

    def unwritable(d):
        with tmpfs("1M", readonly=True) as ro:
            plan = _plan()
            with CheckpointManager(f"{ro}/ck") as manager:
                manager.save(zj.init_state(T.init_params(), plan))

    def full_disk(d):
        with tmpfs("64k") as small:
            plan = _plan()
            with CheckpointManager(f"{small}/ck") as manager:
                manager.save(zj.init_state(T.init_params(), plan))
                manager.wait()

    def restore_wrong_target(d):
        _checkpoint(f"{d}/ck", steps=(1,))
        CheckpointManager(f"{d}/ck", read_only=True).restore({"w": 1})

    return [
        Case("CheckpointManager(read_only=True)", "missing folder", lambda d: CheckpointManager(f"{d}/nope", read_only=True)),
        Case("CheckpointManager.restore", "step not saved",
             lambda d: CheckpointManager(_checkpoint(f"{d}/ck", steps=(1,)), read_only=True).restore(_plan(), 7)),
        Case("CheckpointManager.restore", "byte flipped in array data", flipped),
        Case("CheckpointManager.restore", "truncated file", truncated),
        Case("CheckpointManager.restore_latest_good", "every step corrupt", all_corrupt),
        Case("CheckpointManager.restore", "wrong shape (another model)", other_model),
        Case("CheckpointManager.restore", "wrong type (target a dict)", restore_wrong_target),
        Case("CheckpointOptions", "wrong type (save_total_limit 0)", lambda d: CheckpointOptions(save_total_limit=0)),
        Case("CheckpointManager.save", "unwritable output folder (read-only fs)", unwritable, needs_tmpfs=True),
        Case("CheckpointManager.save", "full disk (64 KiB tmpfs)", full_disk, needs_tmpfs=True),
    ]


def _export_cases() -> list[Case]:
    def exists(d):
        ck = _llama_checkpoint(f"{d}/ck")
        _write(f"{d}/out/keep.txt", "user data")
        return cli("export", ck, f"{d}/out", "--no-progress")

    def corrupt(d):
        ck = _llama_checkpoint(f"{d}/ck")
        _flip_largest(ck, 0)
        return cli("export", ck, f"{d}/out", "--no-progress")

    def no_hf_config(d):
        return cli("export", _checkpoint(f"{d}/ck", steps=(1,)), f"{d}/out", "--no-progress")

    def full_disk(d):
        ck = _llama_checkpoint(f"{d}/ck")
        with tmpfs("64k") as small:
            return cli("export", ck, f"{small}/out", "--no-progress")

    def unwritable(d):
        ck = _llama_checkpoint(f"{d}/ck")
        with tmpfs("64k", readonly=True) as ro:
            return cli("export", ck, f"{ro}/out", "--no-progress")

    return [
        Case("zerojax export", "missing checkpoint folder", lambda d: cli("export", f"{d}/nope", f"{d}/out")),
        Case("zerojax export", "step not saved", lambda d: cli("export", _llama_checkpoint(f"{d}/ck"), f"{d}/out",
                                                               "--step", "9", "--no-progress")),
        Case("zerojax export", "wrong dtype (--dtype fp8)", lambda d: cli("export", "ck", "out", "--dtype", "fp8")),
        Case("zerojax export", "bad --max-shard-size", lambda d: cli("export", _llama_checkpoint(f"{d}/ck"), f"{d}/out",
                                                                     "--max-shard-size", "big", "--no-progress")),
        Case("zerojax export", "output folder not empty", exists),
        Case("zerojax export", "corrupt checkpoint", corrupt),
        Case("zerojax export", "checkpoint without hf_config", no_hf_config),
        Case("zerojax export", "unwritable output folder (read-only fs)", unwritable, needs_tmpfs=True),
        Case("zerojax export", "full disk (64 KiB tmpfs)", full_disk, needs_tmpfs=True),
    ]


# issue 17: checkpoints and export
def _issue17_checkpoint_cases() -> list[Case]:
    import json

    from flax import nnx

    from zerojax.args import TrainingArguments
    from zerojax.checkpoint import CheckpointManager, CheckpointOptions
    from zerojax.models import from_hf_config
    from zerojax.trainer import Trainer

    def onto_run_folder(d):
        _llama_checkpoint(f"{d}/run/checkpoints")
        return cli("export", f"{d}/run/checkpoints", f"{d}/run", "--overwrite", "--no-progress")

    def into_checkpoint(d):
        return cli("export", _llama_checkpoint(f"{d}/ck"), f"{d}/ck/5", "--no-progress")

    def onto_file(d):
        return cli("export", _llama_checkpoint(f"{d}/ck"), _write(f"{d}/out", "a file"), "--no-progress")

    def second_writer(d):
        with CheckpointManager(f"{d}/ck"):
            CheckpointManager(f"{d}/ck")

    def manifest_deleted(d):
        _flip_largest(_checkpoint(f"{d}/ck"), 2)
        os.remove(f"{d}/ck/2/integrity.json")
        CheckpointManager(f"{d}/ck", read_only=True).restore(_plan())

    def manifest_entry_type(d):
        path = f"{_checkpoint(f'{d}/ck')}/2/integrity.json"
        with open(path) as f:
            manifest = json.load(f)
        _write(path, json.dumps(dict(manifest, files=dict(manifest["files"], **{"meta/metadata": 5}))))
        CheckpointManager(f"{d}/ck", read_only=True).restore(_plan())

    def empty_step_folder(d):
        os.makedirs(f"{_checkpoint(f'{d}/ck')}/7")
        CheckpointManager(f"{d}/ck", read_only=True).restore(_plan())

    def metrics_changed(d):
        import zerojax as zj
        from tests import tiny_transformer as T

        plan = _plan()
        state = zj.init_state(T.init_params(), plan)
        with CheckpointManager(f"{d}/ck", CheckpointOptions(metric_for_best_model="loss")) as manager:
            for step, loss in ((1, 3.0), (2, 1.0)):
                manager.save(state._replace(step=state.step * 0 + step), metrics={"loss": loss})
        _write(f"{d}/ck/1/metrics/metrics", '{"loss": 0.0}')
        CheckpointManager(f"{d}/ck", read_only=True).resolve_step("best")

    def read_only_resume(d):
        with nnx.use_eager_sharding(False):
            model = from_hf_config(TINY, seed=0)
        data = __import__("numpy").zeros((64, 17), "int32")
        with tmpfs("1M") as folder:
            args = TrainingArguments(output_dir=folder, per_device_train_batch_size=1, max_steps=2)
            trainer = Trainer(model, args, data, hf_config=TINY)
            with CheckpointManager(f"{folder}/checkpoints") as manager:
                manager.save(trainer.state, hf_config=TINY)
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
            trainer.train(resume_from_checkpoint=True)

    return [
        Case("zerojax export", "--overwrite onto the run folder holding the checkpoints", onto_run_folder),
        Case("zerojax export", "output folder inside the checkpoint folder (CKPT/5)", into_checkpoint),
        Case("zerojax export", "output path is a file", onto_file),
        Case("CheckpointManager", "second writer of one folder", second_writer),
        Case("CheckpointManager.restore", "integrity.json deleted (a byte flipped)", manifest_deleted),
        Case("CheckpointManager.restore", "integrity.json entry of the wrong type", manifest_entry_type),
        Case("CheckpointManager.restore", "empty numbered folder in the checkpoint folder", empty_step_folder),
        Case("CheckpointManager.resolve_step", "'best' with one step's metrics changed", metrics_changed),
        Case("Trainer.train", "resume with a read-only output folder", read_only_resume, needs_tmpfs=True),
    ]


def _launch_cases() -> list[Case]:
    return [
        Case("zerojax launch", "--nproc missing", lambda d: cli("launch", "--", "true")),
        Case("zerojax launch", "wrong type (--nproc two)", lambda d: cli("launch", "--nproc", "two", "--", "true")),
        Case("zerojax launch", "--nproc 0", lambda d: cli("launch", "--nproc", "0", "--", "true")),
        Case("zerojax launch", "no command", lambda d: cli("launch", "--nproc", "2")),
        Case("zerojax launch", "missing program", lambda d: cli("launch", "--nproc", "1", "--", f"{d}/no-such-program")),
    ]


def _hf_cases() -> list[Case]:
    from flax import nnx

    from zerojax.hf import export_hf, load_pretrained
    from zerojax.models import from_hf_config

    def params():
        with nnx.use_eager_sharding(False):
            return nnx.split(from_hf_config(TINY, seed=0), nnx.Param)[1]

    def plan_for(config):
        import optax

        import zerojax as zj
        with nnx.use_eager_sharding(False):
            p = nnx.split(from_hf_config(config, seed=0), nnx.Param)[1]
        return zj.make_plan(p, optax.sgd(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))

    def wrong_shape(d):
        export_hf(params(), TINY, f"{d}/hf", progress=False)
        load_pretrained(f"{d}/hf", plan_for(dict(TINY, intermediate_size=96)))

    def config_mismatch(d):
        export_hf(params(), dict(TINY, hidden_size=64), f"{d}/hf", progress=False)

    def exists(d):
        _write(f"{d}/hf/keep.txt", "user data")
        export_hf(params(), TINY, f"{d}/hf", progress=False)

    def full_disk(d):
        with tmpfs("64k") as small:
            export_hf(params(), TINY, f"{small}/hf", progress=False)

    def missing_tensor(d):
        export_hf(params(), TINY, f"{d}/hf", progress=False)
        os.remove(f"{d}/hf/model.safetensors")
        load_pretrained(f"{d}/hf", plan_for(TINY))

    def wrong_dtype(d):
        export_hf(params(), TINY, f"{d}/hf", progress=False)
        load_pretrained(f"{d}/hf", plan_for(TINY), dtype="int8")

    def pickle_only(d):
        _write(f"{d}/hf/config.json", json.dumps(TINY))
        open(f"{d}/hf/pytorch_model.bin", "wb").write(b"\x80\x04not loaded")
        load_pretrained(f"{d}/hf", plan_for(TINY))

    return [
        Case("load_pretrained", "missing folder", lambda d: load_pretrained(f"{d}/nope", plan_for(TINY))),
        Case("load_pretrained", "wrong shape (config disagrees with tensors)", wrong_shape),
        Case("load_pretrained", "missing safetensors file", missing_tensor),
        Case("load_pretrained", "wrong dtype ('int8')", wrong_dtype),
        Case("load_pretrained", "only a pickle checkpoint (pytorch_model.bin)", pickle_only),
        Case("export_hf", "wrong shape (hf_config of another size)", config_mismatch),
        Case("export_hf", "wrong dtype ('fp8')", lambda d: export_hf(params(), TINY, f"{d}/hf", dtype="fp8")),
        Case("export_hf", "output folder not empty", exists),
        Case("export_hf", "full disk (64 KiB tmpfs)", full_disk, needs_tmpfs=True),
    ]


def _core_cases() -> list[Case]:
    import jax
    import numpy as np
    import optax

    import zerojax as zj
    from tests import tiny_transformer as T

    def step_with(batch_fn):
        def run(d):
            plan = _plan()
            step = zj.make_train_step(T.loss_fn, plan)
            state = zj.init_state(T.init_params(), plan)
            step(state, batch_fn())
        return run

    def offload_beyond_ram(d):
        from zerojax import offload

        plan = zj.make_plan(T.init_params(), optax.adamw(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3),
                            offload=zj.Offload("pinned_host"))
        real, offload.machine_memory = offload.machine_memory, lambda: (64 * 1024, 64 * 1024)  # a 64 KiB machine
        try:
            zj.init_state(T.init_params(), plan)
        finally:
            offload.machine_memory = real

    tokens = lambda b: T.batches(1, b)[0]
    return [
        Case("make_mesh", "more devices than exist", lambda d: zj.make_mesh(fsdp=16)),
        Case("ZeroRules", "wrong stage (4)", lambda d: zj.ZeroRules(zj.make_mesh(), stage=4)),
        Case("Precision", "wrong dtype ('fp8')", lambda d: zj.Precision(compute_dtype="fp8")),
        Case("make_plan", "wrong type (params a string)",
             lambda d: zj.make_plan("weights", optax.sgd(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))),
        Case("init_state", "wrong shape (params of another model)",
             lambda d: zj.init_state(dict(T.init_params(), head=np.zeros((8, 8), np.float32)), _plan())),
        Case("init_state", "pinned offload larger than the machine's RAM", offload_beyond_ram),
        Case("train step", "indivisible batch (12 on 8 devices)", step_with(lambda: tokens(12))),
        Case("train step", "wrong dtype (float tokens)",
             step_with(lambda: {"tokens": tokens(16)["tokens"].astype(np.float32)}),
             note="raised by the user's loss_fn (tests/tiny_transformer.py) while tracing; the step cannot know "
                  "the dtypes a loss expects. The Trainer's data path should check (see the Trainer row)."),
        Case("train step", "wrong shape (missing batch key)", step_with(lambda: {"ids": tokens(16)["tokens"]}),
             note="raised by the user's loss_fn, with the user's own line in the traceback."),
        Case("make_train_step", "micro_batches 0", lambda d: zj.make_train_step(T.loss_fn, _plan(), micro_batches=0)),
        Case("make_train_step", "state_layout 'tiled'", lambda d: zj.make_train_step(T.loss_fn, _plan(), state_layout="tiled")),
        Case("make_train_step", "compiler layouts with offloaded state",
             lambda d: zj.make_train_step(T.loss_fn, _plan(offload=zj.Offload("pinned_host")), state_layout="compiler")),
    ] if jax.device_count() >= 8 else []


def _trainer_cases() -> list[Case]:
    from flax import nnx

    from zerojax.args import TrainingArguments
    from zerojax.trainer import Trainer
    from zerojax.models import from_hf_config

    data = __import__("numpy").random.default_rng(0).integers(0, 256, size=(64, 17)).astype("int32")

    def make(d, config=None, **kw):
        with nnx.use_eager_sharding(False):
            model = from_hf_config(TINY, seed=0)
        kw = {"output_dir": f"{d}/run", "per_device_train_batch_size": 1, "max_steps": 2, **kw}
        return Trainer(model, TrainingArguments(deepspeed=copy.deepcopy(config), **kw), data, hf_config=TINY)

    def float_dataset(d):
        with nnx.use_eager_sharding(False):
            model = from_hf_config(TINY, seed=0)
        Trainer(model, TrainingArguments(max_steps=1, per_device_train_batch_size=1), data.astype("float32"),
                hf_config=TINY).train()

    def cpu_checkpointing_with_another_policy(d):
        with nnx.use_eager_sharding(False):
            model = from_hf_config(TINY, seed=0, remat="dots_saveable")
        Trainer(model, TrainingArguments(deepspeed={"activation_checkpointing": {"cpu_checkpointing": True}},
                                         max_steps=1, per_device_train_batch_size=1), data, hf_config=TINY)

    def resume_missing(d):
        make(d).train(resume_from_checkpoint=True)

    def resume_corrupt(d):
        t = make(d, save_steps=1)
        t.train()
        _flip_largest(f"{d}/run/checkpoints", 2)
        make(d, max_steps=3).train(resume_from_checkpoint=True)

    def unwritable(d):
        with tmpfs("64k", readonly=True) as ro:
            make(d, output_dir=f"{ro}/run").train()

    def full_disk(d):
        with tmpfs("256k") as small:
            make(d, output_dir=f"{small}/run", save_steps=1).train()

    return [
        Case("Trainer", "missing DeepSpeed config file", lambda d: make(d, config=f"{d}/nope.json")),
        Case("Trainer", "indivisible batch (train_batch_size 10 on 8 devices)",
             lambda d: make(d, config={"train_batch_size": 10, "zero_optimization": {"stage": 3}})),
        Case("Trainer", "wrong type (stage 'three')", lambda d: make(d, config={"zero_optimization": {"stage": "three"}})),
        Case("Trainer", 'stage "auto" on CPU devices without device_memory',
             lambda d: make(d, config={"zero_optimization": {"stage": "auto"}, "train_micro_batch_size_per_gpu": 1})),
        Case("Trainer", "wrong dtype (dataset of floats)", float_dataset),
        Case("Trainer", "cpu_checkpointing with a model built with another remat policy",
             cpu_checkpointing_with_another_policy),
        Case("Trainer.train", "resume with no checkpoint", resume_missing),
        Case("Trainer.train", "resume from a corrupt checkpoint", resume_corrupt),
        Case("Trainer.train", "unwritable output folder (read-only fs)", unwritable, needs_tmpfs=True),
        Case("Trainer.train", "full disk (256 KiB tmpfs)", full_disk, needs_tmpfs=True),
    ]


# issue 17: launch, estimate, HF import
def _issue17_launch_estimate_hf_cases() -> list[Case]:
    import socket
    import struct

    import optax
    from flax import nnx

    import zerojax as zj
    import zerojax.distributed as zd
    from zerojax.hf import export_hf, load_pretrained
    from zerojax.models import abstract_model, from_hf_config

    def busy_port(d):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            return cli("launch", "--nproc", "2", "--coordinator", f"127.0.0.1:{s.getsockname()[1]}", "--", "true")

    def unreachable(d):
        zd.initialize({zd.COORDINATOR: "[100::1]:29500", zd.NUM_PROCESSES: "2", zd.PROCESS_ID: "1"}, timeout_s=2)

    def negative_hidden(d):
        return cli("estimate", "--model", _write(f"{d}/config.json", json.dumps(dict(TINY, hidden_size=-32))),
                   "--devices", "8")

    def plan():
        return zj.make_plan(abstract_model(TINY)[1], optax.sgd(1e-3), zj.ZeroRules(zj.make_mesh(), stage=3))

    def index_entry(d):
        _write(f"{d}/hf/config.json", json.dumps(TINY))
        _write(f"{d}/hf/model.safetensors.index.json", json.dumps({"weight_map": {"model.norm.weight": 5}}))
        load_pretrained(f"{d}/hf", plan())

    def integer_header(d):
        with nnx.use_eager_sharding(False):
            export_hf(nnx.split(from_hf_config(TINY, seed=0), nnx.Param)[1], TINY, f"{d}/hf", progress=False)
        path = f"{d}/hf/model.safetensors"
        raw = open(path, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8 : 8 + n].replace(b'"model.norm.weight":{"dtype":"F32"', b'"model.norm.weight":{"dtype":"I32"')
        open(path, "wb").write(raw[:8] + header + raw[8 + n :])
        load_pretrained(f"{d}/hf", plan())

    return [
        Case("zerojax launch", "--coordinator host that does not resolve",
             lambda d: cli("launch", "--nproc", "2", "--coordinator", "no-such-host.invalid:29500", "--", "true")),
        Case("zerojax launch", "--coordinator port in use", busy_port),
        Case("zerojax.distributed.initialize", "coordinator unreachable from process 1", unreachable),
        Case("zerojax estimate", "--devices 100000 (simulated CPU devices)",
             lambda d: cli("estimate", "--model", "gpt2", "--devices", "100000")),
        Case("zerojax estimate", "negative hidden_size in config.json", negative_hidden),
        Case("load_pretrained", "config.json holds a JSON list",
             lambda d: load_pretrained(os.path.dirname(_write(f"{d}/hf/config.json", "[]")), None)),
        Case("load_pretrained", "index weight_map entry not a file name", index_entry),
        Case("load_pretrained", "float tensor declared I32 in its safetensors header", integer_header),
    ]


def cases() -> list[Case]:
    return (_config_cases() + _checkpoint_cases() + _export_cases() + _launch_cases() + _hf_cases()
            + _core_cases() + _trainer_cases() + _issue17_launch_estimate_hf_cases() + _issue17_checkpoint_cases())


def outcome(case: Case) -> Outcome:
    """Runs one case in a fresh scratch folder and judges its message."""
    folder = tempfile.mkdtemp(prefix="zerojax_tour_")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = case.run(folder)
        if isinstance(result, tuple):  # a CLI: (exit code, stderr)
            code, err = result
            message = f"exit {code}: {err}" if err else f"exit {code} (no message)"
            ok = code not in (0, None)
        elif caught:  # accepted with a warning (DeepSpeed's behaviour for some mistakes)
            message, ok = f"{caught[0].category.__name__} (no error): {caught[0].message}", True
        else:
            message, ok = "no error raised", False
    except unittest_skip as e:
        return Outcome(case, f"skipped: {e}", True)
    except Exception as e:  # the message the user sees
        message, ok = f"{type(e).__name__}: {e}", True
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    message = re.sub(r"/tmp/zerojax_tmpfs_\w+", "<tmpfs>", message.replace(folder, "<tmp>"))
    message = re.sub(r"/d/[0-9a-f]{32}", "/d/<hash>", re.sub(r"\.partial-[0-9a-f]{8}", ".partial-<id>", message))
    message = re.sub(r"\bpid \d+", "pid <pid>", re.sub(r"(127\.0\.0\.1:|\bport )\d+", r"\1<port>", message))
    lines = [line for line in message.splitlines() if line.strip()]
    if ok and (len(lines) > 3 or len(message) > 700 or any(m in message for m in RAW_MARKERS)
               or not FIX_WORDS.search(message)):
        ok = False
    return Outcome(case, message, ok)


def table(outcomes: list[Outcome]) -> str:
    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text[:600] + " ...") if len(text) > 600 else text.replace("|", "\\|")

    rows = ["| Entry point | Bad input | Message shown | | Note |", "|---|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| `{o.case.entry}` | {o.case.bad_input} | {cell(o.message)} | {'ok' if o.ok else 'REVIEW'} "
                    f"| {cell(o.case.note)} |")
    return "\n".join(rows)


HEADER = """# Errors: what each mistake looks like

Produced by `python scripts/error_tour.py` (do not edit by hand): every user-facing entry point is run on
each bad input and the message a user sees is recorded verbatim (library calls: the exception's type and
message; `zerojax` commands: exit status and stderr). `ok` means one clear message that names the input
and the fix, with no traceback or raw error from inside jax, XLA or tensorstore; `REVIEW` marks the ones
that still fall short. Full-disk and read-only cases run on a small tmpfs (needs root to mount).

Checkpoint integrity: orbax/tensorstore detect damage to their index (CRC-32C on OCDBT b-tree nodes) and
JSON files, but not to array data, so zerojax writes `integrity.json` (size and SHA-256 of every file) into
each step before it is committed and verifies it before a restore; see `zerojax/checkpoint/integrity.py` and
`benchmarks/results/faults.md`.

"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "errors.md"))
    p.add_argument("--only", help="run only cases whose entry point contains this text")
    args = p.parse_args(argv)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    selected = [c for c in cases() if not args.only or args.only in c.entry]
    outcomes = []
    for c in selected:
        o = outcome(c)
        outcomes.append(o)
        print(f"{'ok    ' if o.ok else 'REVIEW'} {c.entry} | {c.bad_input} | {' '.join(o.message.split())[:300]}",
              flush=True)
    if not args.only:
        with open(args.out, "w") as f:
            f.write(HEADER + table(outcomes) + "\n")
    bad = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes)} cases, {bad} to review")
    return 0


if __name__ == "__main__":
    sys.exit(main())
