"""minillm.sparse_attention: window, strided and block attention.

- the masks are the issue's definitions, checked entry by entry against plain loops;
- the chunked kernel equals dense attention with the pattern's mask, forward and
  backward (hypothesis over T, window, stride, block, n_global), and its backward
  equals float64 central differences; window >= T is dense attention;
- the output at position i does not move when keys outside its pattern do;
- the kinds train through the model (finite differences), decode with their own
  state (cached == uncached; the ring buffer == the full cache), save and load,
  run on the device stand-in; bad settings are refused naming the field.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import attention as attn
from minillm import backend, gradcheck, kv_cache
from minillm import sparse_attention as sa
from minillm.cli import main
from minillm.generation import generate_batch
from tests.helpers import assert_close, host_device_pair, sparse_patterns

KINDS = {"window": dict(attention="window", window=3),
         "strided": dict(attention="strided", stride=3, window=2),
         "block": dict(attention="block", block=3, n_global=2)}
CFG64 = mm.GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def allowed_by_definition(p: sa.Pattern, i: int, j: int) -> bool:
    """The issue's text, one pair at a time."""
    if j > i:
        return False
    if p.name == "window":
        return j > i - p.window
    if p.name == "strided":
        local = p.window if p.window is not None else p.stride
        return i - j < local or (i - j) % p.stride == 0
    return j // p.block in (i // p.block, i // p.block - 1) or j < p.n_global


patterns = sparse_patterns(40)


def qkv(rng, B, H, T, D, dtype="float64"):
    return tuple(rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(3))


# --- the patterns --------------------------------------------------------------------------------
@given(p=patterns, T=st.integers(1, 40))
@settings(deadline=None, max_examples=60)
def test_masks_are_the_definitions(p, T):
    want = np.array([[allowed_by_definition(p, i, j) for j in range(T)] for i in range(T)])
    np.testing.assert_array_equal(p.mask(T), want)
    assert p.mask(T).diagonal().all()                       # a query always sees itself


@given(p=patterns, T=st.integers(1, 70), B=st.integers(1, 2), H=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=60)
def test_chunked_kernel_equals_masked_dense_forward_and_backward(p, T, B, H, seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, B, H, T, 4)
    y, cache = sa.sparse_attention_forward(q, k, v, p)
    y_ref, cache_ref = sa.masked_attention_forward(q, k, v, p.mask(T))
    assert_close("y", y, y_ref)
    dy = rng.standard_normal(y.shape)
    for name, g, r in zip("qkv", sa.sparse_attention_backward(dy, cache),
                          sa.masked_attention_backward(dy, cache_ref)):
        assert_close(f"d{name}", g, r)


@pytest.mark.parametrize("p", [sa.Pattern("window", 5), sa.Pattern("strided", 2, 4),
                               sa.Pattern("strided", None, 3), sa.Pattern("block", block=4, n_global=3)],
                         ids=lambda p: p.name)
def test_backward_matches_finite_differences(p, rng):
    q, k, v = qkv(rng, 2, 2, 23, 3)
    dy = rng.standard_normal((2, 2, 23, 3))
    _, cache = sa.sparse_attention_forward(q, k, v, p)
    grads = sa.sparse_attention_backward(dy, cache)
    f = lambda: float((sa.sparse_attention_forward(q, k, v, p)[0] * dy).sum())   # noqa: E731
    gradcheck.check_grads(p.name, f, [q, k, v], list(grads), rng, max_entries=25)


def test_masked_reference_backward_matches_finite_differences(rng):
    q, k, v = qkv(rng, 1, 2, 9, 3)
    mask = sa.Pattern("block", block=2, n_global=1).mask(9)
    dy = rng.standard_normal((1, 2, 9, 3))
    _, cache = sa.masked_attention_forward(q, k, v, mask)
    f = lambda: float((sa.masked_attention_forward(q, k, v, mask)[0] * dy).sum())  # noqa: E731
    gradcheck.check_grads("masked", f, [q, k, v], list(sa.masked_attention_backward(dy, cache)))


