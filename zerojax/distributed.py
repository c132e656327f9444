"""One script, one or many processes: `jax.distributed` set-up and the per-process share of a batch.

`zerojax launch` (see `zerojax.launch`) describes each process it starts with four environment
variables, which `initialize()` reads:

| variable | meaning |
|---|---|
| `ZEROJAX_COORDINATOR` | `HOST:PORT` of the coordination service (process 0 serves it) |
| `ZEROJAX_NUM_PROCESSES` | number of processes |
| `ZEROJAX_PROCESS_ID` | this process's rank, `0 .. NUM_PROCESSES - 1` |
| `ZEROJAX_DEVICES_PER_PROC` | devices each process drives: accelerators `rank*K .. rank*K+K-1`, or `K` simulated CPU devices when there is no accelerator |

Without them, a cluster that jax detects itself (SLURM, Open MPI, Kubernetes, Cloud TPU) is joined
with `jax.distributed.initialize()`'s own detection; anything else is a single process and nothing
is done.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax.mesh import DATA_AXES, data_parallel_size

COORDINATOR = "ZEROJAX_COORDINATOR"
NUM_PROCESSES = "ZEROJAX_NUM_PROCESSES"
PROCESS_ID = "ZEROJAX_PROCESS_ID"
DEVICES_PER_PROC = "ZEROJAX_DEVICES_PER_PROC"


@dataclasses.dataclass(frozen=True)
class Processes:
    """What `initialize()` joined: this process's rank, the process count and who said so."""

    process_id: int
    num_processes: int
    source: str  # "zerojax launch", the cluster jax detected (e.g. "SlurmCluster"), or "single process"


def initialize(environ: Mapping[str, str] | None = None, *, timeout_s: int = 300) -> Processes:
    """Joins the run this process belongs to; call it first, before any JAX computation.

    Under `zerojax launch`: sets the CPU backend to `ZEROJAX_DEVICES_PER_PROC` simulated devices with
    gloo cross-process collectives (used when there is no accelerator; harmless otherwise), and with
    more than one process calls `jax.distributed.initialize` with the launcher's coordinator, rank and
    this rank's accelerators. Otherwise joins a cluster jax detects (more than one process), or does
    nothing. Calling it again in an initialized process returns the same answer. `environ` holds the
    launcher's variables (default `os.environ`); jax's cluster detection always reads `os.environ`.
    """
    env = os.environ if environ is None else environ
    if NUM_PROCESSES in env:
        return _from_launcher(env, timeout_s)
    cluster = _detected_cluster()
    if cluster is None:
        return Processes(0, 1, "single process")
    if cluster.get_process_count() <= 1:
        return Processes(0, 1, cluster.__name__)
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=timeout_s)
    return Processes(jax.process_index(), jax.process_count(), cluster.__name__)


def _from_launcher(env: Mapping[str, str], timeout_s: int) -> Processes:
    count = _env_int(env, NUM_PROCESSES, minimum=1)
    rank = _env_int(env, PROCESS_ID, minimum=0)
    per_proc = _env_int(env, DEVICES_PER_PROC, minimum=1) if DEVICES_PER_PROC in env else 1
    if rank >= count:
        raise ValueError(
            f"zerojax.distributed.initialize: {PROCESS_ID}={rank} must be below {NUM_PROCESSES}={count}; "
            "start the processes with `zerojax launch`, which numbers them 0..N-1."
        )
    if jax.distributed.is_initialized():
        return Processes(jax.process_index(), jax.process_count(), "zerojax launch")
    if jax.config.jax_num_cpu_devices != per_proc:
        jax.config.update("jax_num_cpu_devices", per_proc)
    if count > 1:
        coordinator = env.get(COORDINATOR, "")
        if not coordinator.rpartition(":")[0]:
            raise ValueError(
                f"zerojax.distributed.initialize: {COORDINATOR}={coordinator!r} must be HOST:PORT of "
                "process 0; start the processes with `zerojax launch`, which sets it."
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            num_processes=count,
            process_id=rank,
            local_device_ids=list(range(rank * per_proc, (rank + 1) * per_proc)),
            initialization_timeout=timeout_s,
        )
    return Processes(rank, count, "zerojax launch")


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(
            f"zerojax.distributed.initialize: {name}={text!r} must be an integer >= {minimum}; "
            "start the processes with `zerojax launch`, which sets it."
        )
    return value


def _detected_cluster():
    """The cluster environment `jax.distributed.initialize()` would detect on its own, or None.

    The same choice jax makes (its `ClusterEnv` registry, opt-in methods such as mpi4py excluded),
    so that a single-process job on a cluster stays a plain single process.
    """
    from jax._src.clusters import ClusterEnv

    return next(
        (c for c in ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()), None
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The train step's batch sharding: dim 0 over the data-parallel axes ('replica', 'fsdp')."""
    return NamedSharding(mesh, P(DATA_AXES))


def process_rows(global_size: int, mesh: Mesh) -> slice:
    """The rows `[start, stop)` of a global batch of `global_size` rows that this process supplies.

    They are the rows the batch sharding places on this process's devices. With `make_mesh`'s
    default device order (processes own consecutive devices) process `p` of `P` supplies the `p`-th
    of `P` equal contiguous blocks; a mesh whose device order splits a process's rows raises.
    """
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_size,)).values()
    spans = sorted({(i[0].start or 0, global_size if i[0].stop is None else i[0].stop) for i in indices})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(
            f"process_rows: this process's devices hold the non-contiguous batch rows {spans}; build "
            "the mesh with each process's devices consecutive along ('replica', 'fsdp') (make_mesh's "
            "default order), or place the batch yourself with jax.make_array_from_process_local_data."
        )
    return slice(spans[0][0], spans[-1][1])


def global_batch(process_local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of the batch (a tree of numpy arrays) as global `jax.Array`s for the step.

    Contract: every process passes a tree of the same structure whose leaves have the same shape;
    dim 0 holds this process's rows, `rows = global batch / number of processes`, namely rows
    `process_rows(global_size, mesh)` of the global batch (process `p` supplies the `p`-th block
    with `make_mesh`'s default device order). The result has dim 0 = global batch, sharded over
    ('replica', 'fsdp') as `make_train_step` expects. With one process this is the batch itself,
    placed on the mesh: the step computes exactly what it computes from the numpy batch.
    """
    sharding = batch_sharding(mesh)
    ranks = data_parallel_size(mesh)
    local_shards = len({i[0].start for i in sharding.addressable_devices_indices_map((ranks,)).values()})

    def place(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_shards:
            raise ValueError(
                f"global_batch: leaf {jax.tree_util.keystr(path) or 'batch'} has shape {x.shape}; its "
                f"leading dimension (this process's rows) must be a multiple of {local_shards}, the "
                "number of batch shards on this process's devices; give each process "
                "global batch / process count rows."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(place, process_local_batch)
