"""DeepSpeed schedulers and Hugging Face lr_scheduler_type reproduced step for step.

The references below are written from DeepSpeed's `deepspeed/runtime/lr_schedules.py` (v0.19.6) in plain Python floats; the optax schedules are
evaluated in float64 (`jax.enable_x64`) and must agree to 1e-7 relative at steps 0, 1, n−1, n, n+1,
T−1, T, T+10, and in the default float32 to float32 rounding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from zerojax import optim

N, T, LR = 100, 1000, 3e-4
STEPS = (0, 1, N - 1, N, N + 1, T - 1, T, T + 10)


def warmup_gamma(step, n, kind):
    return math.log(step + 1) / math.log(n) if kind == "log" else step / n


def ref_warmup_lr(step, lo, hi, n, kind):
    n = max(2, n)
    gamma = warmup_gamma(step, n, kind) if step < n else 1.0
    return lo + (hi - lo) * gamma


def ref_warmup_decay(step, lo, hi, n, total, kind):
    n = max(2, n)
    gamma = warmup_gamma(step, n, kind) if step < n else max(0.0, (total - step) / max(1, total - n))
    return lo + (hi - lo) * gamma


def ref_warmup_cosine(step, base, n, total, wmin, cmin, kind):
    n = max(2, n)
    if step < n:
        return base * (wmin + warmup_gamma(step, n, kind) * (1 - wmin))
    p = min(1.0, (step - n + 1) / max(1, total - n))
    return base * max(0.0, cmin + (1 - cmin) * (1 + math.cos(math.pi * p)) / 2)


def ref_range_test(step, lo, size, rate, stairs):
    interval = (step + 1) / size
    return lo * (1 + rate * (math.floor(interval) if stairs else interval))


def ref_one_cycle(step, p):
    """DeepSpeed's OneCycle.get_lr at last_batch_iteration = step, transcribed from lr_schedules.py."""
    first = float(p["cycle_first_step_size"])
    second = first if p.get("cycle_second_step_size") is None else float(p["cycle_second_step_size"])
    total, ratio = first + second, first / (first + second)
    s1 = p.get("cycle_first_stair_count", 0)
    s2 = s1 if p.get("cycle_second_stair_count") is None else p["cycle_second_stair_count"]
    lo, hi = p["cycle_min_lr"], p["cycle_max_lr"]
    if step < total:
        b = step + 1
        cycle = math.floor(1 + b / total)
        x = 1.0 + b / total - cycle
        scale, stairs = (x / ratio, s1) if x <= ratio else ((x - 1) / (ratio - 1), s2)
        if stairs > 0:
            pos = b % total
            position = pos * stairs / first if pos <= first else (total - pos) * stairs / second
            scale = math.floor(position) / stairs
        return lo + (hi - lo) * scale
    if math.isclose(p.get("decay_step_size", 0), 0) or math.isclose(p.get("decay_lr_rate", 0), 0):
        return lo
    return lo / (1 + p["decay_lr_rate"] * (step - total + 1) / p["decay_step_size"])


def filled(name, **params):
    return {**optim.SCHEDULER_PARAMS[name], **params}


CASES = [
    ("WarmupLR", filled("WarmupLR", warmup_min_lr=1e-5, warmup_max_lr=LR, warmup_num_steps=N),
     lambda s: ref_warmup_lr(s, 1e-5, LR, N, "log")),
    ("WarmupLR", filled("WarmupLR", warmup_min_lr=0.0, warmup_max_lr=LR, warmup_num_steps=N, warmup_type="linear"),
     lambda s: ref_warmup_lr(s, 0.0, LR, N, "linear")),
    ("WarmupLR", filled("WarmupLR", warmup_num_steps=N), lambda s: ref_warmup_lr(s, 0.0, 0.02, N, "log")),
    ("WarmupDecayLR", filled("WarmupDecayLR", warmup_min_lr=1e-6, warmup_max_lr=LR, warmup_num_steps=N,
                             total_num_steps=T), lambda s: ref_warmup_decay(s, 1e-6, LR, N, T, "log")),
    ("WarmupDecayLR", filled("WarmupDecayLR", warmup_max_lr=LR, warmup_num_steps=N, total_num_steps=T,
                             warmup_type="linear"), lambda s: ref_warmup_decay(s, 0.0, LR, N, T, "linear")),
    ("WarmupCosineLR", filled("WarmupCosineLR", total_num_steps=T, warmup_num_steps=N, warmup_min_ratio=0.1,
                              cos_min_ratio=0.01), lambda s: ref_warmup_cosine(s, 0.02, N, T, 0.1, 0.01, "log")),
    ("WarmupCosineLR", filled("WarmupCosineLR", total_num_steps=T, warmup_num_steps=N, warmup_type="linear"),
     lambda s: ref_warmup_cosine(s, 0.02, N, T, 0.0, 1e-4, "linear")),
    ("LRRangeTest", filled("LRRangeTest", lr_range_test_min_lr=1e-4, lr_range_test_step_size=N,
                           lr_range_test_step_rate=2.0), lambda s: ref_range_test(s, 1e-4, N, 2.0, False)),
    ("LRRangeTest", filled("LRRangeTest", lr_range_test_step_size=N, lr_range_test_staircase=True),
     lambda s: ref_range_test(s, 1e-3, N, 1.0, True)),
]
ONE_CYCLES = [
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2, cycle_first_step_size=N, cycle_second_step_size=T - 2 * N,
         decay_step_size=50, decay_lr_rate=0.1),
    dict(cycle_min_lr=0.004, cycle_max_lr=0.015, cycle_first_step_size=N, cycle_second_step_size=3 * N,
         cycle_first_stair_count=10, cycle_second_stair_count=7, decay_step_size=100, decay_lr_rate=0.01),
    dict(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=N),
]
CASES += [("OneCycle", filled("OneCycle", **p), lambda s, p=p: ref_one_cycle(s, p)) for p in ONE_CYCLES]


