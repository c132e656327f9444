"""Tests that fail on broken code: each one was written for a mutation of zerojax that the rest of the
suite let through, and is checked to fail on that mutation (issue 18, item 5).

Every mutation tried: one small semantic change to zerojax at a time, in a private copy, run against
the test modules that cover the code it changes. "before" is what the suite caught without this module.

| id | mutation | before | caught by |
|----|----------|--------|-----------|
| R1 | rules `opt_state_layouts`: no optimizer-state leaf follows its parameter (own-shape layout) | passed (test_rules; 37 tests suite-wide, issue 18) | test_rules::test_optimizer_state_follows_its_parameter (fixed), test_optimizer_state_takes_its_parameters_layout_not_one_of_its_own_shape |
| R2 | rules `_axes`: stage 2 gradients replicated | test_rules::test_stage_layouts | |
| R3 | rules: ZeRO axes on the last free dimension, not the first | test_rules::test_stage_layouts | |
| R4 | rules: a stacked tensor's layer axis may be sharded | test_rules::test_first_divisible_free_dimension_and_base_spec_kept | also test_optimizer_state_takes_its_parameters_layout_not_one_of_its_own_shape |
| R5 | rules: persistence threshold compared with the whole stack, not one layer | passed (test_rules, test_memory, test_parity scanned) | test_stacked_persistence_threshold_counts_one_layer |
| R6 | rules: hpZ parameters sharded over every data axis | test_rules::test_hierarchies | |
| R7 | rules: MiCS shards over every data axis | test_rules::test_hierarchies | |
| R8 | rules: persistence threshold `<=` as `<` (DeepSpeed keeps `ds_numel <= threshold` whole) | passed | test_rules::test_indivisible_replicated_and_threshold (boundary case) |
| Z1 | zeropp: a block's scale from the max alone (a fused max drops NaN on XLA:CPU) | passed (eager quantizer tests) | test_zeropp::test_qwz_and_qgz_together_keep_the_gradient_and_the_non_finite_skip |
| S1 | step: `mode="host"` runs the streamed (device) update | passed (test_offload, test_estimate; issue 18) | test_host_mode_runs_the_update_on_the_host_and_streamed_on_the_device |
| S2 | step: no all-reduce over the axes a leaf is replicated on (stage 0, MiCS) | test_parity | |
| S3 | step: loss metric not averaged over ranks | test_parity | also test_sgd_steps_match_plain_jax_on_one_device |
| S4 | step: clip coefficient without `min(1, .)` | test_parity, by rounding drift only (both sides run the mutant) | test_sgd_steps_match_plain_jax_on_one_device[3-100.0] |
| S5 | step: no gradient clipping | passed (test_parity, test_numerics, test_token_loss) | test_sgd_steps_match_plain_jax_on_one_device[1-0.2] |
| S6 | step: summed gradient not divided by the micro-batch count | test_parity, by rounding drift only (1 weight of 3072 past rtol 1e-4) | test_sgd_steps_match_plain_jax_on_one_device |
| S7 | step: loss metric = the last micro-batch's | test_parity | also test_sgd_steps_match_plain_jax_on_one_device |
| S8 | step: a non-finite step is applied | test_numerics | |
| S9 | step: skipped steps not counted | test_numerics | |
| S10 | step: finiteness read from the first gradient leaf only | passed (test_numerics, test_loss_scale) | test_one_non_finite_gradient_tensor_skips_the_whole_step |
| S11 | step: the loss scale is not divided out of the gradients | passed (test_numerics, test_loss_scale: Adam hides a constant factor) | test_loss_scale_is_divided_out_of_the_update |
| S12 | step: gradient carriers (reduce-scatter) in the accumulation dtype, not the reduce dtype | test_estimate::test_compiled_step_matches_analytic_and_collective_theory | |
| S13 | step: the accumulator keeps the last micro-batch only | test_parity | also test_sgd_steps_match_plain_jax_on_one_device |
| S14 | step: clip coefficient applied twice | test_parity, by rounding drift only | test_sgd_steps_match_plain_jax_on_one_device[1-0.2] |
| S15 | step: hpZ gradients not scattered beyond the parameter group | test_parity[3-2-hpz] | |
| S16 | step: every rank draws the same dropout key | passed (test_dropout) | test_each_step_rank_and_micro_batch_draws_its_own_dropout_key |
| S18 | step: stage 1 skips the final scatter to the optimizer layout | test_parity[1-1-none] | |
| S19 | step: a step is skipped only when every gradient leaf is non-finite | passed (test_numerics, test_loss_scale) | test_one_non_finite_gradient_tensor_skips_the_whole_step |
| S23 | step: stage 3 gathers in the master dtype | test_hlo::test_stage3_gathers_in_bf16_in_the_lowered_program | |
| S24 | step: new parameters not cast to the compute dtype | test_memory::test_compiled_step_holds_gradient_at_stage_size | |
| S25 | step: every micro-batch of a rank draws the same key | passed (test_dropout) | test_each_step_rank_and_micro_batch_draws_its_own_dropout_key |
| S26 | step: every step draws the same keys | passed (test_dropout) | test_each_step_rank_and_micro_batch_draws_its_own_dropout_key |
| S28 | step: eval loss summed over ranks, not averaged | test_token_loss | |
| S29 | step: summed gradient not divided by the rank count | test_parity | also test_sgd_steps_match_plain_jax_on_one_device |
| P1 | precision: the scale grows after 0 clean steps | test_loss_scale | |
| P2 | precision: no `min_scale` floor | test_loss_scale | |
| P3 | precision: no hysteresis | test_loss_scale | |
| P4 | precision: `consecutive_hysteresis` ignored | test_loss_scale | |
| P5 | precision: default reduce dtype fp32 instead of the compute dtype | test_estimate::test_compiled_step_matches_analytic_and_collective_theory | |
| P6 | precision: back-off divides by 4 | test_loss_scale | |
| P7 | precision: `Precision.fp16()` without a loss scaler | passed (test_loss_scale, test_numerics) | test_fp16_scales_the_loss_dynamically_by_default |
| P8 | precision: default accumulation dtype bf16 | test_memory::test_compiled_step_holds_gradient_at_stage_size | |
| O1 | offload: `ratio` < 1 moves the smallest leaves first | passed (test_offload) | test_partial_offload_moves_the_largest_leaves |
| O2 | offload: `on_device` leaves host leaves in host memory | test_offload (JAX refuses to trace: mixed memory spaces) | |
| O3 | offload: `to_memory` leaves leaves where they are (host mode) | test_offload[stage2-host] (same refusal) | |
| O4 | plan: `Offload(params=...)` ignored | test_offload | |
| O6 | offload: host bytes counted for one local device | test_offload::test_offloaded_state_larger_than_the_machine_is_refused_before_it_is_allocated | |
| O7 | offload: pinned bytes above the machine's RAM not refused | same test | |
| T1 | trainer: builds stage 0 whatever the config says | passed (test_trainer) | test_trainer::test_every_stage_trains_the_same_curve (fixed) |
| T2 | trainer: drops `offload_optimizer` | passed (test_trainer) | test_trainer::test_every_stage_trains_the_same_curve (fixed) |

Not caught, on purpose:
- offload: `offloaded_leaves` stopping at `moved > ratio * total` instead of `>=` (one more leaf when the
  bytes land exactly on the ratio): DeepSpeed's `ratio` is itself approximate (whole parameter groups).
- Mutations that XLA:CPU cannot tell apart from the real thing at run time (one memory space): where
  the update runs is read from the lowered program instead (S1), never from memory statistics.

Everything here is shapes, shardings, memory kinds and small compiled steps of a tiny model (fp32 where
the numbers are compared): about 30 s of CPU for the module. "before" for T1/T2 was run at 8381cc8 (the
Trainer then built its plan in trainer.py); every "caught by" was rerun at 67710d5.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import zerojax as zj
from tests import tiny_transformer as tiny


def _plan(params, tx, rules, precision=zj.Precision(), base_specs=None, stacked=(), offload=None):
    """`make_plan`, the top-level subtrees named in `stacked` being stacked layers (said in one place: as
    a pytree prefix of bools, `make_plan(stacked=...)`, or by path prefix, `make_plan(scanned=...)`)."""
    if "stacked" in inspect.signature(zj.make_plan).parameters:
        where = {"stacked": {key: key in stacked for key in params}}
    else:
        where = {"scanned": tuple(stacked)}
    return zj.make_plan(params, tx, rules, precision, base_specs=base_specs, offload=offload, **where)


def _weights(state):
    """The weights the optimizer updates: the master copy where one is kept, else the parameters."""
    return state.params if state.master is None else state.master


# -- layouts: optimizer state follows its parameter; the layer axis is never sharded ------------------

def _tp_and_stacked():
    """Leaves whose own-shape layout differs from their parameter's: a tensor-parallel matrix (the ZeRO
    axes must leave its 'tensor' dimension alone) and stacked layers whose layer count (4) the fsdp axis
    (4 ways) divides (the layer axis must stay whole)."""
    shapes = {"embed": (64, 32), "head": (32, 64), "layers": {"w": (4, 16, 32), "b": (4, 32)}}
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    specs = {"embed": P(None, "tensor"), "head": P("tensor", None), "layers": {"w": P(), "b": P()}}
    return params, specs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_state_takes_its_parameters_layout_not_one_of_its_own_shape(stage):
    params, specs = _tp_and_stacked()
    mesh = zj.make_mesh(tensor=2)  # fsdp = 4
    plan = _plan(params, optax.adamw(1e-3), zj.ZeroRules(mesh, stage=stage), zj.Precision.bf16(), specs,
                 stacked=("layers",))
    state = plan.abstract_state()
    weights = _weights(state)
    adam = state.opt_state[0]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, w: _same_sharding(m.sharding, w.sharding), moments, weights)
    assert weights["embed"].sharding.spec == P("fsdp", "tensor")
    assert weights["head"].sharding.spec == P("tensor", "fsdp")
    for leaf in jax.tree.leaves((state.params["layers"], weights["layers"], adam.mu["layers"], adam.nu["layers"])):
        assert leaf.sharding.spec[0] is None, f"the layer axis is sharded: {leaf.sharding.spec}"


def _same_sharding(got, want):
    assert got == want, f"optimizer state in {got.spec}, its parameter in {want.spec}"


def test_stacked_persistence_threshold_counts_one_layer():
    """DeepSpeed's stage3_param_persistence_threshold is per parameter: for a stacked tensor, one
    layer's slice. A bias of 32 a layer stays whole under a threshold of 100, though the stack has 128."""
    params, specs = _tp_and_stacked()
    rules = zj.ZeroRules(zj.make_mesh(tensor=2), stage=3, persistence_threshold=100)
    state = _plan(params, optax.adamw(1e-3), rules, zj.Precision.bf16(), specs, stacked=("layers",)).abstract_state()
    assert state.params["layers"]["b"].sharding.spec == P(None, None)  # persistent: gathered never
    assert state.params["layers"]["w"].sharding.spec == P(None, "fsdp", None)  # 512 a layer: sharded
    assert state.opt_state[0].mu["layers"]["b"].sharding.spec == P(None, "fsdp")  # its moments still sharded


