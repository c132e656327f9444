"""Accelerators to compile for on any machine: N abstract devices of a named kind.

JAX compiles for GPUs and TPUs that are not there ("deviceless" ahead-of-time compilation): the
CUDA plugin (`jax-cuda12-plugin`) takes a `GpuTargetConfig` description of the GPU, libtpu a TPU
topology name. `Target.devices(n)` returns n such devices; a mesh over them lowers and compiles the
real train step with the accelerator's own compiler (its `memory_analysis()` and program text),
allocating nothing. `pip install 'zerojax[aot]'` installs both compilers; see `zerojax estimate --target`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Literal


def _gpu_config(name: str, *, cc: tuple[int, int], cores: int, fpus: int, shared_per_core: int, shared_optin: int,
                bandwidth: int, l2: int, clock: float, memory: int) -> str:
    """A `GpuTargetConfig` text proto (the fields XLA:GPU reads for a deviceless compile)."""
    major, minor = cc
    return (
        "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
        f"shared_memory_per_core: {shared_per_core} threads_per_core_limit: 2048 core_count: {cores} "
        f"fpus_per_core: {fpus} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        f"memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {memory} "
        f"shared_memory_per_block_optin: {shared_optin} cuda_compute_capability {{ major: {major} minor: {minor} }} "
        "registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
        'platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 } runtime_version { major: 12 minor: 8 } '
        f'device_description_str: "{name}"'
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """A kind of accelerator: `devices(n)` gives n abstract devices of it, laid out as a cluster would be.

    `memory_bytes` is one device's memory (what "fits" is measured against). GPUs come `per_host` to a
    host (NVLink within, the network between); TPU chips form one slice of the `tpu` generation.
    """

    name: str
    platform: Literal["cuda", "tpu"]
    memory_bytes: int
    description: str
    gpu_config: str | None = None
    tpu: str | None = None  # libtpu's name of the generation: v5p, v5e, v6e
    per_host: int = 8

    def devices(self, n: int) -> list:
        """n abstract devices of this kind (compile-only: they run nothing and hold no memory)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"target {self.name}: devices={n!r} must be a positive integer.")
        topologies = _topologies(self)
        if self.platform == "cuda":
            per_host = min(n, self.per_host)
            if n % per_host:
                raise ValueError(f"target {self.name}: {n} GPUs do not fill hosts of {self.per_host}; use a multiple "
                                 f"of {self.per_host} (or fewer than {self.per_host}).")
            desc = topologies.get_topology_desc(platform="cuda", target_config=self.gpu_config,
                                                topology=f"1x{n // per_host}x{per_host}")
        else:
            desc = topologies.get_topology_desc(topology_name=f"{self.tpu}:{tpu_topology(self.tpu, n)}", platform="tpu")
        return list(desc.devices)


def tpu_topology(generation: str, n: int) -> str:
    """The chip grid of a single n-chip slice: 3-D (`2x2x4`) for v5p and v4, 2-D (`4x8`) for v5e and v6e,
    from one host's 4 chips (`2x2x1`, `2x2`) up, doubling the shortest side."""
    dims = 3 if generation in ("v4", "v5p") else 2
    most = 4096 if dims == 3 else 256
    if n < 4 or n & (n - 1) or n > most:
        raise ValueError(f"TPU {generation}: a slice has a power-of-two number of chips from 4 to {most}; got {n}.")
    shape = [2, 2, 1][:dims]
    while math.prod(shape) < n:
        shape[shape.index(min(shape))] *= 2
    return "2x2x1" if shape == [2, 2, 1] else "x".join(str(s) for s in sorted(shape))


