"""Memory and communication per device of a ZeRO train step: from formulas, and from compiling it.

Analytic numbers come from the shardings of an abstract plan (`zerojax.memory_report`: parameters,
gradients, master weights, optimizer state) plus a rough activation estimate for full
rematerialisation. Compiled numbers come from lowering and compiling the real train step ahead of
time on N devices (abstract shapes, nothing allocated): XLA's `memory_analysis()` for memory, and the
collectives of the program for communication.

Collective bytes per step come from the lowered and compiled programs (`zerojax.hlo`): whole tensors,
so DDP and stages 1-2 move 2Ψ elements per step and stage 3 moves 3Ψ, at the dtypes a GPU runs.
"""

from __future__ import annotations

import dataclasses
import math

from zerojax._units import byte_count
from zerojax.compiled import Compiled, DeviceMemoryExceeded, compile_train_step
from zerojax.hlo import compiled_collectives, host_layout_bytes, lowered_collectives, step_collectives
from zerojax.sizing import PRESETS, activation_bytes, load_model_config, model_dims, saved_input_bytes

def parse_bytes(text: str | int, what: str = "device_memory") -> int:
    """`'80GB'` (10^9), `'80GiB'` (2^30), `'512MB'` or a plain integer number of bytes."""
    size = byte_count(text)
    if size is None:
        raise ValueError(f"{what}={text!r} is not a memory size; write e.g. 80GB, 80GiB, 512MB or a byte count.")
    return size


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """One stage/offload option for one model on `devices` data-parallel devices (bytes per device)."""

    stage: int
    offload_optimizer: bool
    offload_param: bool
    devices: int
    params: int
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    optimizer_bytes: int
    held_bytes: int  # between steps: params, master weights, optimizer state (device and host)
    host_bytes: int  # of the held bytes, those in host memory
    model_state_bytes: int  # held + the step's gradient accumulator
    theory_model_state_bytes: float  # the ZeRO formula with this plan's byte widths
    activation_bytes: int
    theory_collectives: dict  # kind -> bytes per step by the ZeRO paper (2Ψ or 3Ψ elements)
    device_memory: int | None
    compiled: Compiled | None = None
    refused: str | None = None  # the compiler's refusal (`DeviceMemoryExceeded`): the step cannot fit
    refused_bytes: int = 0  # the temporaries it said the step needs
    host_activation_bytes: int = 0  # the saved layer inputs in host memory (cpu_checkpointing), analytic

    @property
    def theory_collective_bytes(self) -> int:
        return sum(self.theory_collectives.values())

    @property
    def analytic_peak_bytes(self) -> int:
        return self.model_state_bytes - self.host_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        """Device bytes at the step's peak: compiled when available; where the compiler refused the step
        for memory, its held device state plus the temporaries it said it needs; else analytic."""
        if self.compiled:
            return self.compiled.peak_bytes
        if self.refused:
            return self.model_state_bytes - self.host_bytes - self.grad_bytes + self.refused_bytes
        return self.analytic_peak_bytes

    @property
    def collective_bytes(self) -> dict[str, int]:
        """Bytes per step by collective kind (see the module docstring), with `total`: from the
        compiled step when there is one, else the theory."""
        kinds = self.theory_collectives if self.compiled is None else self.compiled.collective_bytes
        return {**kinds, "total": sum(kinds.values())}

    @property
    def fits(self) -> bool | None:
        if self.refused:
            return False
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    def as_json(self) -> dict:
        out = {
            "stage": self.stage,
            "offload_optimizer": "cpu" if self.offload_optimizer else None,
            "offload_param": "cpu" if self.offload_param else None,
            "model_state_bytes": self.model_state_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_source": "compiled" if self.compiled else ("compiler refused" if self.refused else "analytic"),
            "refused": self.refused,
            "theory_model_state_bytes": int(self.theory_model_state_bytes),
            "host_bytes": self.host_bytes,
            "host_activation_bytes": self.host_activation_bytes,
            "collective_bytes": self.collective_bytes,
            "theory_collective_bytes": int(self.theory_collective_bytes),
            "fits": self.fits,
            "analytic": {
                "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes, "master_bytes": self.master_bytes,
                "optimizer_bytes": self.optimizer_bytes, "held_bytes": self.held_bytes,
                "activation_bytes": self.activation_bytes, "peak_bytes": self.analytic_peak_bytes,
            },
        }
        if self.compiled:
            c = self.compiled
            out["compiled"] = {
                "argument_bytes": c.argument_bytes, "output_bytes": c.output_bytes, "alias_bytes": c.alias_bytes,
                "temp_bytes": c.temp_bytes, "host_argument_bytes": c.host_argument_bytes,
                "host_layout_bytes": c.host_layout_bytes, "device_argument_bytes": c.device_argument_bytes,
                "host_temp_bytes": c.host_temp_bytes, "state_bytes": c.state_bytes, "peak_bytes": c.peak_bytes,
                "lowered_collectives": c.lowered_collectives, "compiled_collectives": c.compiled_collectives,
                "rewritten_collectives": c.rewritten, "overlap": c.overlap, "target": c.target,
                "compile_seconds": round(c.seconds, 2),
            }
        return out