# -- offload ---------------------------------------------------------------------------------------

def test_partial_offload_moves_the_largest_leaves():
    """offload_optimizer.ratio < 1 moves the largest optimizer-state leaves first: every leaf left on the
    device is no larger than any leaf in host memory, and the host holds at least `ratio` of the bytes."""
    params = tiny.init_params()
    plan = _plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=2), zj.Precision.bf16(),
                 offload=zj.Offload("pinned_host", ratio=0.5))
    state = plan.abstract_state()
    leaves = jax.tree.leaves((state.master, state.opt_state))
    size = lambda x: x.size * x.dtype.itemsize
    host = [size(x) for x in leaves if x.sharding.memory_kind == "pinned_host"]
    device = [size(x) for x in leaves if x.sharding.memory_kind == "device"]
    assert host and device
    assert max(device) <= min(host), (sorted(device), sorted(host))
    assert sum(host) >= 0.5 * (sum(host) + sum(device))


def _lowered(stage, offload):
    params = tiny.init_params()
    plan = _plan(params, optax.adamw(1e-2), zj.ZeroRules(zj.make_mesh(), stage=stage), zj.Precision.bf16(),
                 offload=offload)
    return zj.make_train_step(tiny.loss_fn, plan).lower(plan.abstract_state(), tiny.batches(1, 16)[0]).as_text()


