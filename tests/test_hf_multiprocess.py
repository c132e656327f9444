"""Two processes (4 CPU devices each) import a checkpoint at stage 3 and export it, from device memory or
from pinned host memory (an offloaded state): the folder process 0 writes is byte-identical to a
single-process export."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests import hf_tiny
from zerojax.hf import export_hf, load_pretrained, read_config

CHILD = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, rank, src, out, memory = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
import optax
import zerojax as zj
from zerojax import models
from zerojax.hf import export_hf, load_pretrained, read_config

config = read_config(src)
plan = zj.make_plan(models.abstract_model(config)[1], optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3))
params = load_pretrained(src, plan)
params = jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(memory)), params)
assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {memory}
assert jax.device_count() == 8 and not all(x.is_fully_addressable for x in jax.tree.leaves(params))
export_hf(params, config, out, max_shard_size="10KB", progress=False)
print("done", rank)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two extra Python processes: ~15 s on a quiet 2-core machine
@pytest.mark.parametrize("memory", ["device", "pinned_host"])  # pinned_host: an offloaded state
def test_two_process_export_matches_single_process(tmp_path, memory):
    src = tmp_path / "src"
    hf_tiny.torch_model("llama").save_pretrained(src, max_shard_size="8KB")
    config = read_config(src)
    reference = export_hf(
        load_pretrained(src, hf_tiny.stage3_plan(config)), config, tmp_path / "ref", max_shard_size="10KB", progress=False
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(rank), str(src), str(tmp_path / "out"), memory],
                         env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    written = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert written == sorted(f.name for f in reference.iterdir())
    for name in written:
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name
    assert jax.device_count() == 8