@given(T=st.integers(1, 30), extra=st.integers(0, 10), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=20)
def test_a_window_as_long_as_the_sequence_is_dense_attention(T, extra, seed):
    q, k, v = qkv(np.random.default_rng(seed), 2, 2, T, 4)
    y, cache = sa.sparse_attention_forward(q, k, v, sa.Pattern("window", T + extra))
    y_ref, cache_ref = attn.sdpa_forward(q, k, v)
    assert_close("y", y, y_ref)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape)
    for g, r in zip(sa.sparse_attention_backward(dy, cache), attn.sdpa_backward(dy, cache_ref)):
        assert_close("grad", g, r)


@given(p=patterns, T=st.integers(2, 50), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_an_output_ignores_the_keys_outside_its_pattern(p, T, seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 1, 2, T, 4)
    i = int(rng.integers(0, T))
    outside = ~p.mask(T)[i]
    y, _ = sa.sparse_attention_forward(q, k, v, p)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, outside] += 5 * rng.standard_normal(k2[:, :, outside].shape)
    v2[:, :, outside] += 5 * rng.standard_normal(v2[:, :, outside].shape)
    y2, _ = sa.sparse_attention_forward(q, k2, v2, p)
    assert_close("y_i", y2[:, :, i], y[:, :, i])
    inside = p.mask(T)[i].copy()
    inside[i] = False
    if inside.any():                                        # and it does move with the keys inside
        v2 = v.copy()
        v2[:, :, inside] += 1.0
        assert not np.allclose(sa.sparse_attention_forward(q, k, v2, p)[0][:, :, i], y[:, :, i])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept(dtype, rng):
    q, k, v = qkv(rng, 1, 2, 40, 4, dtype)
    for p in (sa.Pattern("window", 7), sa.Pattern("strided", None, 5), sa.Pattern("block", block=6, n_global=2)):
        y, cache = sa.sparse_attention_forward(q, k, v, p)
        assert y.dtype == np.dtype(dtype)
        assert all(g.dtype == np.dtype(dtype) for g in sa.sparse_attention_backward(y, cache))


def test_score_memory_is_linear_in_T_for_window_and_block():
    """Scores per query of the chunked kernel: 2c (+ n_global), independent of T (strided adds
    T / stride); the cache keeps O(T) per head (y and lse), not the scores."""
    for T in (256, 1024):
        assert sa.score_columns(sa.Pattern("window", 64), T) == 128
        assert sa.score_columns(sa.Pattern("block", block=32, n_global=4), T) == 68
        assert sa.score_columns(sa.Pattern("strided", None, 16), T) == 32 + T // 16
        x = np.zeros((1, 1, T, 2), np.float32)
        cache = sa.sparse_attention_forward(x, x, x, sa.Pattern("window", 64))[1]
        assert cache.lse.shape == (1, 1, T)


# --- the kinds in the model --------------------------------------------------------------------------
def nontrivial(cfg, seed=0):
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_kind_trains_through_the_model(kind, rng):
    model = nontrivial(dataclasses.replace(CFG64, **KINDS[kind]))
    idx, targets = rng.integers(0, 23, (2, 12)), rng.integers(0, 23, (2, 12))
    gradcheck.check_model_grads(model, idx, targets, rng, max_entries=3)
    dense = mm.GPT(CFG64, params=model.params)
    assert not np.allclose(model.forward(idx), dense.forward(idx))        # the pattern matters


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_generation_equals_uncached(kind):
    cfg = dataclasses.replace(CFG64, block_size=24, dtype="float32", **KINDS[kind])
    model = nontrivial(cfg)
    prompt = np.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=5, seed=3)):
        np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=19, **kw),
                                      model.generate(prompt, max_new_tokens=19, use_cache=False, **kw))


def test_ring_buffer_cache_equals_the_full_cache(rng):
    """Window decoding over W = window slots gives what the full cache with the mask gives,
    through a prefill longer than the window and single-token steps past the wrap."""
    B, H, D, W, n_head = 2, 2, 3, 4, 2
    full = np.zeros((B, H, 30, D)), np.zeros((B, H, 30, D))
    ring = np.zeros((B, H, W, D)), np.zeros((B, H, W, D)), np.zeros(B, np.int64)
    pos = np.zeros(B, np.int64)
    for T in (7, 1, 1, 3, 1, 1, 1, 1, 2):
        x = rng.standard_normal((B, T, 3 * H * D))
        want = sa.append_attend_pattern(x, *full, pos, n_head, sa.Pattern("window", W))
        assert_close(f"T={T} at {pos}", sa.ring_step(x, *ring, pos, n_head, W), want)
        pos = pos + T


