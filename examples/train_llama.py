"""Train a small Llama with ZeRO on the bundled corpus, then export a Hugging Face folder.

    python examples/train_llama.py                              # ZeRO-3, 8 simulated devices on CPU
    python examples/train_llama.py --deepspeed my_ds_config.json
    python examples/train_llama.py --init-from HF_DIR --max-steps 0   # import, then export unchanged
    python examples/train_llama.py --resume                     # continue the run in --output-dir

The DeepSpeed config is the truth: a value it states (micro-batch, accumulation, learning rate, betas,
weight decay, clipping, precision, schedule length) is used as written; a flag fills what the config
leaves "auto" and overrides what it states only when given (each override is printed). Text is
tokenized by a byte-level BPE (examples/tokenizer, made by examples/make_tokenizer.py from the bundled
corpus). Without an accelerator, 8 CPU devices are simulated (XLA_FLAGS, set before JAX starts). At the
end the model and tokenizer are written to OUTPUT_DIR/hf; when PyTorch `transformers` is installed the
folder is loaded there by `pipeline("text-generation")` and asked to continue a prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# No GPU or TPU on this machine: use the CPU without probing the compilers `zerojax[aot]` installs.
if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/accel0")) and not list(Path("/dev").glob("vfio/[0-9]*")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.multihost_utils import process_allgather, sync_global_devices  # noqa: E402

from zerojax import distributed  # noqa: E402
from zerojax.args import TrainingArguments  # noqa: E402
from zerojax.config import ConfigError, load_config  # noqa: E402
from zerojax.config.auto import resolve_batch  # noqa: E402
from zerojax.config.loading import read_source  # noqa: E402
from zerojax.data import text_dataset  # noqa: E402
from zerojax.hf import load_pretrained, read_config  # noqa: E402
from zerojax.models import from_hf_config, generate  # noqa: E402
from zerojax.tokenizer import BPETokenizer  # noqa: E402
from zerojax.trainer import Trainer  # noqa: E402

# A Llama of 5.6M parameters over the 512-token BPE: 6 layers, hidden 256, grouped-query attention.
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 256,
    "intermediate_size": 896, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
}
TOKENIZER = HERE / "tokenizer"
PRECISIONS = ("bf16", "fp16", "fp32")
AUTO = "auto"

# Each training setting: (its flag or None, the example's value where the config leaves it "auto" or
# unset, the config keys that state it: the first one stated is used, and the others must agree).
SETTINGS = {
    "per_device_train_batch_size": ("--batch-size", 1, ("train_micro_batch_size_per_gpu",)),
    "gradient_accumulation_steps": ("--gradient-accumulation-steps", 1, ("gradient_accumulation_steps",)),
    "learning_rate": ("--learning-rate", 2e-3, ("optimizer.params.lr", "scheduler.params.warmup_max_lr")),
    "weight_decay": ("--weight-decay", 0.01, ("optimizer.params.weight_decay",)),
    "adam_betas": (None, [0.9, 0.999], ("optimizer.params.betas",)),
    "adam_epsilon": (None, 1e-8, ("optimizer.params.eps",)),
    "max_grad_norm": ("--max-grad-norm", 1.0, ("gradient_clipping",)),
    "max_steps": ("--max-steps", 200, ("scheduler.params.total_num_steps",)),
    "warmup_steps": (None, None, ("scheduler.params.warmup_num_steps",)),  # None: a tenth of max_steps
}
PRECISION = "bf16"  # the example's choice where the config leaves bf16.enabled "auto"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", default=str(HERE / "configs" / "zero3.json"), help="a DeepSpeed config file")
    p.add_argument("--init-from", help="a Hugging Face folder to start from (its config.json picks the model)")
    p.add_argument("--model-config", help="a Hugging Face config.json to train from scratch (default: the demo Llama)")
    p.add_argument("--tokenizer", help="a tokenizer.json or a folder with one (default: the --init-from folder's "
                   "when it has one, else examples/tokenizer)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--corpus", default=str(HERE / "data" / "corpus.txt"))
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help="optimizer steps (default: the config's scheduler total_num_steps, else 200; 0: import then "
                   "export)")
    p.add_argument("--batch-size", dest="per_device_train_batch_size", type=int,
                   help="sequences per device per micro-batch (default: the config's train_micro_batch_size_per_gpu, "
                   "else 1)")
    p.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int,
                   help="micro-batches per step (default: the config's, else 1)")
    p.add_argument("--learning-rate", dest="learning_rate", type=float,
                   help="peak learning rate (default: the config's optimizer lr, else 2e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float,
                   help="(default: the config's optimizer weight_decay, else 0.01)")
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float,
                   help="gradient clipping (default: the config's gradient_clipping, else 1.0)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f'bf16, fp16 or fp32 (default: what the config enables; {PRECISION} where it says "auto")')
    p.add_argument("--resume", action="store_true",
                   help="resume from the latest checkpoint in --output-dir (its hf/ export is then rewritten)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty --output-dir first")
    p.add_argument("--plot", action="store_true", help="write OUTPUT_DIR/loss.png (needs matplotlib)")
    p.add_argument("--device-memory", help='bytes per device a zero_optimization.stage "auto" must fit, e.g. 2GB '
                   "(default: the device's own limit; CPU devices report none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    distributed.initialize()
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    out_dir = Path(opts.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not opts.resume:
        if not opts.overwrite:
            print(f"train_llama: --output-dir {out_dir} is not empty; pass --resume to continue its run or "
                  "--overwrite to start afresh.", file=sys.stderr)
            return 2
        if jax.process_index() == 0:
            shutil.rmtree(out_dir)
        sync_global_devices("train_llama: output dir cleared")
    try:
        trainer, tokenizer, values, overrides = build(opts)
    except (ValueError, TypeError, OSError) as e:  # ConfigError, HFFormatError, a missing file: the user's to fix
        print(f"train_llama: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for line in describe(trainer, opts, values) + overrides:
        say(f"zerojax: {line}")
    initial = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=True if opts.resume else None) if values["max_steps"][0] else None
    final = trainer.evaluate()["eval_loss"]
    say(json.dumps({"initial_eval_loss": round(initial, 4), "final_eval_loss": round(final, 4),
                    "steps": int(trainer.state.step), "interrupted": bool(result and result.interrupted)}))
    if opts.plot and jax.process_index() == 0:
        say(f"zerojax: loss curve in {trainer.plot_loss(out_dir / 'loss.png')}")
    if result is not None and result.interrupted:
        return 0
    out = trainer.save_model(out_dir / "hf", dtype="fp32", overwrite=opts.resume)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(out, trainer.hf_config.get("max_position_embeddings"))
    say(f"zerojax: exported a Hugging Face folder (model and tokenizer) to {out}")
    prompt = "We hold these truths"
    params = process_allgather(trainer.state.params, tiled=True)  # whole on every process (small model)
    sample = generate(trainer.graphdef, params, tokenizer.encode(prompt)[None], 20)
    say(f"zerojax sample: {tokenizer.decode(sample[0])!r}")
    if jax.process_index() == 0:
        show_in_transformers(out, prompt)
    return 0


def build(opts: argparse.Namespace) -> tuple[Trainer, BPETokenizer, dict, list[str]]:
    """The Trainer the config and flags describe, its tokenizer, the settings (see `settings`) and the
    lines stating each flag that overrides the config."""
    hf_config = model_config(opts)
    tokenizer = BPETokenizer.load(opts.tokenizer or tokenizer_path(opts.init_from))
    if hf_config["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size={hf_config['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens; pass a --tokenizer of at most {hf_config['vocab_size']} "
                         "tokens or a model whose vocab_size is at least that.")
    config, values, overrides = settings(opts)
    world = jax.device_count()
    train, evaluation = text_dataset(opts.corpus, opts.seq_len + 1, stride=max(opts.seq_len // 4, 1), tokenizer=tokenizer)
    args = training_arguments(opts, config, values, len(train))
    load_config(config, args, hf_config, world_size=world)  # every problem of the config at once, before compiling
    if values["precision"][0] == "fp16" and jax.devices()[0].platform == "cpu":
        raise ValueError(f"precision fp16 (from {values['precision'][1]}) does not run on CPU devices (XLA:CPU has "
                         "no float16 matmul); run on a GPU, or pass --precision bf16 or fp32.")
    check_windows(len(train), len(evaluation), values, world, opts)
    with nnx.use_eager_sharding(False):
        model = from_hf_config(hf_config, seed=0)
    trainer = Trainer(model, args, train, evaluation, hf_config=hf_config, device_memory=opts.device_memory)
    if opts.init_from:
        params = load_pretrained(opts.init_from, trainer.plan.param_shardings, dtype="fp32")
        trainer.state = trainer.state._replace(params=params) if trainer.state.master is None else \
            trainer.state._replace(params=params, master=jax.tree.map(lambda x: x.astype(np.float32), params))
    return trainer, tokenizer, values, overrides


def model_config(opts: argparse.Namespace) -> dict:
    """The Hugging Face config of the model to train: --init-from's, --model-config, or the demo's."""
    if opts.init_from and opts.model_config:
        raise ValueError("--init-from and --model-config both choose the model; pass one of them.")
    if opts.init_from:
        return read_config(opts.init_from)
    if opts.model_config:
        config = json.loads(Path(opts.model_config).read_text())
        if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
            raise ValueError(f"--model-config {opts.model_config}: expected a Hugging Face config.json object "
                             "with an integer vocab_size.")
        return config
    return DEMO_CONFIG


def tokenizer_path(init_from: str | None) -> Path:
    """The --init-from folder when it holds a tokenizer.json, else the demo tokenizer."""
    return Path(init_from) if init_from and (Path(init_from) / "tokenizer.json").is_file() else TOKENIZER


def settings(opts: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    """(the config as it will run, {setting: (value, where it comes from)}, lines stating the overrides).

    A setting's value is its flag's when given, else what the config states, else the example's default;
    a given flag that differs from what the config states replaces it there."""
    raw, _ = read_source(opts.deepspeed)
    config, values, notes = copy.deepcopy(raw), {}, []
    for name, (flag, default, paths) in SETTINGS.items():
        stated = first_stated(raw, paths)
        given = getattr(opts, name, None) if flag else None
        if given is not None:
            values[name] = (given, flag)
            if stated is not None and stated[1] != given:
                notes.append(f"{flag} {given} overrides the config's {stated[0]}={json.dumps(stated[1])}")
                write(config, paths, given)
        elif stated is not None:
            values[name] = (stated[1], stated[0])
        else:
            values[name] = (default, f'example default, the config says "{AUTO}"' if any_auto(raw, paths) else "example default")
    value, source, override = precision(raw, opts.precision)
    values["precision"] = (value, source)
    if override:
        notes.append(override)
        write_precision(config, opts.precision)
    if values["warmup_steps"][0] is None:
        values["warmup_steps"] = (max(values["max_steps"][0] // 10, 1), "example default: a tenth of max_steps")
    values.update(batch_geometry(raw, values, jax.device_count()))
    return (config if notes else opts.deepspeed), values, notes


def batch_geometry(raw: dict, values: dict, world: int) -> dict:
    """Micro-batch and accumulation by DeepSpeed's rules when the config states train_batch_size: those
    that neither the config nor a flag sets follow from it."""
    train = raw.get("train_batch_size")
    if train in (None, AUTO):
        return {}
    names = ("per_device_train_batch_size", "gradient_accumulation_steps")
    known = [None if values[n][1].startswith("example") else values[n][0] for n in names]
    problems: list[str] = []
    resolved = resolve_batch(train, *known, world, problems)[1:]
    if problems:
        raise ConfigError(problems)
    source = f"train_batch_size={train} over {world} devices"
    return {n: (v, values[n][1] if k is not None else source) for n, v, k in zip(names, resolved, known)}


def lookup(raw: dict, path: str):
    """The value at a dotted config path (`bf16` also spelled `bfloat16`), None where absent."""
    node = raw
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, dict):
            return None
        node = node.get(key, node.get("bfloat16") if i == 0 and key == "bf16" else None)
    return node


def first_stated(raw: dict, paths: tuple[str, ...]) -> tuple[str, object] | None:
    """(path, value) of the first of `paths` the config states (present and not "auto"), else None."""
    for path in paths:
        value = lookup(raw, path)
        if value is not None and value != AUTO:
            return path, value
    return None


def any_auto(raw: dict, paths: tuple[str, ...]) -> bool:
    """Whether the config says "auto" at one of `paths`."""
    return any(lookup(raw, p) == AUTO for p in paths)


def precision(raw: dict, given: str | None) -> tuple[str, str, str | None]:
    """(precision, where it comes from, the line stating that `given` overrides the config, or None).

    A block the config enables decides; where bf16/fp16 `enabled` is "auto", the flag or the example's
    choice fills it (as TrainingArguments(bf16=...) does); a config that enables neither runs fp32."""
    enabled = {block: lookup(raw, f"{block}.enabled") for block in ("bf16", "fp16")}
    stated = [block for block, on in enabled.items() if on is True]
    auto = [block for block, on in enabled.items() if on == AUTO]
    if given is not None:
        written = f"{stated[0]}.enabled=true" if stated else "precision (it enables neither bf16 nor fp16)"
        return given, "--precision", None if given in (stated or [*auto, "fp32"]) else \
            f"--precision {given} overrides the config's {written}"
    if stated:
        return stated[0], f"{stated[0]}.enabled", None
    if PRECISION in auto:
        return PRECISION, f'example default, the config says "{AUTO}"', None
    note = ' (its "auto" fp16.enabled stays off, as TrainingArguments(bf16=True) leaves it)' if auto else ""
    return "fp32", "the config enables neither bf16 nor fp16" + note, None


def write(config: dict, paths: tuple[str, ...], value) -> None:
    """Sets `value` in `config` at every one of `paths` that the config states (not absent, not "auto")."""
    for path in paths:
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key, AUTO) != AUTO:
            node[key] = value


def write_precision(config: dict, value: str) -> None:
    """Enables the bf16 or fp16 block of `config` (creating it if absent) and disables the other."""
    for block in ("bf16", "fp16"):
        spelled = "bfloat16" if block == "bf16" and "bfloat16" in config else block
        config.setdefault(spelled, {})["enabled"] = value == block


def check_windows(n_train: int, n_eval: int, values: dict, world: int, opts: argparse.Namespace) -> None:
    """Refuses a corpus too small for one global batch, or for one evaluation sequence per device."""
    batch = values["per_device_train_batch_size"][0] * values["gradient_accumulation_steps"][0] * world
    where = f"--corpus {opts.corpus} at --seq-len {opts.seq_len}"
    if n_train < batch:
        raise ValueError(f"a global batch of {batch} sequences needs as many training windows, but {where} gives "
                         f"{n_train}; pass a larger --corpus or a shorter --seq-len, or a config with a smaller batch.")
    if n_eval < world:
        raise ValueError(f"evaluation needs one window per device ({world}), but {where} holds out {n_eval}; pass a "
                         "larger --corpus or a shorter --seq-len.")


def training_arguments(opts: argparse.Namespace, config, values: dict, n_train: int) -> TrainingArguments:
    """The Hugging Face TrainingArguments of the run (`n_train` training sequences): every "auto" of the
    config is filled from them."""
    value = {name: v for name, (v, _) in values.items()}
    steps = value["max_steps"]
    betas = value["adam_betas"]
    return TrainingArguments(
        output_dir=opts.output_dir, deepspeed=config, per_device_train_batch_size=value["per_device_train_batch_size"],
        per_device_eval_batch_size=value["per_device_train_batch_size"],
        gradient_accumulation_steps=value["gradient_accumulation_steps"], learning_rate=value["learning_rate"],
        weight_decay=value["weight_decay"], adam_beta1=betas[0], adam_beta2=betas[1],
        adam_epsilon=value["adam_epsilon"], max_grad_norm=value["max_grad_norm"], max_steps=steps,
        warmup_steps=value["warmup_steps"], bf16=value["precision"] == "bf16", fp16=value["precision"] == "fp16",
        logging_steps=10, eval_steps=max(steps // 4, 1), save_steps=max(steps // 2, 1), save_total_limit=2,
        train_dataset_size=n_train,
    )


def describe(trainer: Trainer, opts: argparse.Namespace, values: dict) -> list[str]:
    """Start-up lines: model and mesh, precision, stage and offload, batch geometry, every setting's source."""
    cfg, precision = trainer.config, trainer.plan.precision
    offload = {"optimizer": cfg.zero_optimization.offload_optimizer, "parameters": cfg.zero_optimization.offload_param}
    scale = "dynamic fp16 loss scaling" if precision.loss_scale is not None else "no loss scaling"
    return [
        f"{sum(x.size for x in jax.tree.leaves(trainer.state.params)):,} parameters on {trainer.plan.rules.data_size} "
        f"devices ({jax.devices()[0].platform}, {jax.process_count()} process(es))",
        f"precision {values['precision'][0]}: compute {precision.compute_dtype.name}, master weights and optimizer "
        f"state {precision.master_dtype.name}, {scale}",
        f"ZeRO stage {cfg.stage}; offload: " + ", ".join(
            f"{what} to {block.device}" + (" (pinned)" if block.pin_memory else "") if block.enabled else f"{what} none"
            for what, block in offload.items()),
        f"batch: {cfg.train_batch_size} sequences of {opts.seq_len} tokens a step = micro-batch "
        f"{cfg.train_micro_batch_size_per_gpu} x {cfg.gradient_accumulation_steps} accumulation steps x "
        f"{cfg.world_size} devices",
        "settings (source): " + ", ".join(f"{name} {json.dumps(v)} ({source})" for name, (v, source) in values.items()),
    ]


def show_in_transformers(folder: Path, prompt: str) -> None:
    """Loads the export with PyTorch transformers' text-generation pipeline, when installed, and continues
    `prompt` greedily."""
    try:
        from transformers import pipeline
    except ImportError:
        print("transformers is not installed: skipping the PyTorch check (pip install '.[test]').")
        return
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    text = generator(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    print(f"transformers sample: {text!r}")


if __name__ == "__main__":
    sys.exit(main())