H100 = Target(
    "h100", "cuda", 84_929_347_584, "NVIDIA H100 80GB HBM3 (SXM), 8 to a host",
    gpu_config=_gpu_config("NVIDIA H100 80GB HBM3", cc=(9, 0), cores=132, fpus=128, shared_per_core=233472,
                           shared_optin=232448, bandwidth=3_352_320_000_000, l2=52_428_800, clock=1.98,
                           memory=84_929_347_584),
)
A100 = Target(
    "a100", "cuda", 85_198_045_184, "NVIDIA A100-SXM4-80GB, 8 to a host",
    gpu_config=_gpu_config("NVIDIA A100-SXM4-80GB", cc=(8, 0), cores=108, fpus=64, shared_per_core=167936,
                           shared_optin=166912, bandwidth=2_039_000_000_000, l2=41_943_040, clock=1.41,
                           memory=85_198_045_184),
)
TARGETS: dict[str, Target] = {
    t.name: t for t in (
        H100,
        A100,
        Target("tpu-v5p", "tpu", 95 * 2**30, "TPU v5p, 95 GiB HBM a chip, one slice", tpu="v5p", per_host=4),
        Target("tpu-v5e", "tpu", 16 * 2**30, "TPU v5e (v5litepod), 16 GiB HBM a chip, one slice", tpu="v5e",
               per_host=4),
        Target("tpu-v6e", "tpu", 32 * 2**30, "TPU v6e (Trillium), 32 GiB HBM a chip, one slice", tpu="v6e", per_host=4),
    )
}


def resolve(name: str | os.PathLike | Target) -> Target:
    """A target by name (`h100`, `a100`, `tpu-v5p`, `tpu-v5e`, `tpu-v6e`) or the path of a GpuTargetConfig
    text proto describing another GPU (its `device_memory_size` and `device_description_str` are read)."""
    if isinstance(name, Target):
        return name
    if str(name) in TARGETS:
        return TARGETS[str(name)]
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"target {str(name)!r} is neither a known target ({', '.join(TARGETS)}) nor a GpuTargetConfig "
                         "text proto file; name one, or pass the path of such a file for another GPU.")
    text = path.read_text()
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    kind = re.search(r'device_description_str:\s*"([^"]*)"', text)
    if not memory or "gpu_device_info" not in text:
        raise ValueError(f"target file {path}: not a GpuTargetConfig text proto (it needs gpu_device_info with "
                         "device_memory_size); write one like zerojax.targets.H100.gpu_config.")
    return Target(path.stem, "cuda", int(memory.group(1)), kind.group(1) if kind else path.stem, gpu_config=text)


def _topologies(target: Target):
    """`jax.experimental.topologies`, once the compiler for `target`'s platform is known to be loadable."""
    import importlib.util

    from jax.experimental import topologies

    package = {"cuda": "jax_plugins.xla_cuda12", "tpu": "libtpu"}[target.platform]
    # Compile-only TPU devices run nothing, so several processes (test workers, an estimate beside a
    # run) may load libtpu at once instead of the second failing on libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec(package.split(".")[0]) is None or importlib.util.find_spec(package) is None:
        raise ValueError(
            f"target {target.name}: the {target.platform.upper()} compiler is not installed; "
            "pip install 'zerojax[aot]' (jax-cuda12-plugin and libtpu, no CUDA libraries needed)."
        )
    return _Checked(topologies, target)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """`get_topology_desc` with the plugin's failure to register turned into a sentence with the fix."""

    topologies: object
    target: Target

    def get_topology_desc(self, **kwargs):
        try:
            return self.topologies.get_topology_desc(**kwargs)
        except NotImplementedError as e:
            raise ValueError(
                f"target {self.target.name}: JAX could not load its {self.target.platform.upper()} compiler ({e}). "
                "On a machine without that accelerator start the process with JAX_PLATFORMS=cpu (and, for GPUs, "
                "CUDA_VISIBLE_DEVICES=-1), as `zerojax estimate --target` does."
            ) from None
        except Exception as e:  # the compiler's own refusal of this topology
            raise ValueError(f"target {self.target.name}: {kwargs.get('topology_name') or kwargs.get('topology')} "
                             f"is refused: {str(e).splitlines()[0]}") from None
