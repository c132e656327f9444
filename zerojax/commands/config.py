"""`zerojax config FILE`: a DeepSpeed config fully resolved, as JSON in DeepSpeed's own key layout.

Every "auto" is replaced (from `--args`, and the hidden size from `--hidden-size` or `--model-config`)
and every default is filled in. On a bad config the problems go to stderr, nothing to stdout, exit 2.

`--args ARGS.json`: a JSON object of `transformers.TrainingArguments` fields, as Transformers writes it
(`TrainingArguments(...).to_json_string()`), or a hand-written
subset such as {"per_device_train_batch_size": 4, "bf16": true, "max_steps": 1000}; omitted fields take
Transformers' defaults. Transformers 4 names are read too. Fields with no effect in zerojax are named in
one warning.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "config", help="print a DeepSpeed config fully resolved (JSON)", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="ds_config.json (JSON/hjson) or an Accelerate YAML with distributed_type: DEEPSPEED")
    p.add_argument("--args", dest="args_file", metavar="ARGS.json",
                   help="a JSON object of transformers.TrainingArguments fields, e.g. what "
                        "TrainingArguments(...).to_json_string() writes (see below)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel world size (default 1)")
    p.add_argument("--hidden-size", type=int, help="the model's hidden size, for the hidden-size \"auto\" values")
    p.add_argument("--model-config", metavar="CONFIG",
                   help="a Hugging Face config.json (or a folder holding one) giving the hidden size (hidden_size, "
                        "n_embd, d_model, text_config, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prints the resolved config; problems and warnings go to stderr (exit 2 on a problem)."""
    from zerojax.args import TrainingArguments
    from zerojax.config import ConfigError, load_config

    try:
        training_args = None
        if args.args_file:
            training_args = TrainingArguments.from_dict(_read_json_object(args.args_file))
        if args.hidden_size is not None and args.model_config:
            raise ValueError("--hidden-size and --model-config both give the hidden size; pass one of them.")
        model = {"hidden_size": args.hidden_size} if args.hidden_size is not None else None
        if args.model_config:
            path = Path(args.model_config)
            model = _read_json_object(str(path / "config.json" if path.is_dir() else path), "--model-config")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if training_args is not None:
                training_args.warn_no_effect()
            cfg = load_config(args.file, training_args, model, world_size=args.world_size)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"zerojax config: error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"zerojax config: warning: {w.message}", file=sys.stderr)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _read_json_object(path: str, flag: str = "--args") -> dict:
    """The JSON object in `path`, read with the config reader's bounds (size, depth, 64-bit integers)."""
    from zerojax._text import shown
    from zerojax.config.loading import MAX_JSON_BYTES, check_tree, int_of, read_text

    text = read_text(Path(path), MAX_JSON_BYTES)
    try:
        value = json.loads(text, parse_int=int_of)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{flag} {path!r} is not valid JSON: {shown(str(e))}; write a JSON object of "
                         f"{_WHAT[flag]}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {path!r} must hold a JSON object of {_WHAT[flag]}.")
    return check_tree(value, f"{flag} {path!r}")


_WHAT = {"--args": "TrainingArguments fields", "--model-config": "Hugging Face config fields"}
