"""A train step compiled ahead of time, and what XLA made of it: memory per device and collectives per step.

`compile_train_step` lowers and compiles a step for abstract state and batch (nothing allocated, on
this machine's devices or a target's, `zerojax.targets`); `Compiled` holds XLA's memory analysis and the
collectives of the lowered and compiled programs (`zerojax.hlo`). A compiler that refuses a step for
memory (XLA:TPU) raises `DeviceMemoryExceeded`.
"""

from __future__ import annotations

import dataclasses
import re

from zerojax.hlo import by_kind, compiled_program, host_layout_bytes, lowered_collectives, overlap, rewritten, step_collectives


class DeviceMemoryExceeded(ValueError):
    """The accelerator's compiler refused the step: its temporaries alone exceed the device's memory
    (XLA:TPU does not compile a program that cannot fit). `temp_bytes` is what it said it needs."""

    def __init__(self, message: str, temp_bytes: int, available_bytes: int):
        super().__init__(message)
        self.temp_bytes, self.available_bytes = temp_bytes, available_bytes


_OUT_OF_MEMORY = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def refused_for_memory(error: Exception) -> DeviceMemoryExceeded | None:
    """The compiler's out-of-memory refusal as a `DeviceMemoryExceeded` (None for any other error)."""
    m = _OUT_OF_MEMORY.search(str(error))
    if m is None:
        return None
    size = lambda value, unit: int(float(value) * 2 ** (10 * "KMGT".index(unit) + 10))
    need, have = size(m.group(1), m.group(2)), size(m.group(3), m.group(4))
    return DeviceMemoryExceeded(
        f"the compiler refused the step: its temporaries need {need / 2**30:.2f} GiB per device, more than the "
        f"{have / 2**30:.2f} GiB there are (a higher stage, offload, more devices or a smaller batch would fit)",
        need, have)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's memory analysis of the compiled step, per device, and its collectives per step.

    `peak_bytes` = device arguments + outputs - aliased outputs + temporaries: an upper bound on what
    the step holds at once, as XLA sizes buffers; with the state donated the outputs alias the
    arguments, so it is arguments + temporaries. A backend that does not split its statistics by
    memory space (XLA:CPU reports no host bytes) counts offloaded state among the arguments: then the
    arguments the compiled program itself places in host memory (`host_layout_bytes`, memory space
    S(5) in its entry layout) are taken off, while the temporaries still include any host-side work,
    so the device peak is overstated rather than understated.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    host_argument_bytes: int
    host_temp_bytes: int
    host_layout_bytes: int  # arguments in host memory space per the compiled program's entry layout
    batch_bytes: int
    lowered_collectives: dict  # kind -> dtype -> bytes, from the lowered StableHLO
    compiled_collectives: dict  # kind -> dtype -> bytes, from the compiled HLO (CPU upcasts 16-bit)
    seconds: float
    overlap: dict | None = None  # kind (and total) -> share of compiled collective bytes overlapped with compute
    target: str | None = None  # the accelerator compiled for (`zerojax.targets`); None: this machine's devices

    @property
    def collective_bytes(self) -> dict[str, int]:
        """Bytes per step by kind: as an accelerator's compiler emits them; on XLA:CPU, which upcasts
        16-bit collectives, the lowered program's plus what only the compiled one moves."""
        if self.target is not None:
            return {k: sum(v.values()) for k, v in self.compiled_collectives.items()}
        return step_collectives(self.lowered_collectives, self.compiled_collectives)

    @property
    def rewritten(self) -> dict[str, int]:
        """Bytes of all-gathers and reduce-scatters the program asks for that the compiler moves as
        all-reduces instead (XLA:TPU), by the kind asked for."""
        return rewritten(self.lowered_collectives, self.compiled_collectives)

    @property
    def device_argument_bytes(self) -> int:
        return self.argument_bytes - (self.host_layout_bytes if self.host_argument_bytes == 0 else 0)

    @property
    def peak_bytes(self) -> int:
        return self.device_argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def state_bytes(self) -> int:
        """The train state the step takes as arguments (device and host), the batch excluded."""
        return self.argument_bytes + self.host_argument_bytes - self.batch_bytes


def compile_train_step(step, plan, batch, target: str | None = None) -> Compiled:
    """Lowers and compiles `step` (from `make_train_step` for `plan`) ahead of time for `batch` (a pytree
    of ShapeDtypeStructs with shardings) and reads its memory and collectives; nothing is allocated.
    `target` names the accelerator the plan's devices are (None: this machine's)."""
    import time

    import jax

    start = time.perf_counter()
    replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    key = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),) if step.rng else ()
    lowered = step.lower(plan.abstract_state(), batch, *key)
    lowered_text = lowered.as_text()
    try:
        exe = lowered.compile()
    except Exception as e:  # jax's JaxRuntimeError: the compiler's own refusal
        refused = refused_for_memory(e)
        if refused is None:
            raise
        raise refused from None
    seconds = time.perf_counter() - start
    stats, compiled_text = exe.memory_analysis(), exe.as_text()
    n = plan.rules.data_size
    program = compiled_program(compiled_text)
    return Compiled(
        argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
        host_argument_bytes=stats.host_argument_size_in_bytes, host_temp_bytes=stats.host_temp_size_in_bytes,
        host_layout_bytes=host_layout_bytes(compiled_text),
        batch_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // n,
        lowered_collectives=lowered_collectives(lowered_text), compiled_collectives=by_kind(program),
        seconds=seconds, overlap=overlap(program), target=target,
    )
