"""`zerojax estimate --model M --devices N`: memory per device and bytes communicated per step, per ZeRO stage.

Analytic numbers come from the plan's shardings; with `--compiled` the real train step is also compiled
ahead of time for N devices (simulated CPU devices when this machine has fewer: the command re-runs
itself with XLA_FLAGS=--xla_force_host_platform_device_count=N) and XLA's memory analysis and the
program's collectives are reported. `--target h100|a100|tpu-v5p|tpu-v5e|tpu-v6e` (or a GpuTargetConfig
file) compiles for N of those accelerators instead, with their own compiler, on any machine (`pip
install 'zerojax[aot]'`). `--stage auto` prints the cheapest option that fits --device-memory.
`--deepspeed CONFIG` estimates the step the Trainer compiles for that DeepSpeed config (its stage,
offload, precision, optimizer, micro-batch and accumulation) instead of the one the flags describe.
Without --target, --devices is at most MAX_SIMULATED_DEVICES (4096); the re-run dies with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = "ZEROJAX_ESTIMATE_CHILD"
# Simulated CPU devices beyond this take minutes to create and lay out (8192: 45 s, 16384: over 5 minutes).
MAX_SIMULATED_DEVICES = 4096


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate", help="memory per device and communication per step of each ZeRO stage",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", required=True, help="a preset (llama-2-7b, llama-3-8b, gpt2, ...) or a config.json path")
    p.add_argument("--devices", type=int, required=True, help="number of data-parallel devices N")
    p.add_argument("--stage", default="all", choices=["0", "1", "2", "3", "all", "auto"],
                   help="ZeRO stage, 'all' (default) or 'auto' (the cheapest that fits --device-memory)")
    p.add_argument("--offload-optimizer", choices=["none", "cpu"], default="none",
                   help="keep fp32 master weights and optimizer state in host memory (stages 1-3)")
    p.add_argument("--offload-param", choices=["none", "cpu"], default="none",
                   help="keep stage-3 parameter shards in host memory")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--micro-batch", type=int, default=1, help="micro-batch size per device (default 1)")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GB or 80GiB: reports whether each stage fits")
    p.add_argument("--grad-accum-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="gradient accumulator dtype (DeepSpeed data_types.grad_accum_dtype; default fp32)")
    p.add_argument("--cpu-checkpointing", action="store_true",
                   help="save each layer's input in host memory (DeepSpeed activation_checkpointing.cpu_checkpointing)")
    p.add_argument("--compiled", action="store_true", help="also compile the train step and report XLA's numbers")
    p.add_argument("--target", help="compile for N accelerators of this kind (h100, a100, tpu-v5p, tpu-v5e, tpu-v6e, or "
                   "a GpuTargetConfig text proto file) instead of this machine's devices; implies --compiled")
    p.add_argument("--offload-mode", choices=["streamed", "host"], default="streamed",
                   help="optimizer offload: update on the device with the state streamed in (default, as a config "
                   "gives the Trainer) or on the host, as DeepSpeed's CPU Adam")
    p.add_argument("--deepspeed", metavar="CONFIG",
                   help="a DeepSpeed config (no \"auto\" values): estimate the step the Trainer compiles for it, "
                   "in place of --stage, --offload-*, --micro-batch, --grad-accum-dtype and --cpu-checkpointing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces `args` (for the re-run with more simulated devices)."""
    argv = ["estimate", "--model", args.model, "--devices", str(args.devices), "--stage", args.stage,
            "--offload-optimizer", args.offload_optimizer, "--offload-param", args.offload_param,
            "--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--grad-accum-dtype", args.grad_accum_dtype,
            "--offload-mode", args.offload_mode]
    argv += ["--device-memory", args.device_memory] if args.device_memory else []
    argv += ["--deepspeed", args.deepspeed] if args.deepspeed else []
    return argv + ["--cpu-checkpointing"] * args.cpu_checkpointing + ["--compiled"] * args.compiled + ["--json"] * args.json


def _rerun(args: argparse.Namespace) -> int:
    from zerojax.launch import die_with_parent

    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD: "1"})
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    return subprocess.run([sys.executable, "-m", "zerojax.cli", *_argv(args)], env=env, check=False,
                          preexec_fn=die_with_parent()).returncode


def _options(stage: str, offload_optimizer: bool, offload_param: bool) -> list[tuple[int, bool, bool]]:
    if stage != "all":
        return [(int(stage), offload_optimizer, offload_param)]
    low = 3 if offload_param else (1 if offload_optimizer else 0)
    return [(s, offload_optimizer, offload_param) for s in range(low, 4)]


