"""The Flax NNX models: configuration from Hugging Face dicts, scan/remat, loss and greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import hf_tiny
from zerojax import models
from zerojax.hf import load_pretrained


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("llama", "mistral", "gpt2"):
        hf_tiny.torch_model(name).save_pretrained(root / name)
        config = hf_tiny.hf_config(name)
        # Placed on one device: these tests check the model, not the sharding (and compile faster so).
        out[name] = config, jax.device_get(load_pretrained(root / name, hf_tiny.stage3_plan(config)))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scanned_and_unrolled_layers_agree(imported, name):
    config, params = imported[name]
    scanned, _ = models.abstract_model(config)
    unrolled, _ = models.abstract_model(config, scan_layers=False)
    ids = jnp.asarray(hf_tiny.token_ids())
    np.testing.assert_allclose(
        hf_tiny.jitted_logits(scanned, params, ids), hf_tiny.jitted_logits(unrolled, params, ids), rtol=0, atol=1e-5
    )


def test_remat_keeps_gradients(imported):
    config, params = imported["llama"]
    ids = jnp.asarray(hf_tiny.token_ids())

    def grads(**kw):
        graphdef, _ = models.abstract_model(config, **kw)
        return jax.tree.leaves(jax.jit(jax.grad(models.causal_lm_loss(graphdef)))(params, {"input_ids": ids}))

    reference = grads()
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in reference)
    for policy in ("dots_saveable", "offload"):  # offload: the layer inputs kept in host memory
        for a, b in zip(reference, grads(remat=policy)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_loss_matches_transformers_with_padding(imported, name):
    config, params = imported[name]
    graphdef, _ = models.abstract_model(config)
    ids = hf_tiny.token_ids(batch=3, length=10, seed=4).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        theirs = hf_tiny.torch_model(name)(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(labels)
        ).loss.item()
    loss_fn = jax.jit(models.causal_lm_loss(graphdef))
    ours = float(loss_fn(params, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}))
    assert abs(ours - theirs) < 1e-5
    unmasked = float(loss_fn(params, {"input_ids": jnp.asarray(ids)}))
    assert abs(unmasked - ours) > 1e-3  # the mask changes the loss, so the comparison above is not vacuous


def test_generate_matches_transformers(imported):
    """Greedy decoding past Mistral's sliding window (5) gives transformers' tokens."""
    config, params = imported["mistral"]
    graphdef, _ = models.abstract_model(config)
    prompt = hf_tiny.token_ids(batch=2, length=3, seed=5).astype(np.int64)
    ours = np.asarray(models.generate(graphdef, params, jnp.asarray(prompt), 10))
    with torch.no_grad():
        theirs = hf_tiny.torch_model("mistral").generate(
            torch.as_tensor(prompt, dtype=torch.long), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=10, do_sample=False,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours[:, 3:])) > 2


@pytest.mark.parametrize("name", list(hf_tiny.CONFIGS))
def test_abstract_model_has_the_pytorch_parameter_count(name):
    graphdef, params = models.abstract_model(hf_tiny.hf_config(name))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == sum(p.numel() for p in hf_tiny.torch_model(name).parameters())


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, r"model_type='bert' is unsupported.*supports model_type in \['gpt2', 'llama', 'mistral', 'qwen2'\]"),
    ({"model_type": None, "architectures": ["T5Model"]}, r"architectures=\['T5Model'\].*GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, r"rope_type='yarn' is unsupported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is unsupported"),
    ({"hidden_size": None}, r"required field 'hidden_size' is missing"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window"),
])
def test_config_errors_name_the_field(change, message):
    config = {k: v for k, v in dict(hf_tiny.hf_config("llama"), **change).items() if v is not None}  # None: drop
    with pytest.raises(ValueError, match=message):
        models.from_hf_config(config)


def test_architectures_pick_the_model_and_remat_is_checked():
    config = {k: v for k, v in hf_tiny.hf_config("gpt2").items() if k != "model_type"}
    assert type(nnx.eval_shape(lambda: models.from_hf_config(config))) is models.gpt2.GPT2
    with pytest.raises(ValueError, match=r"remat='dots' is not a rematerialisation policy.*dots_saveable"):
        models.from_hf_config(config, remat="dots")


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "mistral"])  # mistral: blocks and a window
def test_query_blocked_attention_equals_whole_attention(imported, name, monkeypatch):
    from zerojax.models import layers

    config, params = imported[name]
    graphdef, _ = models.abstract_model(config)
    ids = jnp.asarray(hf_tiny.token_ids(batch=2, length=16, seed=5))
    mask = jnp.ones_like(ids).at[1, 11:].set(0)
    loss_fn = models.causal_lm_loss(graphdef)
    batch = {"input_ids": ids, "attention_mask": mask}
    whole = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 4)  # 16 queries in 4 blocks (mistral: window 5 spans blocks)
    blocked = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), whole, blocked)