# ---------------------------------------------------------------------------------------------------
# Plans and estimates


def arguments_config(stage, devices: int, *, micro_batch: int = 1, offload_optimizer: bool = False,
                     offload_param: bool = False, grad_accum_dtype: str = "fp32", cpu_checkpointing: bool = False):
    """The DeepSpeed config (`ZeroConfig`) the estimate's arguments stand for: bf16 mixed-precision AdamW,
    `stage` (or "auto") with the offload asked for, every tensor sharded (persistence threshold 0), one
    micro-batch of `micro_batch` sequences per device, no clipping, layer inputs in host memory with
    `cpu_checkpointing`."""
    from zerojax.config import load_config

    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    for name, on in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if on:
            zero[name] = {"device": "cpu"}
    return load_config({
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": grad_accum_dtype},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": zero,
        "activation_checkpointing": {"cpu_checkpointing": cpu_checkpointing},
    }, world_size=devices)


def config_plan(config, params, devices, offload_mode: str = "streamed"):
    """The plan the Trainer builds for `config` (its stage resolved) and `params` on `devices`."""
    from zerojax import configured

    return configured.plan(config, params, configured.optimizer(config, params), configured.mesh(config, devices),
                           offload_mode)


def configured_step(graphdef, plan, config, seq: int):
    """The Trainer's train step for `plan` under `config` (its default loss, accumulation and clipping)
    and the abstract global batch of `seq`-token sequences it is compiled for."""
    import jax
    import jax.numpy as jnp

    from zerojax import configured

    step = configured.train_step(config, plan, configured.default_loss(graphdef))
    batch = {"input_ids": jax.ShapeDtypeStruct((config.train_batch_size, seq), jnp.int32)}
    return step, configured.abstract_batch(batch, plan.mesh)


def _devices(n: int, target=None):
    """n devices to compile for: of `target` (abstract, `zerojax.targets`) or of this process."""
    import jax

    if target is not None:
        from zerojax.targets import resolve

        return resolve(target).devices(n)
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"devices={n}: this process has {len(devices)} {devices[0].platform} devices. Run the estimate in a "
            f"process started with XLA_FLAGS=--xla_force_host_platform_device_count={n} (the `zerojax estimate` "
            "command does this itself), or compile for an accelerator target (target='h100', 'tpu-v5p', ...)."
        )
    return devices[:n]