def test_window_cache_bytes_stay_flat_and_linear_state_too():
    cfg = mm.GPTConfig(vocab_size=23, block_size=512, n_layer=2, n_head=2, n_embd=8, attention="window",
                       window=16)
    sizes = {kv_cache.KVCache(cfg, 1, n).nbytes for n in (64, 256, 512)}
    assert sizes == {2 * (2 * 2 * 16 * 4 * 4 + 8)}                        # 2 layers x (K, V ring + filled)


def test_an_inactive_row_keeps_its_window(rng):
    """decode_step(active=...) lets a row sit out a step (continuous batching): n_valid 0,
    so its dummy token never enters the ring."""
    model = nontrivial(dataclasses.replace(CFG64, block_size=24, dtype="float32", **KINDS["window"]))
    prompt = rng.integers(0, 23, (2, 6))
    cache = kv_cache.KVCache.for_model(model, 2, 24)
    kv_cache.prefill(model, cache, prompt)
    tokens = np.array([3, 4])
    kv_cache.decode_step(model, cache, np.array([3, 9]), active=np.array([True, False]))
    got = kv_cache.decode_step(model, cache, tokens)[1]
    want = model.forward(np.concatenate([prompt[1], [4]])[None])[0, -1]
    assert_close("row 1 after a skipped step", got, want)


@pytest.mark.parametrize("kind", sorted(KINDS) + ["dense"])
def test_unequal_prompts_decode_in_one_batch_as_each_alone(kind):
    """Right-padded prompts longer than the window: padding never enters the ring (the step
    gets n_valid = the prompt lengths), so each row of the batch equals its prompt decoded
    alone (greedy), and so does the uncached batch."""
    model = nontrivial(dataclasses.replace(CFG64, block_size=24, dtype="float32", **KINDS.get(kind, {})))
    prompts = [np.arange(1, 11), np.array([7, 8]), np.array([3, 1, 4, 1, 5, 9])]
    kw = dict(max_new_tokens=8, temperature=0)
    alone = [model.generate(p[None], **kw)[0] for p in prompts]
    for use_cache in (True, False):
        for got, want in zip(generate_batch(model, prompts, use_cache=use_cache, **kw), alone):
            np.testing.assert_array_equal(got, want)


def test_a_step_without_lengths_still_refuses_to_go_back_in_the_ring(rng):
    """Called without n_valid (all tokens real), a row that would need overwritten slots is
    refused, not decoded wrongly."""
    W, n_head = 4, 1
    ring = np.zeros((1, 1, W, 2)), np.zeros((1, 1, W, 2)), np.zeros(1, np.int64)
    sa.ring_step(rng.standard_normal((1, 9, 6)), *ring, np.array([0]), n_head, W)
    with pytest.raises(ValueError, match="ring buffer"):
        sa.ring_step(rng.standard_normal((1, 1, 6)), *ring, np.array([5]), n_head, W)
    with pytest.raises(ValueError, match="n_valid"):
        sa.ring_step(rng.standard_normal((1, 1, 6)), *ring, np.array([9]), n_head, W, np.array([2]))


