"""minillm.seams: a technique plugs in a kind and the block, the step and the loop stay.

- a non-dense attention pair and a non-default linear kind train through the
  unchanged ``transformer.block_forward``/``block_backward``: their gradients
  equal float64 central differences of the loss;
- the same kinds decode with their own state: cached == uncached generation;
- per-layer head counts and MLP widths (as structured pruning leaves them) run
  forward, backward, save/load and cached generation;
- bad kinds, shapes and names are refused with a ValueError naming them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import attention as attn
from minillm import gradcheck, kv_cache, seams, train, transformer
from minillm.backend import xp_of
from tests.helpers import assert_close


# --- two kinds a technique could bring -----------------------------------------------
class TransposedLinear(seams.LinearKind):
    """The weight stored transposed, (out, in): y = x @ weight_t^T + b."""

    name = "transposed_test"
    suffixes = trainable = ("weight_t", "bias")

    def specs(self, n_in, n_out, dtype):
        return {"weight_t": ((n_out, n_in), np.dtype(dtype)), "bias": ((n_out,), np.dtype(dtype))}

    def dims(self, lp):
        return tuple(lp["weight_t"].shape[::-1])

    def from_dense(self, w, b):
        return {"weight_t": np.ascontiguousarray(w.T), "bias": b}

    def forward(self, lp, x, name):
        return x @ lp["weight_t"].T + lp["bias"], (x, lp["weight_t"])

    def backward(self, dy, cache):
        x, wt = cache
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return dy @ wt, {"weight_t": dy2.T @ x2, "bias": dy2.sum(axis=0)}


class SharpAttention(seams.AttentionKind):
    """Dense attention with scores doubled (softmax(2 q k^T / sqrt(D))): q scaled by 2,
    then the dense pair and the dense decode state, composed, not copied."""

    name = "sharp_test"

    @staticmethod
    def _sharpen(qkv):
        C = qkv.shape[-1] // 3
        out = qkv.copy()
        out[..., :C] *= 2
        return out

    def forward(self, qkv, n_head, config):
        return attn.self_attention_forward(self._sharpen(qkv), n_head)

    def backward(self, dy, cache):
        return self._sharpen(attn.self_attention_backward(dy, cache))      # d(2q)/dq = 2

    def init_state(self, config, batch_size, max_len, n_head, xp=np):
        return seams.attention_kind("dense").init_state(config, batch_size, max_len, n_head, xp)

    def step(self, qkv, state, pos, n_head, config):
        return attn.append_attend(self._sharpen(qkv), *state, pos, n_head)


seams.register_linear(TransposedLinear())
seams.register_attention(SharpAttention())

CFG64 = mm.GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def nontrivial(cfg, seed=0):
    """GPT-2 init with every parameter moved by noise (LayerNorms off 1/0, biases off 0)."""
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


def batch(cfg, seed=1, B=2, T=None):
    rng = np.random.default_rng(seed)
    T = T or cfg.block_size
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


# --- kinds train through the one block ----------------------------------------------------
@pytest.mark.parametrize("kinds", [dict(attention="sharp_test"), dict(linear="transposed_test"),
                                   dict(attention="sharp_test", linear="transposed_test")],
                         ids=["attention", "linear", "both"])
def test_a_kind_trains_through_the_block_and_its_grads_match_finite_differences(kinds, rng):
    cfg = dataclasses.replace(CFG64, **kinds)
    model = nontrivial(cfg)
    idx, targets = batch(cfg)
    grads = gradcheck.check_model_grads(model, idx, targets, rng, max_entries=5)
    assert set(grads) == set(model.params)                  # every stored parameter trains here
    if "linear" in kinds:
        assert "h.0.attn.c_attn.weight_t" in grads and "h.0.attn.c_attn.weight" not in grads
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 200)      # one training step
    x, y = mm.data.get_batch(ids, 2, cfg.block_size, train.batch_rng(0, 0))
    before = model.loss(x, y)
    res = train.train(model, ids, None, train.TrainConfig(steps=1, batch_size=2, lr=1e-2,
                                                          warmup_steps=0), progress=False)
    assert res.losses == [pytest.approx(before, rel=1e-12)] and model.loss(x, y) < before


def test_a_kind_changes_the_math_and_the_dense_kinds_are_the_baseline():
    dense = nontrivial(CFG64)
    sharp = mm.GPT(dataclasses.replace(CFG64, attention="sharp_test"), params=dict(dense.params))
    idx, _ = batch(CFG64)
    assert not np.allclose(sharp.forward(idx), dense.forward(idx))
    dense_t = {k: v for k, v in dense.params.items()}
    moved = mm.GPT(dataclasses.replace(CFG64, linear="transposed_test"),
                   params=_to_kind(dense_t, CFG64, TransposedLinear()))
    assert_close("transposed == dense", moved.forward(idx), dense.forward(idx))


def _to_kind(params, cfg, kind):
    out = dict(params)
    for i in range(cfg.n_layer):
        for role in seams.LINEAR_ROLES:
            name = f"h.{i}.{role}"
            for s, a in kind.from_dense(out.pop(name + ".weight"), out.pop(name + ".bias")).items():
                out[f"{name}.{s}"] = a
    return out


@pytest.mark.parametrize("kinds", [dict(attention="sharp_test"), dict(linear="transposed_test")],
                         ids=["attention", "linear"])
def test_a_kind_decodes_with_its_state_and_saves_its_name(kinds, tmp_path):
    cfg = dataclasses.replace(CFG64, block_size=16, **kinds)
    model = nontrivial(cfg)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    kw = dict(max_new_tokens=10, temperature=0.9, seed=4)
    np.testing.assert_array_equal(model.generate(prompt, use_cache=True, **kw),
                                  model.generate(prompt, use_cache=False, **kw))
    model.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config == cfg                               # the kind's name is in config.json
    assert_close("reloaded", back.forward(prompt), model.forward(prompt))


# --- per-layer shapes ---------------------------------------------------------------------
def shrink(model, keep_heads: dict, keep_neurons: dict):
    """Remove heads / MLP neurons of some blocks (what structured pruning will do)."""
    cfg, p = model.config, dict(model.params)
    C, D = cfg.n_embd, cfg.head_size
    for i, heads in keep_heads.items():
        h = f"h.{i}.attn."
        cols = np.concatenate([np.arange(j * C + hd * D, j * C + (hd + 1) * D)
                               for j in range(3) for hd in heads])          # q, k, v of kept heads
        rows = np.concatenate([np.arange(hd * D, (hd + 1) * D) for hd in heads])
        p[h + "c_attn.weight"], p[h + "c_attn.bias"] = p[h + "c_attn.weight"][:, cols], p[h + "c_attn.bias"][cols]
        p[h + "c_proj.weight"] = p[h + "c_proj.weight"][rows]
    for i, neurons in keep_neurons.items():
        h = f"h.{i}.mlp."
        p[h + "c_fc.weight"], p[h + "c_fc.bias"] = p[h + "c_fc.weight"][:, neurons], p[h + "c_fc.bias"][neurons]
        p[h + "c_proj.weight"] = p[h + "c_proj.weight"][neurons]
    return mm.GPT(cfg, params={k: np.ascontiguousarray(v) for k, v in p.items()})


@given(heads0=st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
       neurons1=st.lists(st.integers(0, 31), min_size=1, max_size=20, unique=True),
       seed=st.integers(0, 100))
@settings(deadline=None, max_examples=8)
def test_per_layer_heads_and_widths_forward_backward_decode(heads0, neurons1, seed):
    cfg = mm.GPTConfig(vocab_size=19, block_size=10, n_layer=2, n_head=4, n_embd=8, dtype="float64")
    model = shrink(nontrivial(cfg, seed), {0: sorted(heads0)}, {1: sorted(neurons1)})
    assert model.block_dims(0) == (len(heads0), 32) and model.block_dims(1) == (4, len(neurons1))
    idx, targets = batch(cfg, seed)
    gradcheck.check_model_grads(model, idx, targets, np.random.default_rng(seed), max_entries=3)
    cache = kv_cache.KVCache.for_model(model, 2, 10)
    assert [state[0].shape[1] for state in cache.layers] == [len(heads0), 4]
    assert cache.nbytes == 2 * 2 * 10 * 2 * 8 * (len(heads0) + 4)   # 2 B S D itemsize sum(H_i)
    prompt = idx[:, :3]
    kw = dict(max_new_tokens=7, temperature=0)
    np.testing.assert_array_equal(model.generate(prompt, use_cache=True, **kw),
                                  model.generate(prompt, use_cache=False, **kw))


def test_per_layer_shapes_save_and_load(tmp_path):
    model = shrink(nontrivial(CFG64), {1: [1]}, {0: [0, 5, 7]})
    model.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert [back.block_dims(i) for i in range(2)] == [(2, 3), (1, 32)]
    idx, _ = batch(CFG64)
    assert_close("reloaded", back.forward(idx), model.forward(idx))


# --- the split loss seam ---------------------------------------------------------------------
def test_forward_train_and_backward_give_loss_and_grads(rng):
    model = nontrivial(CFG64)
    idx, targets = batch(CFG64)
    loss, grads = model.loss_and_grads(idx, targets)
    logits, cache = model.forward_train(idx)
    assert_close("logits", logits, model.forward(idx))
    # any loss on the logits: here 0.5 * sum(logits^2) has dlogits = logits
    g2 = model.backward(logits, cache)
    f = lambda: 0.5 * float((model.forward(idx) ** 2).sum())              # noqa: E731
    gradcheck.check_grads("sum of squares", f, [model.params["h.1.mlp.c_fc.weight"]],
                          [g2["h.1.mlp.c_fc.weight"]], rng=rng, max_entries=6)
    assert set(grads) == set(g2) == set(model.params)


def test_backward_refuses_dlogits_of_the_wrong_shape_or_dtype():
    model = nontrivial(CFG64)
    logits, cache = model.forward_train(batch(CFG64)[0])
    with pytest.raises(ValueError, match="dlogits has shape"):
        model.backward(logits[:, :-1], cache)
    with pytest.raises(ValueError, match="dtype"):
        model.backward(logits.astype(np.float32), cache)


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_kinds_are_refused_naming_them():
    with pytest.raises(ValueError, match="attention='nope'.*known: .*dense"):
        mm.GPTConfig(attention="nope")
    with pytest.raises(ValueError, match="linear='int3'"):
        mm.GPTConfig(linear="int3")
    with pytest.raises(ValueError, match="string"):
        mm.GPTConfig(attention=["dense"])
    with pytest.raises(ValueError, match="AttentionKind"):
        seams.register_attention(TransposedLinear())


def test_a_param_whose_shape_fits_no_layout_is_named():
    p = dict(nontrivial(CFG64).params)
    p["h.1.attn.c_attn.weight"] = np.zeros((8, 25))
    p["h.1.attn.c_attn.bias"] = np.zeros(25)
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn.*3 \* n_heads \* head_size"):
        mm.GPT(CFG64, params=p)
    p = dict(nontrivial(CFG64).params)
    p["h.0.mlp.c_proj.weight"] = np.zeros((31, 8))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_proj\.weight.*shape"):
        mm.GPT(CFG64, params=p)
    p = dict(nontrivial(CFG64).params)
    del p["h.0.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.bias"):
        mm.GPT(CFG64, params=p)
    cfg_t = dataclasses.replace(CFG64, linear="transposed_test")   # dense names, another kind
    with pytest.raises(ValueError, match="weight_t"):
        mm.GPT(cfg_t, params=dict(nontrivial(CFG64).params))


def test_block_forward_is_the_one_block_the_kv_cache_runs():
    """The KV cache swaps only the attention step of transformer.block_forward."""
    model = nontrivial(CFG64)
    idx, _ = batch(CFG64, T=5)
    x, _ = mm.layers.embedding_forward(idx, model.params["wte.weight"], model.params["wpe.weight"])
    ref, _ = transformer.block_forward(x, model.params, 0, CFG64)
    cache = kv_cache.KVCache.for_model(model, 2, 5)
    k, v = cache.layers[0]
    got, _ = transformer.block_forward(
        x, model.params, 0, CFG64,
        attention=lambda qkv, n: (attn.append_attend(qkv, k, v, np.zeros(2, np.int64), n), None))
    assert_close("block over the cache", got, ref)
    assert xp_of(got) is np


def test_save_hf_refuses_what_gpt2_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="attention='sharp_test'"):
        mm.GPT(dataclasses.replace(CFG64, attention="sharp_test")).save_hf(tmp_path / "a")
    with pytest.raises(ValueError, match="block dims"):
        shrink(nontrivial(CFG64), {0: [0]}, {}).save_hf(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_kind_brings_its_training_hooks(rng):
    """A linear kind whose ``train_hooks`` keeps some weights at zero: ``train`` runs it
    without being told (a pruned model fine-tunes with plain ``train``)."""
    class ZeroFirstRow(train.TrainHook):
        name = "zero_first_row"

        def after_update(self, model, step, record):
            for i in range(model.config.n_layer):
                model.params[f"h.{i}.mlp.c_fc.weight_t"][:, 0] = 0

    class Pinned(TransposedLinear):
        name = "pinned_test"

        def train_hooks(self, model):
            return [ZeroFirstRow()]

    seams.register_linear(Pinned())
    cfg = dataclasses.replace(CFG64, linear="pinned_test")
    model = nontrivial(cfg)
    ids = rng.integers(0, cfg.vocab_size, 200)
    train.train(model, ids, None, train.TrainConfig(steps=2, batch_size=2, warmup_steps=0),
                progress=False)
    assert all((model.params[f"h.{i}.mlp.c_fc.weight_t"][:, 0] == 0).all() for i in range(2))
    assert (model.params["h.0.mlp.c_fc.weight_t"][:, 1] != 0).all()