def test_host_mode_runs_the_update_on_the_host_and_streamed_on_the_device():
    """mode='host' is DeepSpeed's CPU optimizer: the step's update is computed on the host (XLA's
    host compute type on its operations); 'streamed' computes nothing on the host."""
    host_ops = lambda text: text.count('_xla_compute_type = "host"')
    assert host_ops(_lowered(2, zj.Offload("pinned_host", mode="host"))) > 0
    assert host_ops(_lowered(2, zj.Offload("pinned_host", mode="streamed"))) == 0


# -- numerics against an unsharded reference ------------------------------------------------------------

LR, STEPS = 0.3, 3


def _reference(max_grad_norm):
    """Plain JAX on one device: the gradient of the global batch's mean loss, clipped by global norm as
    DeepSpeed clips (coefficient min(1, max / (norm + 1e-6))), an SGD step."""
    params = jax.tree.map(jnp.asarray, tiny.init_params())
    grad_fn = jax.jit(jax.value_and_grad(tiny.loss_fn))
    losses, norms = [], []
    for batch in tiny.batches(STEPS, 16):
        loss, grads = grad_fn(params, batch)
        norm = optax.global_norm(grads)
        coef = jnp.minimum(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0
        params = jax.tree.map(lambda p, g: p - LR * coef * g, params, grads)
        losses.append(float(loss))
        norms.append(float(norm))
    return params, np.array(losses), np.array(norms)


def _zero_run(stage, max_grad_norm, precision=zj.Precision(), micro_batches=2):
    params = tiny.init_params()
    plan = _plan(params, optax.sgd(LR), zj.ZeroRules(zj.make_mesh(), stage=stage), precision)
    state = zj.init_state(params, plan)
    step = zj.make_train_step(tiny.loss_fn, plan, micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    losses, norms = [], []
    for batch in tiny.batches(STEPS, 16):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, np.array(losses), np.array(norms)


# grad norms of the tiny model's first steps are about 1.5-2: 0.2 clips every step, 100 none
@pytest.mark.parametrize("stage,max_grad_norm", [(1, 0.2), (3, 100.0)])
def test_sgd_steps_match_plain_jax_on_one_device(stage, max_grad_norm):
    """With SGD (whose step is proportional to the gradient, unlike Adam's) the sharded step over 8 devices
    and 2 micro-batches gives what one device computes for the whole batch: the same mean loss, the same
    gradient norm (before clipping), and the same weights after clipping and the update."""
    want_params, want_losses, want_norms = _reference(max_grad_norm)
    state, losses, norms = _zero_run(stage, max_grad_norm)
    assert losses[-1] < losses[0]
    if max_grad_norm:
        assert (want_norms > max_grad_norm).all() if max_grad_norm < 1 else (want_norms < max_grad_norm).all()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_loss_scale_is_divided_out_of_the_update():
    """fp16 steps scaled by 2**10 update the weights as steps scaled by 1 do, up to fp16 rounding of the
    backward pass (which the scale is there to improve), and report the same unscaled gradient norm."""
    start = jax.tree.leaves(tiny.init_params())
    runs = {scale: _zero_run(3, 0.0, zj.Precision.fp16(zj.LossScale(static=scale)), micro_batches=1)
            for scale in (1.0, 1024.0)}
    np.testing.assert_allclose(runs[1024.0][2], runs[1.0][2], rtol=1e-3)
    update = {scale: np.concatenate([(np.asarray(w, np.float32) - w0).ravel() for w, w0 in
                                     zip(jax.tree.leaves(_weights(state)), start)]) for scale, (state, _, _) in runs.items()}
    assert np.linalg.norm(update[1024.0] - update[1.0]) <= 1e-2 * np.linalg.norm(update[1.0])


def test_one_non_finite_gradient_tensor_skips_the_whole_step():
    """A nan in the gradient of a single tensor (here the last one in tree order) skips the step for every
    tensor and counts it."""
    params = tiny.init_params()
    plan = _plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=2))
    state = zj.init_state(params, plan)
    assert jax.tree_util.tree_flatten_with_path(params)[0][-1][0][-1].key == "pos"

    def loss_fn(p, batch):  # `poison` reaches only the gradient of params["pos"]
        return tiny.loss_fn(p, batch) + batch["poison"][0] * jnp.sum(p["pos"])

    step = zj.make_train_step(loss_fn, plan)
    for i, batch in enumerate(tiny.batches(2, 16)):
        before = jax.device_get(state)
        poison = np.full((16,), np.nan if i == 1 else 0.0, np.float32)
        state, metrics = step(state, dict(batch, poison=poison))
        assert bool(metrics["skipped"]) == (i == 1)
    jax.tree.map(np.testing.assert_array_equal, (before.params, before.opt_state), jax.device_get((state.params,
                                                                                                 state.opt_state)))
    assert int(state.skipped) == 1 and int(state.step) == 2


