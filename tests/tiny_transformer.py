"""A small pure-JAX causal transformer for the core tests: every tensor divisible by 8."""

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, DIM, HEADS, FFN, LAYERS, SEQ = 64, 32, 4, 64, 2, 8


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.normal(size=shape) * 0.02 / np.sqrt(shape[0] / 32)).astype(np.float32)
    layer = lambda: {
        "ln1": np.ones(DIM, np.float32), "wqkv": normal(DIM, 3 * DIM), "wo": normal(DIM, DIM),
        "ln2": np.ones(DIM, np.float32), "w1": normal(DIM, FFN), "b1": np.zeros(FFN, np.float32),
        "w2": normal(FFN, DIM),
    }
    return {
        "embed": normal(VOCAB, DIM) * 10, "pos": normal(SEQ, DIM) * 10,
        "layers": [layer() for _ in range(LAYERS)],
        "ln_f": np.ones(DIM, np.float32), "head": normal(DIM, VOCAB),
    }


def _norm(x, scale):
    x32 = x.astype(jnp.float32)
    x32 = (x32 - x32.mean(-1, keepdims=True)) * jax.lax.rsqrt(x32.var(-1, keepdims=True) + 1e-5)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def logits(params: dict, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    h = params["embed"][tokens] + params["pos"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for p in params["layers"]:
        q, k, v = jnp.split(_norm(h, p["ln1"]) @ p["wqkv"], 3, axis=-1)
        heads = lambda x: x.reshape(b, t, HEADS, DIM // HEADS)
        s = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)).astype(jnp.float32) / np.sqrt(DIM // HEADS)
        a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1).astype(h.dtype)
        h = h + jnp.einsum("bhqk,bkhd->bqhd", a, heads(v)).reshape(b, t, DIM) @ p["wo"]
        h = h + jax.nn.gelu(_norm(h, p["ln2"]) @ p["w1"] + p["b1"]) @ p["w2"]
    return (_norm(h, params["ln_f"]) @ params["head"]).astype(jnp.float32)


def loss_fn(params: dict, batch: dict) -> jax.Array:
    tokens = batch["tokens"]
    logp = jax.nn.log_softmax(logits(params, tokens[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def batches(steps: int, batch_size: int, seed: int = 1) -> list[dict]:
    """Token batches with learnable structure (each sequence counts up from a random start)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        start = rng.integers(0, VOCAB, size=(batch_size, 1))
        out.append({"tokens": ((start + np.arange(SEQ + 1)) % VOCAB).astype(np.int32)})
    return out
