"""Collectives read from program text: calls followed, loop bodies counted by their trip counts."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zerojax import hlo


def _mesh_fn(fn, in_spec, out_spec):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    return mesh, jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False))


def test_collectives_counted_through_calls_and_loops():
    """A scan of 5 steps, each gathering a bf16 [4] shard to [32] and reduce-scattering an f32 [32], then one psum."""

    def body(x):
        def step(c, _):
            g = jax.lax.all_gather(x + c.astype(x.dtype), "x", tiled=True)  # bf16 [32]: 64 bytes
            s = jax.lax.psum_scatter(g.astype(jnp.float32) + c, "x", tiled=True)  # operand f32 [32]: 128 bytes
            return c + jnp.sum(s), None

        c, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), None, length=5)
        parts = jax.lax.psum(tuple(jnp.full((3,), c + i) for i in range(7)), "x")  # 2 x 7 x 12 bytes
        return sum(parts)

    mesh, f = _mesh_fn(body, P("x"), P())
    x = jax.ShapeDtypeStruct((32,), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    lowered = f.lower(x)
    low = hlo.lowered_collectives(lowered.as_text())
    assert low == {"all-gather": {"bf16": 5 * 64}, "reduce-scatter": {"f32": 5 * 128}, "all-reduce": {"f32": 7 * 24}}
    comp = hlo.compiled_collectives(lowered.compile().as_text())
    elements = {k: sum(b // hlo._itemsize(d) for d, b in v.items()) for k, v in comp.items()}
    assert elements == {"all-gather": 5 * 32, "reduce-scatter": 5 * 32, "all-reduce": 7 * 6}


def test_step_collectives_add_what_only_the_compiled_program_moves():
    lowered = {"reduce-scatter": {"bf16": 200}}
    compiled = {"reduce-scatter": {"f32": 400}, "all-gather": {"f32": 400}}
    assert hlo.step_collectives(lowered, compiled) == {"all-gather": 200, "reduce-scatter": 200, "all-reduce": 0,
                                                       "all-to-all": 0}


def test_a_compiler_refusal_for_memory_is_a_step_that_does_not_fit():
    """XLA:TPU does not compile a step whose temporaries exceed the chip's memory: the estimator reads
    its message as "does not fit", with the bytes it says the step needs."""
    from zerojax.compiled import DeviceMemoryExceeded, refused_for_memory

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(101.78G) exceeds available HBM (95.74G).")
    refused = refused_for_memory(RuntimeError(message))
    assert isinstance(refused, DeviceMemoryExceeded) and isinstance(refused, ValueError)
    assert refused.temp_bytes == int(101.78 * 2**30) and refused.available_bytes == int(95.74 * 2**30)
    assert "101.78 GiB per device, more than the 95.74 GiB" in str(refused)
    assert refused_for_memory(RuntimeError("INTERNAL: something else")) is None


_UNCOUNTED_LOOP = """HloModule m

%body (p: (u32[], f32[8])) -> (u32[], f32[8]) {
  %p = (u32[], f32[8]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %v = f32[8] get-tuple-element(%p), index=1
  %w = f32[8] BODY_OP
  ROOT %t = (u32[], f32[8]) tuple(%i, %w)
}

%cond (p: (u32[], f32[8])) -> pred[] {
  %p = (u32[], f32[8]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[64] {
  %a = f32[8] parameter(0)
  %z = u32[] constant(0)
  %init = (u32[], f32[8]) tuple(%z, %a)
  %loop = (u32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %ag = f32[64] all-gather(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""


def test_a_loop_of_the_compilers_own_needs_no_trip_count_unless_it_moves_something():
    """XLA:TPU adds while loops whose count its program text does not state (seen in the quantized
    ZeRO++ step): one without collectives is read past; one with a collective is still refused."""
    quiet = _UNCOUNTED_LOOP.replace("BODY_OP", "negate(%v)")
    assert hlo.compiled_collectives(quiet) == {"all-gather": {"f32": 256}}
    busy = _UNCOUNTED_LOOP.replace("BODY_OP", "all-reduce(%v), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%cond")
    with pytest.raises(ValueError, match="no known trip count"):
        hlo.compiled_collectives(busy)
