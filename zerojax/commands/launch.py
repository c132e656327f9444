"""`zerojax launch --nproc N [--devices-per-proc K] [--coordinator HOST:PORT] [--timeout S] -- COMMAND ARGS...`

Starts N local processes of COMMAND for `zerojax.distributed.initialize()` (see `zerojax.launch`):
each drives K devices (accelerators, or K simulated CPU devices with gloo collectives when there is
no accelerator). A --coordinator is checked first: it resolves, its port is free, it reaches this
machine. The processes die with the launcher. Exit status: 0 when every process succeeds; otherwise
the failed rank's status, 124 after --timeout, 128 + signal after a forwarded SIGINT/SIGTERM, 2 for bad
arguments (a bad --coordinator included).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="run a command in N local processes (jax.distributed), like torchrun --nproc_per_node",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--nproc", help="number of processes (required)")
    p.add_argument("--devices-per-proc", default="1", help="devices per process (default 1)")
    p.add_argument("--coordinator", help="HOST:PORT of the coordination service (default: a free local port)")
    p.add_argument("--timeout", help="seconds the whole run may take before every process is stopped")
    p.add_argument("--grace", default="10", help="seconds a process gets after SIGTERM before SIGKILL (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=run)


def _number(flag: str, text: str | None, kind):
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"launch: {flag}={text!r} must be a {'positive integer' if kind is int else 'number'}.") from None


def run(args: argparse.Namespace) -> int:
    """Launches; bad arguments are one line on stderr and exit status 2."""
    from zerojax.launch import LaunchSpec, launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.nproc is None:
            raise ValueError("launch: --nproc is required, e.g. `zerojax launch --nproc 2 -- python train.py`.")
        spec = LaunchSpec(
            command=tuple(command),
            nproc=_number("--nproc", args.nproc, int),
            devices_per_proc=_number("--devices-per-proc", args.devices_per_proc, int),
            coordinator=args.coordinator,
            timeout=_number("--timeout", args.timeout, float),
            grace=_number("--grace", args.grace, float),
        )
    except ValueError as e:
        print(f"zerojax {e}", file=sys.stderr)
        return 2
    try:
        result = launch(spec)
    except ValueError as e:
        print(f"zerojax {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"zerojax launch: cannot run {spec.command[0]!r}: {e.strerror or e}; check the command after `--`.",
              file=sys.stderr)
        return 2
    if result.reason != "ok":
        print(f"zerojax launch: {result.describe()}", file=sys.stderr)
    return result.exit_code
