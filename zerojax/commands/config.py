"""`zerojax config FILE`: a DeepSpeed config fully resolved, as JSON in DeepSpeed's own key layout.

Every "auto" is replaced (from `--args`, a JSON object of TrainingArguments fields, and `--hidden-size`)
and every default is filled in. On a bad config the problems go to stderr, nothing to stdout, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "config", help="print a DeepSpeed config fully resolved (JSON)", description=__doc__.splitlines()[0]
    )
    p.add_argument("file", help="ds_config.json (JSON/hjson) or an Accelerate YAML with distributed_type: DEEPSPEED")
    p.add_argument("--args", dest="args_file", help="JSON file with a TrainingArguments object (Hugging Face names)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel world size (default 1)")
    p.add_argument("--hidden-size", type=int, help="the model's hidden size, for the hidden-size \"auto\" values")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prints the resolved config; problems and warnings go to stderr (exit 2 on a problem)."""
    from zerojax.args import TrainingArguments
    from zerojax.config import ConfigError, load_config

    try:
        training_args = None
        if args.args_file:
            training_args = TrainingArguments.from_dict(_read_json_object(args.args_file))
        model = {"hidden_size": args.hidden_size} if args.hidden_size is not None else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_config(args.file, training_args, model, world_size=args.world_size)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"zerojax config: error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"zerojax config: warning: {w.message}", file=sys.stderr)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _read_json_object(path: str) -> dict:
    """The JSON object in `path`, read with the config reader's bounds (size, depth, 64-bit integers)."""
    from zerojax.config.errors import shown
    from zerojax.config.loading import MAX_JSON_BYTES, check_tree, int_of, read_text

    text = read_text(Path(path), MAX_JSON_BYTES)
    try:
        value = json.loads(text, parse_int=int_of)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"--args {path!r} is not valid JSON: {shown(str(e))}; write a JSON object of "
                         "TrainingArguments fields.") from None
    if not isinstance(value, dict):
        raise ValueError(f"--args {path!r} must hold a JSON object of TrainingArguments fields.")
    return check_tree(value, f"--args {path!r}")
