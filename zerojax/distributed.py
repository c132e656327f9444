"""One script, one or many processes: `jax.distributed` set-up and the per-process share of a batch.

`zerojax launch` (see `zerojax.launch`) describes each process it starts with four environment
variables, which `initialize()` reads:

| variable | meaning |
|---|---|
| `ZEROJAX_COORDINATOR` | `HOST:PORT` of the coordination service (process 0 serves it) |
| `ZEROJAX_NUM_PROCESSES` | number of processes |
| `ZEROJAX_PROCESS_ID` | this process's rank, `0 .. NUM_PROCESSES - 1` |
| `ZEROJAX_DEVICES_PER_PROC` | devices each process drives: accelerators `rank*K .. rank*K+K-1`, or `K` simulated CPU devices when there is no accelerator |

Before joining, `initialize()` checks the coordinator within seconds (`check_coordinator`): its host
resolves; process 0 can bind its port and HOST:PORT leads back to it; the other processes get an
answer from HOST:PORT. jax itself would wait minutes and then abort.

Without them, a cluster that jax detects itself (SLURM, Open MPI, Kubernetes, Cloud TPU) is joined
with `jax.distributed.initialize()`'s own detection; anything else is a single process and nothing
is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax.mesh import DATA_AXES, check_batch_rows, data_parallel_size

COORDINATOR = "ZEROJAX_COORDINATOR"
NUM_PROCESSES = "ZEROJAX_NUM_PROCESSES"
PROCESS_ID = "ZEROJAX_PROCESS_ID"
DEVICES_PER_PROC = "ZEROJAX_DEVICES_PER_PROC"
CHECK_SECONDS = 30.0  # the most `initialize` spends checking the coordinator (less with a shorter timeout_s)


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
    A launcher's coordinator is checked first (`check_coordinator`, within min(timeout_s, CHECK_SECONDS)).
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
    coordinator = _checked_coordinator(env, rank, timeout_s) if count > 1 else None
    if jax.config.jax_num_cpu_devices != per_proc:
        jax.config.update("jax_num_cpu_devices", per_proc)
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            num_processes=count,
            process_id=rank,
            local_device_ids=list(range(rank * per_proc, (rank + 1) * per_proc)),
            initialization_timeout=timeout_s,
        )
    return Processes(rank, count, "zerojax launch")


def _checked_coordinator(env: Mapping[str, str], rank: int, timeout_s: int) -> str:
    """The launcher's `HOST:PORT`, once `check_coordinator` passed for process `rank`."""
    coordinator = env.get(COORDINATOR, "")
    name = f"zerojax.distributed.initialize: {COORDINATOR}"
    if split_address(coordinator) is None:
        raise ValueError(
            f"{name}={coordinator!r} must be HOST:PORT of process 0 with a port in 1..65535; start the "
            "processes with `zerojax launch`, which sets it."
        )
    check_coordinator(coordinator, serves=rank == 0, seconds=min(timeout_s, CHECK_SECONDS), name=name)
    return coordinator


def split_address(address: str) -> tuple[str, int] | None:
    """`(host, port)` of `HOST:PORT` (an IPv6 host in brackets, `[::1]:29500`), or None if it is not one."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_coordinator(address: str, *, serves: bool, seconds: float, name: str) -> None:
    """Raises a one-line ValueError (`{name}={address!r}: why; fix`) unless, within about `seconds`, HOST
    resolves and: when this process `serves` the coordination service (process 0), PORT can be bound here
    and HOST:PORT leads back to it; otherwise HOST:PORT answers (accepts or refuses a connection).

    `address` is a valid `HOST:PORT` (`split_address`). jax binds the service on every interface, as the
    check does, with SO_REUSEADDR: a port that only a closed connection still holds counts as free.
    """
    host, port = split_address(address)
    end = time.monotonic() + seconds
    try:
        family, sockaddr = _resolve(host, port, seconds)
    except (OSError, UnicodeError) as e:
        raise ValueError(
            f"{name}={address!r}: host {host!r} does not resolve ({_reason(e)}); use a name or IP address of "
            "process 0's machine (127.0.0.1 when every process runs here)."
        ) from None
    if serves:
        _check_serving(address, name, family, sockaddr, end)
    else:
        _check_reachable(address, name, family, sockaddr, end)


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _resolve(host: str, port: int, seconds: float) -> tuple[int, tuple]:
    """`(family, sockaddr)` of the first TCP address of `host:port`; OSError if it has none within `seconds`
    (the lookup runs in a daemon thread, so a stuck resolver is left behind, not waited for)."""
    found: list = []

    def lookup():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0])
        except (OSError, UnicodeError) as e:
            found.append(e)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(seconds)
    if not found:
        raise OSError(f"no answer within {seconds:g} s")
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0][0], found[0][4]


def _check_serving(address: str, name: str, family: int, sockaddr: tuple, end: float) -> None:
    """Binds PORT on every interface, then connects to `sockaddr` and accepts that connection, by `end`."""
    port = sockaddr[1]
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            server.listen()
        except OSError as e:
            raise ValueError(
                f"{name}={address!r}: cannot serve on port {port} here ({_reason(e)}); process 0 serves the "
                "coordinator on this machine: stop what holds the port or choose another one."
            ) from None
        try:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(max(0.1, end - time.monotonic()))
                client.connect(sockaddr)
                server.settimeout(max(0.1, end - time.monotonic()))
                server.accept()[0].close()
        except OSError as e:
            raise ValueError(
                f"{name}={address!r}: the address does not reach this machine ({_reason(e)}), where process 0 "
                "serves the coordinator; use an address of this machine (127.0.0.1 when every process runs here)."
            ) from None


def _check_reachable(address: str, name: str, family: int, sockaddr: tuple, end: float) -> None:
    """Connects to `sockaddr` until it accepts or refuses (process 0 is not listening yet), retrying until `end`."""
    while True:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(max(0.1, end - time.monotonic()))
                client.connect(sockaddr)
            return
        except ConnectionRefusedError:
            return
        except OSError as e:
            error = e
        if time.monotonic() >= end:
            raise ValueError(
                f"{name}={address!r}: unreachable from this machine ({_reason(error)}); use the address of "
                "process 0's machine, and check that no firewall blocks the port."
            )
        time.sleep(0.2)


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

    check_batch_rows(process_local_batch, local_shards, lambda leaf, shape: (
        f"global_batch: leaf {leaf} has shape {shape}; its leading dimension (this process's rows) must be a "
        f"multiple of {local_shards}, the number of batch shards on this process's devices; give each process "
        "global batch / process count rows."))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), process_local_batch)