def test_block_decoding_reads_only_the_slots_its_pattern_allows(rng):
    """The block kind's step reads the globals and the blocks from the earliest query's
    block-before on; the result equals the full masked cache (slots outside made NaN: unread)."""
    B, H, D, n_head, S = 2, 1, 3, 1, 40
    p = sa.Pattern("block", block=5, n_global=2)
    k, v = rng.standard_normal((B, H, S, D)), rng.standard_normal((B, H, S, D))
    x = rng.standard_normal((B, 1, 3 * H * D))
    pos = np.array([23, 31])
    ref = sa.append_attend_pattern(x, k.copy(), v.copy(), pos, n_head, p)
    lo = (23 // 5 - 1) * 5                                             # 15: the earliest block-before
    k[:, :, 2:lo], v[:, :, 2:lo] = np.nan, np.nan                      # never read
    got = sa.append_attend_pattern(x, k, v, pos, n_head, p)
    assert np.isfinite(got).all()
    assert_close("block step", got, ref)


# --- config, files, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_config_round_trip_and_save_load(kind, tmp_path):
    cfg = mm.GPTConfig.preset("tiny", **KINDS[kind])
    assert mm.GPTConfig.from_dict(cfg.to_dict()) == cfg
    model = nontrivial(cfg)
    model.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config == cfg
    idx = np.arange(20)[None] % 256
    assert_close("reloaded", back.forward(idx), model.forward(idx))
    with pytest.raises(ValueError, match=f"attention='{kind}'"):
        model.save_hf(tmp_path / "hf")


def test_the_issue_presets():
    assert mm.GPTConfig.preset("small", attention="window", window=64).window == 64
    assert mm.GPTConfig.preset("small", attention="strided", window=32, stride=32).stride == 32
    assert mm.GPTConfig.preset("small", attention="block", block=32, n_global=4).n_global == 4
    old = {k: v for k, v in mm.GPTConfig().to_dict().items() if k not in sa.PATTERN_FIELDS}
    assert mm.GPTConfig.from_dict(old) == mm.GPTConfig()            # config.json from before the fields


@pytest.mark.parametrize("kw, message", [
    (dict(attention="windowed", window=4), "known: .*'block'.*'linear'.*'strided'.*'window'"),
    (dict(attention="window"), "needs window"),
    (dict(attention="window", window=0), "window=0 must be an int >= 1"),
    (dict(attention="strided", stride=0), "stride=0"),
    (dict(attention="block", block=-2), "block=-2"),
    (dict(attention="block", block=4, n_global=-1), "n_global=-1 must be an int >= 0"),
    (dict(attention="window", window=4, stride=2), "stride=2 is not used by attention='window'"),
    (dict(attention="block", block=4, window=2), "window=2 is not used by attention='block'"),
    (dict(attention="strided", stride=4, n_global=1), "n_global=1 is not used"),
    (dict(window=8), "window=8 is not used by attention='dense'"),
    (dict(attention="window", window=2.5), "window=2.5 must be an int"),
])
def test_bad_settings_are_refused_naming_them(kw, message):
    with pytest.raises(ValueError, match=message):
        mm.GPTConfig.preset("tiny", **kw)


def test_cli_trains_a_kind_and_refuses_another_on_resume(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(mm.data.load_corpus()[:5000], encoding="utf-8")
    out = tmp_path / "ck"
    base = ["train", "--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--block-size", "16",
            "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--vocab-size", "256",
            "--corpus", str(corpus), "--out", str(out)]
    assert main([*base, "--steps", "1", "--attention", "block", "--block", "4", "--n-global", "1"]) == 0
    assert mm.GPT.load(out).config.attention == "block"
    capsys.readouterr()
    assert main([*base, "--steps", "2", "--resume", "--attention", "window", "--window", "4"]) == 2
    assert "--attention='window'" in capsys.readouterr().err
    assert main([*base, "--steps", "1", "--attention", "window"]) == 2
    assert "needs window" in capsys.readouterr().err


# --- the device stand-in -------------------------------------------------------------------------
ACTIVE = [pytest.param(n, marks=pytest.mark.skipif(not backend.available()[n][0], reason="unavailable"))
          for n in ("numpy", "numba")]


@pytest.mark.parametrize("active", ACTIVE)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_device_stand_in_runs_it(kind, active):
    cfg = mm.GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, **KINDS[kind])
    cpu, dev = host_device_pair(cfg, "standin")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 31, (2, 16)), rng.integers(0, 31, (2, 16))
    loss, grads = cpu.loss_and_grads(idx, targets)
    prompt = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    want = cpu.generate(prompt, max_new_tokens=8, temperature=0)
    with backend.use(active):
        loss_d, grads_d = dev.loss_and_grads(idx, targets)
        got = dev.generate(prompt, max_new_tokens=8, temperature=0)
    assert_close("loss", loss_d, loss, "float32")
    for k in grads:
        assert_close(k, grads_d[k], grads[k], rtol=0, atol=1e-4 * np.abs(grads[k]).max())
    np.testing.assert_array_equal(backend.to_numpy(got), want)