def _deepspeed(args: argparse.Namespace, model_config: dict):
    """The `--deepspeed` config resolved for --devices (None without one); raises ValueError when a flag it
    replaces is given too."""
    if not args.deepspeed:
        return None
    from zerojax.config import load_config

    given = [flag for flag, value, default in (
        ("--stage", args.stage, "all"), ("--offload-optimizer", args.offload_optimizer, "none"),
        ("--offload-param", args.offload_param, "none"), ("--micro-batch", args.micro_batch, 1),
        ("--grad-accum-dtype", args.grad_accum_dtype, "fp32"), ("--cpu-checkpointing", args.cpu_checkpointing, False),
    ) if value != default]
    if given:
        raise ValueError(f"--deepspeed states the stage, offload, micro-batch, accumulator dtype and activation "
                         f"checkpointing; drop "
                         f"{', '.join(given)}.")
    return load_config(args.deepspeed, model_config=model_config, world_size=args.devices)


def run(args: argparse.Namespace) -> int:
    """Prints the table or JSON; a user's mistake is one line on stderr, exit 2."""
    from zerojax import estimate as est

    def fail(message: str) -> int:
        print(f"zerojax estimate: error: {message}", file=sys.stderr)
        return 2

    try:
        config = est.load_model_config(args.model)
        memory = est.parse_bytes(args.device_memory, "--device-memory") if args.device_memory else None
        opt, param = args.offload_optimizer == "cpu", args.offload_param == "cpu"
        if args.stage == "auto" and memory is None:
            raise ValueError("--stage auto needs --device-memory (e.g. --device-memory 80GB) to choose a stage.")
        if args.stage == "auto" and (opt or param):
            raise ValueError("--stage auto chooses the offload itself; drop --offload-optimizer/--offload-param.")
        for name in ("devices", "seq", "micro_batch"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer.")
        deepspeed = _deepspeed(args, config)
        auto = args.stage == "auto" or (deepspeed is not None and deepspeed.stage == "auto")
        if auto and memory is None:
            raise ValueError('--deepspeed: zero_optimization.stage "auto" needs --device-memory (e.g. --device-memory '
                             "80GB) to choose a stage.")
        if not args.target and args.devices > MAX_SIMULATED_DEVICES:
            raise ValueError(
                f"--devices={args.devices}: without --target the estimate builds that many simulated CPU devices, "
                f"at most {MAX_SIMULATED_DEVICES}; pass fewer, or --target h100, a100 or tpu-v5p to compile for "
                "that many accelerators."
            )
        import jax

        target = None
        if args.target:
            from zerojax.targets import resolve

            target, args.compiled = resolve(args.target), True
            jax.config.update("jax_platforms", "cpu")  # the target's devices are abstract: no accelerator needed
            memory = memory or target.memory_bytes
        elif jax.device_count() < args.devices:
            if os.environ.get(_CHILD):
                raise ValueError(f"--devices={args.devices}: only {jax.device_count()} devices after re-running.")
            return _rerun(args)
        if auto:
            chosen = est.choose_stage(config, args.devices, memory, seq=args.seq, micro_batch=args.micro_batch,
                                      compiled=args.compiled, grad_accum_dtype=args.grad_accum_dtype, target=target,
                                      config=deepspeed, cpu_checkpointing=args.cpu_checkpointing)
            results = [chosen]
        elif deepspeed is not None:
            results = [est.estimate(config, args.devices, seq=args.seq, device_memory=memory, compiled=args.compiled,
                                    target=target, offload_mode=args.offload_mode, config=deepspeed)]
        else:
            results = [
                est.estimate(config, args.devices, s, seq=args.seq, micro_batch=args.micro_batch,
                             offload_optimizer=o, offload_param=p, device_memory=memory, compiled=args.compiled,
                             grad_accum_dtype=args.grad_accum_dtype, target=target, offload_mode=args.offload_mode,
                             cpu_checkpointing=args.cpu_checkpointing)
                for s, o, p in _options(args.stage, opt, param)
            ]
    except ValueError as e:
        return fail(" ".join(str(e).split()))
    if args.json:
        out = {"model": args.model, "target": target.name if target else None,
               "params": results[0].params, "devices": args.devices, "seq": args.seq,
               "micro_batch": args.micro_batch, "device_memory": memory,
               "stages": [r.as_json() for r in results]}
        if auto:
            out["chosen"] = est.describe_option(results[0])
        print(json.dumps(out, indent=2))
        return 0
    where = f"{args.devices} x {target.description}" if target else f"{args.devices} devices"
    on_host = deepspeed.cpu_checkpointing if deepspeed is not None else args.cpu_checkpointing
    remat = "full remat, layer inputs in host memory" if on_host else "full remat"
    if args.deepspeed:
        print(f"{args.model}: {results[0].params:,} parameters on {where}, seq {args.seq}, the Trainer's step for "
              f"{args.deepspeed}, {remat}")
    else:
        print(f"{args.model}: {results[0].params:,} parameters on {where}, seq {args.seq}, "
              f"micro-batch {args.micro_batch}, bf16 mixed-precision AdamW, {args.grad_accum_dtype} gradient "
              f"accumulator, {remat}")
    if auto:
        print(f'stage "auto" chooses {est.describe_option(results[0])}')
    print(est.table(results))
    return 0
