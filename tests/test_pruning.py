"""minillm.pruning: masks by the book, zeros that stay zero, structured removal that is real.

- properties (hypothesis, random shapes): exact counts per matrix / per column /
  per group of 4, every pruned score <= every kept one in its comparison group,
  ties broken by index;
- Wanda's score reads the activations that reach each layer;
- structured removal equals masking the removed heads / neurons (same logits);
- the sparse kind's backward against float64 central differences; fine-tuning
  with plain ``train`` keeps the zeros; save/load; cached == uncached decoding;
- the CSR matmul: reference and Numba twin equal ``x @ W``;
- the device stand-in runs every method;
- bad input is a ValueError naming the argument.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import backend, gradcheck, pruning, seams, train
from tests import standin
from tests.helpers import assert_close, host_device_pair

CFG = mm.GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=4, n_embd=16, dtype="float64")
UNSTRUCTURED = [("magnitude", 0.5), ("wanda", 0.3), ("2:4", None)]
ALL = UNSTRUCTURED + [("heads", 0.25), ("neurons", 0.25)]
HAS_NUMBA = backend.available()["numba"][0]


def nontrivial(cfg=CFG, seed=0):
    """GPT-2 init moved by noise: LayerNorms off 1/0, biases off 0."""
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


def ids(cfg=CFG, B=3, T=None, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T or cfg.block_size))


# --- masks: properties on random score matrices ----------------------------------------------
shapes = st.tuples(st.integers(1, 12), st.integers(1, 9))
fractions = st.floats(0, 0.99)


def scores(shape, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(shape)
    return np.round(s) if ties else s          # rounding makes many ties


@given(shape=shapes, s=fractions, seed=st.integers(0, 999), ties=st.booleans())
@settings(deadline=None, max_examples=40)
def test_matrix_mask_prunes_exactly_the_lowest(shape, s, seed, ties):
    score = scores(shape, seed, ties)
    keep = pruning.matrix_mask(score, s)
    assert keep.dtype == bool and keep.shape == shape
    assert (~keep).sum() == pruning.n_pruned(s, score.size)
    if (~keep).any() and keep.any():
        assert score[~keep].max() <= score[keep].min()
    flat_keep, flat = keep.reshape(-1), score.reshape(-1)
    for v in np.unique(flat):                   # ties: lower index pruned first
        group = np.flatnonzero(flat == v)
        assert (np.diff(flat_keep[group].astype(int)) >= 0).all()


@given(shape=shapes, s=fractions, seed=st.integers(0, 999), ties=st.booleans())
@settings(deadline=None, max_examples=40)
def test_column_mask_prunes_exactly_the_lowest_of_each_column(shape, s, seed, ties):
    score = scores(shape, seed, ties)
    keep = pruning.column_mask(score, s)
    k = pruning.n_pruned(s, shape[0])
    for j in range(shape[1]):
        col, kj = score[:, j], keep[:, j]
        assert (~kj).sum() == k
        if k and kj.any():
            assert col[~kj].max() <= col[kj].min()
        if k:                                   # ties: the lower row goes first
            last = np.flatnonzero(~kj).max()
            assert not any(col[r] == col[last] for r in np.flatnonzero(kj) if r < last)


@given(groups=st.integers(1, 5), n_out=st.integers(1, 7), seed=st.integers(0, 999), ties=st.booleans())
@settings(deadline=None, max_examples=40)
def test_2_4_mask_keeps_2_of_every_4(groups, n_out, seed, ties):
    score = scores((4 * groups, n_out), seed, ties)
    keep = pruning.n_m_mask(score, 2, 4).reshape(groups, 4, n_out)
    g = score.reshape(groups, 4, n_out)
    assert (keep.sum(axis=1) == 2).all()
    lowest_kept = np.where(keep, g, np.inf).min(axis=1)
    assert (np.where(keep, -np.inf, g).max(axis=1) <= lowest_kept).all()


# --- prune: the methods on a model -------------------------------------------------------------
@given(n_head=st.sampled_from([1, 2, 4]), n_embd=st.sampled_from([8, 16]), s=fractions,
       seed=st.integers(0, 99))
@settings(deadline=None, max_examples=8)
def test_prune_meets_exact_sparsity_per_matrix_column_and_group(n_head, n_embd, s, seed):
    cfg = mm.GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=n_head, n_embd=n_embd)
    model = nontrivial(cfg, seed)
    cal = ids(cfg, 2, seed=seed)
    mag = mm.prune(model, "magnitude", sparsity=s)
    wanda = mm.prune(model, "wanda", sparsity=s, calibration=cal)
    two4 = mm.prune(model, "2:4", calibration=cal)
    for name in pruning.linear_names(cfg):
        w = model.params[name + ".weight"]
        zeros = {m: pm.params[name + ".weight"] == 0 for m, pm in
                 (("magnitude", mag), ("wanda", wanda), ("2:4", two4))}
        assert zeros["magnitude"].sum() == pruning.n_pruned(s, w.size)
        assert (zeros["wanda"].sum(axis=0) == pruning.n_pruned(s, w.shape[0])).all()
        assert (zeros["2:4"].reshape(-1, 4, w.shape[1]).sum(axis=1) == 2).all()
        for m, pm in (("magnitude", mag), ("wanda", wanda), ("2:4", two4)):
            mask = pm.params[name + ".mask"]
            assert mask.dtype == np.uint8 and np.array_equal(mask == 0, zeros[m])
            kept = pm.params[name + ".weight"][mask == 1]
            assert np.array_equal(kept, w[mask == 1])       # kept entries are untouched
    assert mm.sparsity(mag) == {n + ".weight": pruning.n_pruned(s, mag.params[n + ".weight"].size)
                                / mag.params[n + ".weight"].size for n in pruning.linear_names(cfg)}


def test_wanda_scores_the_activations_that_reach_each_layer(monkeypatch):
    model = nontrivial()
    cal = ids(B=5)
    norms = pruning.calibrate(model, cal)
    # the first layer's c_attn sees ln_1 of the embeddings: computed here from the layers
    x, _ = mm.layers.embedding_forward(cal, model.params["wte.weight"], model.params["wpe.weight"])
    a, _ = mm.layers.layernorm_forward(x, model.params["h.0.ln_1.weight"], model.params["h.0.ln_1.bias"])
    assert_close("||X_i|| of h.0.attn.c_attn", norms["h.0.attn.c_attn"],
                 np.sqrt((a.reshape(-1, CFG.n_embd) ** 2).sum(axis=0)))
    monkeypatch.setattr(pruning, "CALIBRATION_ROWS", 2)          # chunked == one pass
    chunked = pruning.calibrate(model, cal)
    for k in norms:
        assert_close(k, chunked[k], norms[k])
    pm = mm.prune(model, "wanda", sparsity=0.5, calibration=cal)
    for name in pruning.linear_names(CFG):
        score = np.abs(model.params[name + ".weight"]) * norms[name][:, None]
        assert np.array_equal(pm.params[name + ".mask"] == 1, pruning.column_mask(score, 0.5))
    # activations matter: a feature with a huge input norm keeps its weights under Wanda
    w = model.params["h.0.mlp.c_fc.weight"]
    big = np.zeros(CFG.n_embd)
    big[3] = 1e6
    keep = pruning.column_mask(pruning.wanda_score(w, big + 1e-3), 0.5)
    assert keep[3].all() and not pruning.matrix_mask(np.abs(w), 0.5).all()


def test_2_4_without_calibration_uses_magnitude():
    model = nontrivial()
    pm = mm.prune(model, "2:4")
    for name in pruning.linear_names(CFG):
        want = pruning.n_m_mask(np.abs(model.params[name + ".weight"]), 2, 4)
        assert np.array_equal(pm.params[name + ".mask"] == 1, want)


def test_sparsity_zero_keeps_everything_and_the_input_is_untouched():
    model = nontrivial()
    before = {k: v.copy() for k, v in model.params.items()}
    cal = ids()
    for method, s in ALL:
        mm.prune(model, method, sparsity=s, calibration=cal)
    assert all(np.array_equal(model.params[k], v) for k, v in before.items())
    assert model.config.linear == "dense"
    same = mm.prune(model, "magnitude", sparsity=0.0)
    assert_close("sparsity 0", same.forward(cal), model.forward(cal))
    pm = mm.prune(model, "wanda", sparsity=0.5, calibration=cal)
    assert not any(np.shares_memory(pm.params[k], v) for k, v in model.params.items()
                   if k in pm.params)


def test_pruning_a_pruned_model_keeps_its_zeros():
    model = nontrivial()
    first = mm.prune(model, "magnitude", sparsity=0.6)
    second = mm.prune(first, "wanda", sparsity=0.3, calibration=ids())
    for name in pruning.linear_names(CFG):
        assert (second.params[name + ".weight"][first.params[name + ".mask"] == 0] == 0).all()
    heads = mm.prune(first, "heads", sparsity=0.5, calibration=ids())   # sparse and sliced
    assert heads.config.linear == "sparse" and heads.block_dims(0).n_head == 2
    assert heads.params["h.0.attn.c_attn.mask"].shape == heads.params["h.0.attn.c_attn.weight"].shape


# --- structured: removal == masking ----------------------------------------------------------
def test_removing_heads_equals_masking_them():
    model, cal = nontrivial(), ids()
    norms = pruning.calibrate(model, cal)
    pm = mm.prune(model, "heads", sparsity=0.5, calibration=cal)
    masked = mm.GPT(CFG, params={k: v.copy() for k, v in model.params.items()})
    D = CFG.head_size
    for i in range(CFG.n_layer):
        assert pm.block_dims(i) == (2, 4 * CFG.n_embd)
        for h in np.argsort(norms[f"h.{i}.attn.heads"], kind="stable")[:2]:
            masked.params[f"h.{i}.attn.c_proj.weight"][h * D:(h + 1) * D] = 0    # the head's output
    assert_close("removed == masked", pm.forward(cal), masked.forward(cal))
    assert pm.num_params() == model.num_params() - CFG.n_layer * 2 * D * (4 * CFG.n_embd + 3)


def test_removing_neurons_equals_masking_them():
    model, cal = nontrivial(), ids()
    norms = pruning.calibrate(model, cal)
    pm = mm.prune(model, "neurons", sparsity=0.25, calibration=cal)
    masked = mm.GPT(CFG, params={k: v.copy() for k, v in model.params.items()})
    F, k = 4 * CFG.n_embd, pruning.n_pruned(0.25, 4 * CFG.n_embd)
    for i in range(CFG.n_layer):
        w = model.params[f"h.{i}.mlp.c_proj.weight"]
        score = norms[f"h.{i}.mlp.c_proj"] * np.linalg.norm(w, axis=1)
        masked.params[f"h.{i}.mlp.c_proj.weight"][np.argsort(score, kind="stable")[:k]] = 0
        assert pm.block_dims(i) == (CFG.n_head, F - k)
    assert_close("removed == masked", pm.forward(cal), masked.forward(cal))
    assert pm.num_params() == model.num_params() - CFG.n_layer * k * (2 * CFG.n_embd + 1)


def test_structured_model_saves_loads_and_decodes_with_the_cache(tmp_path):
    model, cal = nontrivial(), ids()
    pm = mm.prune(mm.prune(model, "heads", 0.5, cal), "neurons", 0.25, cal)
    pm.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config == model.config
    assert [back.block_dims(i) for i in range(2)] == [pm.block_dims(i) for i in range(2)]
    assert_close("reloaded", back.forward(cal), pm.forward(cal))
    kw = dict(max_new_tokens=6, temperature=0)
    np.testing.assert_array_equal(back.generate(cal[:, :4], use_cache=True, **kw),
                                  back.generate(cal[:, :4], use_cache=False, **kw))


# --- the sparse kind: backward, training, files ----------------------------------------------
def test_sparse_backward_matches_central_differences_on_kept_entries(rng):
    model = mm.prune(nontrivial(), "wanda", sparsity=0.5, calibration=ids())
    x, y = ids(seed=2), ids(seed=3)
    _, grads = model.loss_and_grads(x, y)
    assert set(grads) == set(model.trainable()) and not any(k.endswith(".mask") for k in grads)
    for name in ("h.0.attn.c_attn", "h.1.mlp.c_proj"):
        w, mask, g = model.params[name + ".weight"], model.params[name + ".mask"], grads[name + ".weight"]
        assert (g[mask == 0] == 0).all()                        # pruned entries get no gradient
        pos = rng.choice(np.flatnonzero(mask.reshape(-1)), 6, replace=False)
        num = gradcheck.numerical_grads(lambda: model.loss(x, y), w, pos)
        assert_close(name, g.reshape(-1)[pos], num, **gradcheck.FD_TOL)
    gradcheck.check_model_grads(model, x, y, rng, max_entries=4,
                                names=[k for k in grads if not k.endswith(".weight")
                                       or not k.startswith("h.")])


def test_fine_tuning_with_plain_train_keeps_the_zeros(tmp_path):
    cfg = dataclasses.replace(CFG, dtype="float32")
    model = mm.prune(nontrivial(cfg), "magnitude", sparsity=0.5)
    before = {n: model.params[n + ".weight"].copy() for n in pruning.linear_names(cfg)}
    data = np.random.default_rng(4).integers(0, cfg.vocab_size, 400)
    tcfg = train.TrainConfig(steps=4, batch_size=2, lr=3e-2, warmup_steps=0, eval_interval=0)
    train.train(model, data, None, tcfg, out_dir=tmp_path / "ck", progress=False)
    for n, w in before.items():
        now = model.params[n + ".weight"]
        assert (now[w == 0] == 0).all(), n                         # exact zeros
        assert not np.array_equal(now[w != 0], w[w != 0]), n       # the rest trained
    back = mm.GPT.load(tmp_path / "ck")                            # mask and zeros come back
    assert back.config.linear == "sparse" and mm.sparsity(back) == mm.sparsity(model)
    more = dataclasses.replace(tcfg, steps=6)                      # resume runs the hook too
    train.train(back, data, None, more, out_dir=tmp_path / "ck", resume=True, progress=False)
    assert all(v == 0.5 for v in mm.sparsity(back).values())


def test_the_hook_restores_zeros_whatever_the_optimizer_did():
    model = mm.prune(nontrivial(), "magnitude", sparsity=0.5)
    hooks = train.kind_hooks(model)
    assert [type(h) for h in hooks] == [pruning.KeepMasks]
    for n in pruning.linear_names(CFG):
        model.params[n + ".weight"] += 1.0                         # an update that ignores the mask
    hooks[0].after_update(model, 0, {})
    assert all(v == 0.5 for v in mm.sparsity(model).values())


def test_sparse_model_saves_loads_and_decodes(tmp_path):
    model, cal = nontrivial(), ids()
    pm = mm.prune(model, "2:4", calibration=cal)
    pm.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config.linear == "sparse"
    for k, v in pm.params.items():
        assert back.params[k].dtype == v.dtype and np.array_equal(back.params[k], v), k
    kw = dict(max_new_tokens=6, temperature=0)
    np.testing.assert_array_equal(back.generate(cal[:, :4], use_cache=True, **kw),
                                  back.generate(cal[:, :4], use_cache=False, **kw))
    # nbytes counts what is stored: dense weights plus one mask byte each
    extra = sum(pm.params[n + ".mask"].size for n in pruning.linear_names(CFG))
    assert pm.nbytes() == model.nbytes() + extra


def test_a_fresh_sparse_model_keeps_everything():
    model = mm.GPT(dataclasses.replace(CFG, linear="sparse"), seed=0)
    assert all(v == 0 for v in mm.sparsity(model).values())
    assert (model.params["h.0.mlp.c_fc.mask"] == 1).all()
    assert seams.known_kinds("linear").count("sparse") == 1


# --- CSR: reference and twin ------------------------------------------------------------------
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 40), N=st.sampled_from([1, 3, 16, 37]),
       density=st.floats(0, 1), seed=st.integers(0, 999), dtype=st.sampled_from(["float32", "float64"]))
@settings(deadline=None, max_examples=25)
def test_csr_matmul_equals_dense_in_the_reference_and_the_twin(n_in, n_out, N, density, seed, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_in, n_out)) * (rng.random((n_in, n_out)) < density)).astype(dtype)
    x = rng.standard_normal((N, n_in)).astype(dtype)
    csr = pruning.to_csr(w)
    assert csr.indices.dtype == csr.indptr.dtype == np.int32 and len(csr.data) == (w != 0).sum()
    ref = backend.reference("pruning.csr_matmul")(x, *csr[:3], n_out)
    assert ref.dtype == np.dtype(dtype)
    assert_close("reference", ref, x @ w, dtype)
    if HAS_NUMBA:
        twin = backend.twin("numba", "pruning.csr_matmul")
        assert twin.__doc__.startswith("Accelerated minillm.pruning.csr_matmul")
        got = twin(x, *csr[:3], n_out)
        assert got.dtype == np.dtype(dtype)
        assert_close("numba twin", got, ref, dtype)


def test_csr_twin_refuses_inconsistent_arrays():
    if not HAS_NUMBA:
        pytest.skip("numba not available")
    csr = pruning.to_csr(np.eye(4, dtype=np.float32))
    with pytest.raises(IndexError):
        backend.twin("numba", "pruning.csr_matmul")(np.ones((1, 4), np.float32), *csr[:3], 3)


# --- the device stand-in --------------------------------------------------------------------
@pytest.mark.parametrize("method,s", ALL, ids=[m for m, _ in ALL])
def test_every_method_runs_on_the_device_standin(method, s):
    cfg = mm.GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=4, n_embd=16)
    cpu, dev = host_device_pair(cfg, "standin")
    cal = ids(cfg)
    want = mm.prune(cpu, method, sparsity=s, calibration=cal)
    got = mm.prune(dev, method, sparsity=s, calibration=cal)
    assert all(isinstance(v, standin.DeviceArray) for v in got.params.values())
    assert set(got.params) == set(want.params)
    for k in want.params:
        assert_close(k, got.params[k], want.params[k], "float32")
    assert mm.sparsity(got) == mm.sparsity(want)
    assert_close("logits", got.forward(cal), want.forward(cal), "float32")
    out = got.generate(cal[:, :3], max_new_tokens=3, temperature=0)
    assert out.shape == (3, 6)


def test_device_standin_fine_tunes_with_the_mask():
    cfg = mm.GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=4, n_embd=16)
    _, dev = host_device_pair(cfg, "standin")
    pm = mm.prune(dev, "wanda", sparsity=0.5, calibration=ids(cfg))
    data = np.random.default_rng(4).integers(0, cfg.vocab_size, 300)
    train.train(pm, data, None, train.TrainConfig(steps=2, batch_size=2, warmup_steps=0,
                                                  eval_interval=0), progress=False)
    assert all(isinstance(v, standin.DeviceArray) for v in pm.params.values())
    assert all(v == 0.5 for v in mm.sparsity(pm).values())
    csr = pruning.to_csr(pm.params["h.0.mlp.c_fc.weight"])                # explicit copy to host
    x = standin.xp.asarray(np.ones((2, 16), np.float32))
    y = pruning.csr_matmul(x, *(standin.xp.asarray(a) for a in csr[:3]), 64)
    assert isinstance(y, standin.DeviceArray)
    assert_close("csr on device", y, np.ones((2, 16), np.float32) @ backend.to_numpy(
        pm.params["h.0.mlp.c_fc.weight"]), "float32")


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="random"), r"method='random'.*'2:4'.*'heads'.*'magnitude'.*'neurons'.*'wanda'"),
    (dict(method="magnitude", sparsity=1.0), r"sparsity=1\.0.*\[0\.0, 1\.0\)"),
    (dict(method="magnitude", sparsity=-0.1), r"sparsity=-0\.1"),
    (dict(method="wanda", sparsity=float("nan"), calibration="ok"), r"sparsity=nan"),
    (dict(method="magnitude", sparsity="half"), r"sparsity='half'"),
    (dict(method="2:4", sparsity=0.5), r"sparsity=0\.5.*'2:4'"),
    (dict(method="wanda", sparsity=0.5), r"method='wanda' needs calibration"),
    (dict(method="heads", sparsity=0.25), r"method='heads' needs calibration"),
    (dict(method="neurons", sparsity=0.25), r"method='neurons' needs calibration"),
    (dict(method="wanda", sparsity=0.5, calibration=np.array([[1, 2, 99]])), r"calibration.*99.*vocab"),
    (dict(method="wanda", sparsity=0.5, calibration=np.array([1, 2, 3])), r"calibration must be 2-D"),
    (dict(method="wanda", sparsity=0.5, calibration=np.zeros((1, 13), int)), r"calibration.*block_size"),
    (dict(method="wanda", sparsity=0.5, calibration=np.ones((1, 3))), r"calibration.*integer"),
    (dict(method="heads", sparsity=0.9, calibration="ok"), r"sparsity=0\.9.*all 4 heads of layer 0"),
    (dict(method="neurons", sparsity=0.999, calibration="ok"), r"all 64 neurons of layer 0"),
])
def test_bad_input_is_a_value_error_naming_it(kwargs, match):
    model = mm.GPT(CFG, seed=0)
    if isinstance(kwargs.get("calibration"), str):
        kwargs = {**kwargs, "calibration": ids()}
    with pytest.raises(ValueError, match=match):
        mm.prune(model, **kwargs)


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match="model must be a minillm GPT"):
        mm.prune("gpt2", "magnitude")
    cfg = mm.GPTConfig(vocab_size=29, block_size=12, n_layer=1, n_head=2, n_embd=6)
    with pytest.raises(ValueError, match=r"'2:4' needs a multiple of 4 inputs.*h\.0\.attn\.c_attn.*6"):
        mm.prune(mm.GPT(cfg), "2:4")


# --- the tour row -----------------------------------------------------------------------------
def test_the_tour_row_runs_on_the_quick_tour(tmp_path):
    from minillm import tour
    rows = tour.run_tour(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", quick=True,
                         techniques=["pruning"], progress=False)
    mine = [r for r in rows if r.technique.startswith("pruning")]
    assert [r.technique for r in mine] == ["pruning magnitude 50%", "pruning wanda 50%", "pruning 2:4",
                                           "pruning heads+neurons 25%"]
    assert not any(r.extra.get("error") for r in mine), [r.notes for r in mine]
    assert all(r.val_ppl > 1 for r in mine)
    assert mine[-1].params < rows[0].params and mine[-1].decode_tok_s > 0


def test_with_masks_builds_a_sparse_model_from_any_criterion():
    model = nontrivial()
    w = model.params["h.1.mlp.c_fc.weight"]
    keep = {"h.1.mlp.c_fc": pruning.matrix_mask(pruning.wanda_score(w, np.arange(16.0)), 0.5)}
    pm = pruning.with_masks(model, keep)
    sp = mm.sparsity(pm)
    assert sp["h.1.mlp.c_fc.weight"] == 0.5 and sp["h.0.mlp.c_fc.weight"] == 0
    assert (pm.params["h.1.mlp.c_fc.weight"][:1] == 0).all()        # input 0 has norm 0
    with pytest.raises(ValueError, match="keep names"):
        pruning.with_masks(model, {"h.9.mlp.c_fc": keep["h.1.mlp.c_fc"]})
    with pytest.raises(ValueError, match=r"keep\['h.1.mlp.c_fc'\] has shape \(3, 3\)"):
        pruning.with_masks(model, {"h.1.mlp.c_fc": np.ones((3, 3), bool)})