def _check(devices: int, seq: int, micro_batch: int, stage, offload_optimizer: bool, offload_param: bool) -> None:
    for name, value in (("devices", devices), ("seq", seq), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if seq < 2:
        raise ValueError(f"seq={seq} must be at least 2 (the loss predicts the next token).")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3.")
    if offload_param and stage != 3:
        raise ValueError(f"offload_param at stage={stage}: parameter offload needs stage 3; use --stage 3.")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer at stage=0: optimizer offload needs stage 1, 2 or 3.")


def _inputs(hf_config: dict, devices: int, seq: int, micro_batch: int, grad_accum_dtype: str,
            check_stage: tuple = (0, False, False), cpu_checkpointing: bool = False):
    """`(graphdef, abstract params)` of the model after checking the inputs (`check_stage`: the stage and
    offload flags asked for), its layers rematerialised (`remat="offload"` with `cpu_checkpointing`)."""
    from zerojax.hf.files import check_sizes
    from zerojax.models import abstract_model
    from zerojax.models.layers import OFFLOAD

    _check(devices, seq, micro_batch, *check_stage)
    check_sizes(hf_config, "hf_config")
    graphdef, params = abstract_model(hf_config, dtype="fp32", scan_layers=True,
                                      remat=OFFLOAD if cpu_checkpointing else "full")
    if grad_accum_dtype not in ("fp32", "bf16"):
        raise ValueError(f"grad_accum_dtype={grad_accum_dtype!r} is not supported; use 'fp32' or 'bf16'.")
    return graphdef, params


def estimate(
    hf_config: dict,
    devices: int,
    stage: int | None = None,
    *,
    seq: int = 2048,
    micro_batch: int = 1,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    device_memory: int | None = None,
    compiled: bool = False,
    grad_accum_dtype: str = "fp32",
    target=None,
    offload_mode: str = "streamed",
    config=None,
    cpu_checkpointing: bool = False,
) -> StageEstimate:
    """Bytes per device of one stage for the model of `hf_config` on `devices` data-parallel devices.

    The step is the Trainer's for a DeepSpeed config (`zerojax.configured`): `config` (a `ZeroConfig`
    from `zerojax.config.load_config` for `devices`, its stage resolved), else the one the arguments
    stand for (`arguments_config`: bf16 mixed-precision AdamW, a gradient accumulator in
    `grad_accum_dtype`, DeepSpeed's `data_types.grad_accum_dtype`, which the ZeRO paper's formula takes
    as 'bf16'); full remat, layers scanned, each layer's input saved in host memory with `cpu_checkpointing`
    (the config's `activation_checkpointing.cpu_checkpointing`). `target` (a `zerojax.targets` name, file or Target)
    compiles for that accelerator on any machine, its memory the default `device_memory`; without one
    the estimate needs `devices` jax devices in this process (simulated CPU devices will do).
    `offload_mode` is `Offload.mode`.
    """
    if config is not None and stage is not None:
        raise ValueError(f"estimate: stage={stage!r} and a config were both given; the config states the stage, "
                         "so pass one of them.")
    if config is None:
        graphdef, params = _inputs(hf_config, devices, seq, micro_batch, grad_accum_dtype,
                                   (stage, offload_optimizer, offload_param), cpu_checkpointing)
        config = arguments_config(stage, devices, micro_batch=micro_batch, offload_optimizer=offload_optimizer,
                                  offload_param=offload_param, grad_accum_dtype=grad_accum_dtype,
                                  cpu_checkpointing=cpu_checkpointing)
    else:
        graphdef, params = _inputs(hf_config, devices, seq, config.train_micro_batch_size_per_gpu, grad_accum_dtype,
                                   cpu_checkpointing=config.cpu_checkpointing)
    if target is not None and device_memory is None:
        from zerojax.targets import resolve

        device_memory = resolve(target).memory_bytes
    plan = config_plan(config, params, _devices(devices, target), offload_mode)
    return _measure(hf_config, graphdef, plan, config, seq, device_memory, compiled, target)


def _theory_collectives(plan, psi: int) -> dict:
    """Bytes per step by kind as the ZeRO paper counts them (2Ψ or 3Ψ elements), at the widths on the wire:
    the compute dtype, the reduce dtype, or ZeRO++'s quantized blocks (`zerojax.zeropp.wire_itemsize`; qgZ's
    all-to-all once per mesh axis, each hop moving what the hops before it left)."""
    from zerojax.mesh import FSDP
    from zerojax.zeropp import hop_order, wire_itemsize

    prec, rules, quant = plan.precision, plan.rules, plan.rules.quantization
    stage = rules.stage
    gather_width = wire_itemsize(8, quant.weight_block) if quant.weights else prec.compute_dtype.itemsize
    gathers = {0: 0, 1: 1, 2: 1, 3: 2}[stage] * psi * gather_width  # stage 3: forward, and again in the backward
    if stage and quant.gradients:
        scattered = [a for a in ((FSDP,) if rules.hierarchy == "mics" else rules.data_axes) if a in rules.data_axes]
        sizes = [rules.mesh.shape[a] for a in hop_order(scattered)]
        hops = sum(1 / math.prod(sizes[:i]) for i in range(len(sizes)))
        return {"all-gather": gathers, "all-to-all": psi * hops * wire_itemsize(quant.gradient_bits, quant.gradient_block)}
    rb = prec.reduce_dtype.itemsize
    return {"all-gather": gathers, "reduce-scatter": psi * rb if stage else 0, "all-reduce": 0 if stage else 2 * psi * rb}


def _measure(hf_config: dict, graphdef, plan, config, seq: int, device_memory: int | None, compiled: bool,
             target) -> StageEstimate:
    """The estimate of `plan` (built for `config`): analytic bytes, and the compiled step's with `compiled`."""
    from zerojax.report import memory_report, zero_formula_bytes

    report = memory_report(plan)
    prec, stage, devices = plan.precision, plan.rules.stage, plan.rules.data_size
    psi = report.num_params
    cb, ab = prec.compute_dtype.itemsize, prec.accum_dtype.itemsize
    theory = zero_formula_bytes(stage, psi, devices, param_bytes=cb if plan.keeps_master else 0, grad_bytes=ab,
                                optimizer_bytes=prec.master_dtype.itemsize + 8)
    theory_collectives = _theory_collectives(plan, psi)
    dims, micro = model_dims(hf_config), config.train_micro_batch_size_per_gpu
    on_host = saved_input_bytes(dims, seq, micro, cb) if config.cpu_checkpointing else 0
    result = StageEstimate(
        stage=stage, offload_optimizer=config.offload_optimizer.enabled, offload_param=config.offload_param.enabled,
        devices=devices, params=psi,
        param_bytes=report.param_bytes, grad_bytes=report.grad_bytes, master_bytes=report.master_bytes,
        optimizer_bytes=report.opt_state_bytes, held_bytes=report.held_bytes, host_bytes=report.host_bytes,
        model_state_bytes=report.model_state_bytes, theory_model_state_bytes=theory,
        activation_bytes=activation_bytes(dims, seq, micro, cb, saved_on_host=config.cpu_checkpointing),
        host_activation_bytes=on_host,
        theory_collectives=theory_collectives,
        device_memory=device_memory,
    )
    if compiled:
        name = None if target is None else getattr(target, "name", str(target))
        try:
            result = dataclasses.replace(result, compiled=compile_step(graphdef, plan, config, seq, target=name))
        except DeviceMemoryExceeded as e:
            result = dataclasses.replace(result, refused=str(e), refused_bytes=e.temp_bytes)
    return result


def compile_step(graphdef, plan, config, seq: int, target: str | None = None) -> Compiled:
    """Lowers and compiles the bundled model's train step for `plan` under `config` ahead of time
    (`configured_step`: the Trainer's step, on `config.train_batch_size` sequences of `seq` tokens) and
    reads its memory and collectives."""
    step, batch = configured_step(graphdef, plan, config, seq)
    return compile_train_step(step, plan, batch, target=target)


def choose_stage(
    hf_config: dict,
    devices: int,
    device_memory: int,
    *,
    seq: int = 2048,
    micro_batch: int = 1,
    compiled: bool = True,
    grad_accum_dtype: str = "fp32",
    target=None,
    config=None,
    cpu_checkpointing: bool = False,
) -> StageEstimate:
    """`zero_optimization.stage: "auto"` (`zerojax.configured.search_stage`): the first of the stage
    options (`AUTO_ORDER`: lowest stage, then offload) whose peak bytes per device fit `device_memory`;
    raises ValueError naming the smallest peak if none does. With a `target`, each option is compiled
    for it; options it cannot compile (offload on a GPU target) are skipped with their reason. `config`
    (a `ZeroConfig` for `devices`) is searched instead of the one the arguments stand for."""
    from zerojax.configured import search_stage

    if config is None:
        graphdef, params = _inputs(hf_config, devices, seq, micro_batch, grad_accum_dtype,
                                   cpu_checkpointing=cpu_checkpointing)
        config = arguments_config("auto", devices, micro_batch=micro_batch, grad_accum_dtype=grad_accum_dtype,
                                  cpu_checkpointing=cpu_checkpointing)
    else:
        graphdef, params = _inputs(hf_config, devices, seq, config.train_micro_batch_size_per_gpu, grad_accum_dtype,
                                   cpu_checkpointing=config.cpu_checkpointing)
    device_list = _devices(devices, target)
    chosen, tried = search_stage(
        config, build=lambda option: config_plan(option, params, device_list),
        measure=lambda option, plan: _measure(hf_config, graphdef, plan, option, seq, device_memory, compiled, target),
        fits=lambda e: e.fits)
    if chosen is not None:
        return chosen.result
    best = min((t.result for t in tried if t.result is not None), key=lambda e: e.peak_bytes)
    raise ValueError(
        f'stage "auto": no ZeRO stage or offload fits device_memory={device_memory / 2**30:.2f} GiB on {devices} '
        f"devices; the smallest peak is {best.peak_bytes / 2**30:.2f} GiB ({describe_option(best)}). Use more "
        "devices, a shorter sequence or a smaller micro-batch."
    )


def option_name(stage: int, offload_optimizer: bool, offload_param: bool) -> str:
    """E.g. 'stage 3 + offload optimizer and params to cpu'."""
    offload = [name for name, on in (("optimizer", offload_optimizer), ("params", offload_param)) if on]
    return f"stage {stage}" + (f" + offload {' and '.join(offload)} to cpu" if offload else "")


def describe_option(e: StageEstimate) -> str:
    return option_name(e.stage, e.offload_optimizer, e.offload_param)


def table(estimates: list[StageEstimate]) -> str:
    """A readable table of bytes per device, in GiB (MiB for models under 1 GiB a device)."""
    big = max((e.peak_bytes for e in estimates), default=0) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)
    num = lambda b: f"{b / scale:10.2f}"
    head = (f"{'option':46} {'states':>10} {'theory':>10} {'host':>10} {'activ.':>10} {'peak':>10} "
            f"{'comm/step':>10} {'fits':>5}")
    lines = [head, "-" * len(head)]
    for e in estimates:
        fits = "-" if e.fits is None else ("yes" if e.fits else "no*" if e.refused else "no")
        lines.append(
            f"{describe_option(e):46} {num(e.model_state_bytes)} {num(e.theory_model_state_bytes)} "
            f"{num(e.host_bytes + e.host_activation_bytes)} {num(e.activation_bytes)} {num(e.peak_bytes)} "
            f"{num(e.collective_bytes['total'])} {fits:>5}"
        )
    src = ("compiled (XLA memory analysis: device arguments + outputs - aliases + temporaries)"
           if estimates and estimates[0].compiled else "analytic (device model states + activations)")
    lines.append(
        f"{unit} per device. states: params + gradient accumulator + master + optimizer state (theory: the ZeRO "
        f"formula); host: the states and saved layer inputs kept in host memory; peak: {src}; comm/step: all-gather results + reduce-scatter and all-to-all operands + 2 x all-reduce operands."
    )
    lines += [f"no*: {describe_option(e)}: {e.refused}" for e in estimates if e.refused]
    return "\n".join(lines)


__all__ = [
    "Compiled", "DeviceMemoryExceeded", "PRESETS", "StageEstimate", "activation_bytes", "choose_stage", "compile_step", "compile_train_step",
    "compiled_collectives", "host_layout_bytes", "option_name", "estimate", "load_model_config", "lowered_collectives", "parse_bytes", "step_collectives",
    "table",
]