@pytest.mark.parametrize("name,params,ref", CASES, ids=[c[0] for c in CASES])
def test_formula_matches_reference_in_float64(name, params, ref):
    with jax.enable_x64(True):
        lr = optim.ds_schedule(name, params, base_lr=0.02)
        for s in STEPS:
            got = float(lr(s))
            assert got == pytest.approx(ref(s), rel=1e-7, abs=1e-300), (name, s)


@pytest.mark.parametrize("name,params,ref", CASES, ids=[c[0] for c in CASES])
def test_float32_schedule_is_the_formula_rounded(name, params, ref):
    lr = optim.ds_schedule(name, params, base_lr=0.02)
    values = jax.jit(jax.vmap(lr))(jnp.asarray(STEPS))
    assert values.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(values), [ref(s) for s in STEPS], rtol=2e-6, atol=1e-12)


def test_optax_timing_follows_deepspeed_step_order():
    """Optimizer step c runs with the value at iteration c − 1; step 0 with the constructor's value."""
    params = filled("WarmupLR", warmup_min_lr=1e-5, warmup_max_lr=LR, warmup_num_steps=N, warmup_type="linear")
    tx = optim.build_optimizer(optim.OptimizerSpec("sgd", optim.OPTIMIZER_PARAMS["sgd"]),
                               optim.optax_schedule("WarmupLR", params, LR))
    w = {"w": jnp.ones(3)}
    state = tx.init(w)
    seen = []
    for _ in range(4):
        _, state = tx.update({"w": jnp.ones(3)}, state, w)
        seen.append(float(state.hyperparams["learning_rate"]))
    expected = [1e-5] + [ref_warmup_lr(i, 1e-5, LR, N, "linear") for i in range(3)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    cosine = optim.optax_schedule("WarmupCosineLR", filled("WarmupCosineLR", total_num_steps=T), 0.02)
    assert float(cosine(0)) == 0.0  # DeepSpeed's WarmupCosineLR starts at 0 before its first step()


def test_one_cycle_momentum_cycle():
    p = filled("OneCycle", **ONE_CYCLES[0])
    mom = optim.one_cycle_momentum(p)
    with jax.enable_x64(True):
        assert float(mom(-1)) == pytest.approx(0.8)  # constructor sets cycle_min_mom
        assert float(mom(N - 1)) == pytest.approx(0.8)  # the lr peak is the momentum trough
        assert float(mom(T - 2 * N + N - 1 + 10)) == pytest.approx(0.9)  # after the cycle: max (no mom decay)
        first = float(mom(9))
        assert first == pytest.approx(0.9 - 0.1 * 10 / N)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_hf_schedules_match_transformers(kind):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = transformers.get_scheduler(kind, opt, num_warmup_steps=N, num_training_steps=T)
    expected = []
    for _ in range(T + 11):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = optim.hf_schedule(kind, LR, T, N)
    with jax.enable_x64(True):
        for s in STEPS:
            assert float(ours(s)) == pytest.approx(expected[s], rel=1e-7, abs=1e-15), (kind, s)


def test_hf_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="max_steps"):
        optim.hf_schedule("linear", LR, None, 10)
    assert float(optim.hf_schedule("constant", LR, None, 0)(5)) == pytest.approx(LR)


def test_scheduler_block_validation():
    problems = []
    assert optim.check_scheduler({"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}, problems)
    assert problems == ["scheduler.params.total_num_steps is required by WarmupCosineLR; add it."]
    problems = []
    optim.check_scheduler({"type": "WarmupLr", "params": {}}, problems)
    assert "did you mean 'WarmupLR'" in problems[0]
    problems = []
    optim.check_scheduler({"type": "WarmupLR", "params": {"warmup_type": "cosine", "warmup_num_step": 5}}, problems)
    assert any("warmup_type='cosine'" in p for p in problems)
    assert any("did you mean 'warmup_num_steps'" in p for p in problems)


def test_optax_schedule_is_jittable():
    sched = optim.optax_schedule("OneCycle", filled("OneCycle", **ONE_CYCLES[1]), 0.0)
    values = jax.jit(jax.vmap(sched))(jnp.arange(5))
    np.testing.assert_allclose(np.asarray(values), [0.004] + [ref_one_cycle(i, ONE_CYCLES[1]) for i in range(4)],
                               rtol=1e-6)
    assert isinstance(optax.inject_hyperparams(optax.sgd)(learning_rate=sched), optax.GradientTransformation)