def test_finite_gradients_whose_norm_overflows_fp32_skip_the_step():
    """Gradients that are each finite (1e20) but whose squares overflow fp32 skip the step, as DeepSpeed's
    overflow check (the fp32 sum of each gradient) would; the same gradients at 1e10 are applied."""
    params = tiny.init_params()
    plan = _plan(params, optax.adam(1e-3), zj.ZeroRules(zj.make_mesh(), stage=2))

    def loss_fn(p, batch):  # d/d(pos) = `big` everywhere
        return tiny.loss_fn(p, batch) + batch["big"][0] * jnp.sum(p["pos"])

    step = zj.make_train_step(loss_fn, plan)
    batch = next(iter(tiny.batches(1, 16)))
    for big, skipped in ((1e20, True), (1e10, False)):
        state = zj.init_state(params, plan)
        before = jax.device_get(state)
        state, metrics = step(state, dict(batch, big=np.full((16,), big, np.float32)))
        assert bool(metrics["skipped"]) is skipped
        assert math.isfinite(float(metrics["grad_norm"])) is not skipped
        same = jax.tree.leaves(jax.tree.map(np.array_equal, before.params, jax.device_get(state.params)))
        assert all(same) is skipped


def test_fp16_scales_the_loss_dynamically_by_default():
    """`Precision.fp16()` is DeepSpeed's fp16 block without settings: a dynamic loss scale from 2**16."""
    params = tiny.init_params()
    plan = _plan(params, optax.sgd(LR), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.fp16())
    state = zj.init_state(params, plan)
    assert float(state.loss_scale.scale) == 2.0**16


