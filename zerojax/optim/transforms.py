"""Update rules optax does not have in DeepSpeed's (or torch's) form, and the optimizers chained from them.

The transforms follow optax's conventions (`optax.tree` utilities, an `init`/`update` pair per state);
the builders chain them as `optax/_src/alias.py` does. Moments keep DeepSpeed's order of operations,
b·m + (1 − b)·g and b·v + ((1 − b)·g)·g, as its kernels write them: `optax.tree.update_moment` computes
(1 − b)·g^k + b·m, which rounds differently (compiled for CPU, about a quarter of the elements differ in
the last bit), so the results would no longer match earlier runs bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _moments(updates, state: optax.ScaleByAdamState, b1, b2) -> tuple[Any, Any]:
    """DeepSpeed's exponential moving averages of the gradient and of its square."""
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    return mu, nu


def _init_moments(params) -> optax.ScaleByAdamState:
    """A zero step count and zero first and second moments shaped like `params`."""
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                                  optax.tree.zeros_like(params))


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's m / (sqrt(v) + eps) without bias correction (FusedAdam `bias_correction: false`)."""

    def update(updates, state, params=None):
        mu, nu = _moments(updates, state, b1, b2)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(_init_moments, update)


def scale_by_ds_lamb(b1: float, b2: float, eps: float, eps_inside_sqrt: bool, weight_decay: float,
                     bias_correction: bool, max_coeff: float, min_coeff: float) -> optax.GradientTransformation:
    """DeepSpeed FusedLamb's direction: u = m / denom + wd·p (m, v not bias-corrected), scaled by the
    per-tensor trust ratio ‖p‖/‖u‖ clamped to [min_coeff, max_coeff] (1 if either norm is 0) and by
    sqrt(1 − b2^t) / (1 − b1^t) when `bias_correction`."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Lamb needs the parameters: call update(grads, state, params).")
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else 1.0
        mu, nu = _moments(updates, state, b1, b2)

        def direction(m, v, p):
            denom = jnp.sqrt(v + eps) if eps_inside_sqrt else jnp.sqrt(v) + eps
            u = m / denom + weight_decay * p
            w_norm, u_norm = jnp.linalg.norm(p.ravel()), jnp.linalg.norm(u.ravel())
            ok = (w_norm != 0) & (u_norm != 0)
            coeff = jnp.where(ok, jnp.clip(w_norm / jnp.where(ok, u_norm, 1.0), min_coeff, max_coeff), 1.0)
            return step * coeff * u

        return jax.tree.map(direction, mu, nu, params), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(_init_moments, update)


class AdagradState(NamedTuple):
    """Adagrad's running sum of squared gradients."""

    sum_of_squares: Any


def scale_by_torch_adagrad(eps: float) -> optax.GradientTransformation:
    """torch/DeepSpeed Adagrad: g / (sqrt(Σ g²) + eps), the sum starting at 0 (optax's starts at 0.1)."""

    def init(params):
        return AdagradState(optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        acc = jax.tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        return jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, acc), AdagradState(acc)

    return optax.GradientTransformation(init, update)


def fused_adam(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
               bias_correction: bool = True, decoupled: bool = True, mask: Any = None) -> optax.GradientTransformation:
    """DeepSpeed FusedAdam: weight decay decoupled (AdamW) or, when not `decoupled`, added to the gradient (L2)."""
    moments = optax.scale_by_adam(b1, b2, eps) if bias_correction else scale_by_adam_uncorrected(b1, b2, eps)
    decay = optax.add_decayed_weights(weight_decay, mask)
    parts = (moments, decay) if decoupled else (decay, moments)
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def fused_lamb(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
               eps_inside_sqrt: bool = False, bias_correction: bool = True, max_coeff: float = 10.0,
               min_coeff: float = 0.01) -> optax.GradientTransformation:
    """DeepSpeed FusedLamb (see `scale_by_ds_lamb`)."""
    return optax.chain(
        scale_by_ds_lamb(b1, b2, eps, eps_inside_sqrt, weight_decay, bias_correction, max_coeff, min_coeff),
        optax.scale_by_learning_rate(learning_rate),
    )


def torch_adagrad(learning_rate: optax.ScalarOrSchedule, eps=1e-10, weight_decay=0.0, *,
                  mask: Any = None) -> optax.GradientTransformation:
    """torch/DeepSpeed Adagrad with L2 weight decay (see `scale_by_torch_adagrad`)."""
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), scale_by_torch_adagrad(eps),
                       optax.scale_by_learning_rate(learning_rate))


def torch_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.0, weight_decay=0.0, *,
              nesterov: bool = False, mask: Any = None) -> optax.GradientTransformation:
    """`torch.optim.SGD` without dampening: L2 weight decay, then optax's SGD (no momentum trace at 0)."""
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(learning_rate, momentum or None, nesterov=nesterov))
