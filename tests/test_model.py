"""minillm.model.GPT: whole-model gradients against central differences, causality,
dtype discipline, GPT-2 initialisation, and bad input at the public boundary."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import GPT, GPTConfig, layers
from minillm.model import check_params, param_shapes
from tests.helpers import assert_close, check_grads

seeds = st.integers(0, 2**32 - 1)


@st.composite
def tiny_configs(draw, dtype="float64"):
    """Small random configs: every structural case (L > 1, H > 1, D = 1, T < block)."""
    n_head = draw(st.integers(1, 3))
    return GPTConfig(vocab_size=draw(st.integers(2, 11)), block_size=draw(st.integers(2, 6)),
                     n_layer=draw(st.integers(1, 2)), n_head=n_head,
                     n_embd=n_head * draw(st.integers(1, 3)), dtype=dtype)


def random_model(cfg: GPTConfig, seed: int, scale: float = 0.3) -> GPT:
    """A model whose every parameter is random and nontrivial (gains far from 1, biases != 0)."""
    rng = np.random.default_rng(seed)
    params = {k: (v + scale * rng.standard_normal(v.shape)).astype(cfg.dtype)
              for k, v in GPT(cfg, seed=seed).params.items()}
    return GPT(cfg, params=params)


def random_batch(cfg: GPTConfig, rng, B=2, T=None):
    T = cfg.block_size if T is None else T
    return rng.integers(0, cfg.vocab_size, size=(B, T)), rng.integers(0, cfg.vocab_size, size=(B, T))


# --- gradients of the whole model ---------------------------------------------
@given(cfg=tiny_configs(), seed=seeds, B=st.integers(1, 2), data=st.data())
@settings(deadline=None, max_examples=12)
def test_loss_and_grads_match_central_differences(cfg, seed, B, data):
    rng = np.random.default_rng(seed)
    model = random_model(cfg, seed)
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    idx, targets = random_batch(cfg, rng, B, T)
    loss, grads = model.loss_and_grads(idx, targets)
    assert set(grads) == set(model.params)
    assert_close("loss", loss, model.loss(idx, targets))
    f = lambda: model.loss(idx, targets)  # noqa: E731
    names = list(model.params)
    check_grads("GPT", f, [model.params[k] for k in names], [grads[k] for k in names],
                rng=rng, max_entries=4)


def test_unused_positions_and_tokens_get_zero_grad(rng):
    cfg = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=4, dtype="float64")
    model = random_model(cfg, 0)
    idx = np.array([[1, 2, 1]])
    _, grads = model.loss_and_grads(idx, np.array([[2, 1, 3]]))
    assert np.all(grads["wpe.weight"][3:] == 0.0)          # positions 3.. never used
    assert np.any(grads["wpe.weight"][:3] != 0.0)


def test_loss_is_cross_entropy_of_logits(rng):
    cfg = GPTConfig(vocab_size=13, block_size=5, n_layer=1, n_head=1, n_embd=4, dtype="float64")
    model = random_model(cfg, 1)
    idx, targets = random_batch(cfg, rng)
    logits = model.forward(idx)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert_close("loss", model.loss(idx, targets), ref)
    assert_close("loss_and_grads loss", model.loss_and_grads(idx, targets)[0], ref)


def test_fresh_model_predicts_near_uniform():
    """GPT-2 init (std 0.02): logits are small, so the loss is close to log V."""
    cfg = GPTConfig.preset("tiny")
    rng = np.random.default_rng(0)
    loss = GPT(cfg, seed=0).loss(*random_batch(cfg, rng, B=2, T=16))
    assert abs(loss - np.log(cfg.vocab_size)) < 0.05 * np.log(cfg.vocab_size)


def test_forward_accepts_lists_and_returns_B_T_V():
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    logits = GPT(cfg).forward([[1, 2, 3]])
    assert logits.shape == (1, 3, 7) and logits.dtype == np.float32


def test_batch_rows_are_independent(rng):
    cfg = GPTConfig(vocab_size=11, block_size=5, n_layer=2, n_head=2, n_embd=4, dtype="float64")
    model = random_model(cfg, 3)
    idx, _ = random_batch(cfg, rng, B=3)
    both = model.forward(idx)
    for b in range(3):
        assert_close(f"row {b}", model.forward(idx[b:b + 1])[0], both[b])


# --- causality ------------------------------------------------------------------
@given(cfg=tiny_configs(), seed=seeds, data=st.data())
@settings(deadline=None, max_examples=15)
def test_changing_later_tokens_never_changes_earlier_logits(cfg, seed, data):
    rng = np.random.default_rng(seed)
    model = random_model(cfg, seed)
    T = cfg.block_size
    t = data.draw(st.integers(0, T - 1), label="t")
    idx, _ = random_batch(cfg, rng, B=2, T=T)
    changed = idx.copy()
    changed[:, t + 1:] = rng.integers(0, cfg.vocab_size, size=changed[:, t + 1:].shape)
    assert_close(f"logits[:, :{t + 1}]", model.forward(changed)[:, :t + 1],
                 model.forward(idx)[:, :t + 1])


def test_earlier_tokens_do_change_later_logits():
    """The causality test above is not vacuous: information does flow forward."""
    cfg = GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=1, n_embd=4, dtype="float64")
    model = random_model(cfg, 4)
    a = model.forward(np.array([[1, 2, 3, 4]]))
    b = model.forward(np.array([[5, 2, 3, 4]]))
    assert not np.allclose(a[:, 1:], b[:, 1:])


# --- dtype discipline ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_keeps_its_dtype(dtype, rng):
    cfg = GPTConfig(vocab_size=17, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype=dtype)
    model = GPT(cfg, seed=0)
    assert all(p.dtype == np.dtype(dtype) for p in model.params.values())
    idx, targets = random_batch(cfg, rng)
    assert model.forward(idx).dtype == np.dtype(dtype)
    loss, grads = model.loss_and_grads(idx, targets)
    assert isinstance(loss, float)
    for k, g in grads.items():
        assert g.dtype == np.dtype(dtype), f"grad {k} is {g.dtype}"
        assert g.shape == model.params[k].shape


@pytest.mark.parametrize("ids_dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32])
def test_any_integer_id_dtype_works(ids_dtype, rng):
    cfg = GPTConfig(vocab_size=17, block_size=6, n_layer=1, n_head=2, n_embd=8, dtype="float64")
    model = GPT(cfg, seed=0)
    idx, targets = random_batch(cfg, rng)
    ref_loss, ref_grads = model.loss_and_grads(idx, targets)
    loss, grads = model.loss_and_grads(idx.astype(ids_dtype), targets.astype(ids_dtype))
    assert_close("loss", loss, ref_loss)
    for k in grads:
        assert_close(k, grads[k], ref_grads[k])


def test_float32_matches_float64(rng):
    cfg64 = GPTConfig(vocab_size=17, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    m64 = random_model(cfg64, 5)
    m32 = GPT(GPTConfig(**{**cfg64.to_dict(), "dtype": "float32"}),
              params={k: v.astype(np.float32) for k, v in m64.params.items()})
    idx, targets = random_batch(cfg64, rng)
    assert_close("logits", m32.forward(idx), m64.forward(idx), "float32")
    l32, g32 = m32.loss_and_grads(idx, targets)
    l64, g64 = m64.loss_and_grads(idx, targets)
    assert_close("loss", l32, l64, "float32")
    for k in g64:   # relative to the tensor's scale: tiny entries carry float32 rounding
        assert_close(k, g32[k], g64[k], rtol=0, atol=1e-4 * np.abs(g64[k]).max())


# --- initialisation ----------------------------------------------------------------
def test_init_is_deterministic_per_seed_and_differs_across_seeds():
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=8)
    a, b, c = GPT(cfg, seed=7).params, GPT(cfg, seed=7).params, GPT(cfg, seed=8).params
    assert list(a) == list(b) == list(c)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
        if k.endswith(".weight") and "ln_" not in k:
            assert not np.array_equal(a[k], c[k]), k


@pytest.mark.parametrize("L", [1, 2, 6])
def test_gpt2_init_statistics(L):
    """N(0, 0.02) weights; residual projections N(0, 0.02/sqrt(2L)); zero biases; unit gains."""
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=L, n_head=2, n_embd=64)
    p = GPT(cfg, seed=0).params
    for k, v in p.items():
        if k.endswith(".bias"):
            assert np.all(v == 0), k
        elif "ln_" in k:
            assert np.all(v == 1), k
        else:
            std = 0.02 / np.sqrt(2 * L) if k.endswith("c_proj.weight") else 0.02
            # >= 4096 samples: the sample std is within ~1.1% (1 sigma) of the truth
            assert abs(v.std() / std - 1) < 0.05, f"{k}: std {v.std():.5f}, expected {std:.5f}"
            assert abs(v.mean()) < 4 * std / np.sqrt(v.size), k


def test_param_names_shapes_and_count():
    cfg = GPTConfig(vocab_size=20, block_size=7, n_layer=3, n_head=2, n_embd=6)
    model = GPT(cfg)
    assert {k: v.shape for k, v in model.params.items()} == param_shapes(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.nbytes() == 4 * cfg.num_params()
    assert "h.2.attn.c_attn.weight" in model.params and "h.3.ln_1.weight" not in model.params
    assert "V=20" in repr(model)


def test_to_numpy_is_a_no_op_round_trip():
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4))
    before = {k: v.copy() for k, v in model.params.items()}
    assert model.to("numpy") is model and model.xp is np
    for k in before:
        assert np.array_equal(model.params[k], before[k])


# --- bad input -------------------------------------------------------------------------
CFG = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)


@pytest.mark.parametrize("idx,match", [
    (np.array([[1, 10]]), r"idx.*10.*vocab_size=10"),
    (np.array([[-1, 2]]), r"idx.*-1"),
    (np.zeros((1, 5), int), r"idx.*block_size=4"),
    (np.zeros((1, 2), np.float32), r"idx.*integer"),
    (np.zeros((1, 2), bool), r"idx.*integer"),
    (np.zeros(3, int), r"idx.*2-D"),
    (np.zeros((1, 1, 2), int), r"idx.*2-D"),
    (np.zeros((1, 0), int), r"idx.*empty"),
    ("hello", r"idx"),
    (None, r"idx"),
])
def test_bad_token_ids_name_the_argument(idx, match):
    model = GPT(CFG)
    for call in (model.forward, lambda i: model.loss_and_grads(i, np.zeros((1, 2), int)),
                 lambda i: model.loss(i, np.zeros((1, 2), int))):
        with pytest.raises(ValueError, match=match):
            call(idx)


@pytest.mark.parametrize("targets,match", [
    (np.zeros((1, 3), int), r"targets.*shape"),
    (np.zeros((2, 2), int), r"targets.*shape"),
    (np.array([[0, 10]]), r"targets.*10"),
    (np.array([[0, -2]]), r"targets.*-2"),
    (np.zeros((1, 2)), r"targets.*integer"),
    (np.zeros(2, int), r"targets.*2-D"),
])
def test_bad_targets_name_the_argument(targets, match):
    model = GPT(CFG)
    idx = np.zeros((1, 2), int)
    for call in (model.loss_and_grads, model.loss):
        with pytest.raises(ValueError, match=match):
            call(idx, targets)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="config"):
        GPT({"vocab_size": 10})
    good = GPT(CFG).params
    with pytest.raises(ValueError, match="missing"):
        GPT(CFG, params={k: v for k, v in good.items() if k != "wte.weight"})
    with pytest.raises(ValueError, match="unexpected"):
        GPT(CFG, params=good | {"lm_head.weight": good["wte.weight"]})
    with pytest.raises(ValueError, match=r"wpe\.weight.*shape"):
        GPT(CFG, params=good | {"wpe.weight": np.zeros((5, 4), np.float32)})
    with pytest.raises(ValueError, match=r"ln_f\.bias.*dtype"):
        GPT(CFG, params=good | {"ln_f.bias": good["ln_f.bias"].astype(np.float64)})
    check_params(good, CFG)    # the untouched dict passes


def test_cross_entropy_ignores_no_position(rng):
    """loss_and_grads averages over every (b, t): doubling the batch with a copy keeps it."""
    cfg = GPTConfig(vocab_size=9, block_size=4, n_layer=1, n_head=1, n_embd=4, dtype="float64")
    model = random_model(cfg, 6)
    idx, targets = random_batch(cfg, rng, B=1)
    l1, g1 = model.loss_and_grads(idx, targets)
    l2, g2 = model.loss_and_grads(np.concatenate([idx, idx]), np.concatenate([targets, targets]))
    assert_close("loss", l2, l1)
    for k in g1:
        assert_close(k, g2[k], g1[k])
    # and the layer itself agrees with the model's logits
    loss, _ = layers.cross_entropy_forward(model.forward(idx), targets)
    assert_close("layer loss", loss, l1)