def test_each_step_rank_and_micro_batch_draws_its_own_dropout_key():
    """With rng=True every micro-batch of every rank at every step gets its own key: a gradient that is a
    random 0/1 mask per micro-batch averages 16 different masks (8 ranks x 2 micro-batches), and the next
    step, called with the same key, draws other masks."""
    params = {"w": np.zeros((64, 64), np.float32)}
    plan = _plan(params, optax.sgd(1.0), zj.ZeroRules(zj.make_mesh(), stage=2))

    def loss_fn(p, batch, key):  # d loss / d w: this micro-batch's mask
        return jnp.sum(p["w"] * jax.random.bernoulli(key, 0.5, p["w"].shape)) + 0 * jnp.sum(batch["x"])

    step = zj.make_train_step(loss_fn, plan, micro_batches=2, rng=True)
    state, batch, key = zj.init_state(params, plan), {"x": np.zeros((16, 1), np.float32)}, jax.random.key(0)
    weights = [np.zeros((64, 64), np.float32)]
    for _ in range(2):
        state, _ = step(state, batch, key)
        weights.append(np.asarray(state.params["w"]))
    ones = [np.round((before - after) * 16) for before, after in zip(weights, weights[1:])]  # SGD, rate 1
    for count in ones:  # 16 masks: from 0 to 16 ones per element; one key per rank: even; one per step: 0, 8, 16
        assert len(np.unique(count)) > 9 and (count % 2 == 1).any(), np.unique(count)
    assert (ones[0] != ones[1]).mean() > 0.5
