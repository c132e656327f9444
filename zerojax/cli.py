"""The `zerojax` command: one subcommand per module in `zerojax.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `add_parser(subparsers)`, which registers its subcommand and sets `func`:
# `func(args) -> int` is the exit code (2 for a user's mistake, with the message on stderr).
SUBCOMMANDS = ("export", "config", "launch", "estimate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zerojax", description="DeepSpeed ZeRO for JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"zerojax.commands.{name}").add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
