"""Distillation: the KD loss pair against finite differences and PyTorch, its properties,
``distill`` as a training hook (scratch equality, exact resume, device stand-in), the
``minillm distill`` command and the tour row."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import backend, checkpoint, layers
from minillm import distillation as kd
from minillm.cli import main
from minillm.tokenizer import BPETokenizer
from minillm.train import TrainConfig, train
from tests import standin
from tests.helpers import assert_close, check_grads

FD = settings(deadline=None, max_examples=20)
seeds = st.integers(0, 2**31 - 1)
lead_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)
temperatures = st.floats(0.25, 8.0)
alphas = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
kinds = st.sampled_from(kd.KINDS)


def logits_pair(seed, lead, V, dtype=np.float64):
    rng = np.random.default_rng(seed)
    zs = (2 * rng.standard_normal(lead + (V,))).astype(dtype)
    zt = (3 * rng.standard_normal(lead + (V,))).astype(dtype)
    return zs, zt, rng.integers(0, V, size=lead)


# --- the loss pair ---------------------------------------------------------------------------
@FD
@given(seed=seeds, lead=lead_shapes, V=st.integers(2, 9), T=temperatures, alpha=alphas, kind=kinds)
def test_kd_backward_matches_finite_differences(seed, lead, V, T, alpha, kind):
    zs, zt, y = logits_pair(seed, lead, V)
    dloss = float(np.random.default_rng(seed + 1).standard_normal())
    loss, cache = kd.kd_loss_forward(zs, zt, y, T, alpha, kind)
    dzs = kd.kd_loss_backward(dloss, cache)
    assert dzs.shape == zs.shape and dzs.dtype == np.float64
    check_grads("kd", lambda: float(kd.kd_loss_forward(zs, zt, y, T, alpha, kind)[0]) * dloss,
                [zs], [dzs])


def torch_kd(zs, zt, y, T, alpha, kind):
    """The reference: F.kl_div on F.log_softmax (batchmean over positions) + F.cross_entropy."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    V = zs.shape[-1]
    s = torch.tensor(zs.reshape(-1, V), requires_grad=True)
    t = torch.tensor(zt.reshape(-1, V))
    ls, lt = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    kl = (F.kl_div(ls, lt, log_target=True, reduction="batchmean") if kind == "forward"
          else F.kl_div(lt, ls, log_target=True, reduction="batchmean"))
    loss = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, torch.tensor(y.reshape(-1)))
    loss.backward()
    return loss.item(), s.grad.numpy().reshape(zs.shape)


@pytest.mark.peers
@FD
@given(seed=seeds, lead=lead_shapes, V=st.integers(2, 12), T=temperatures, alpha=alphas, kind=kinds)
def test_kd_loss_matches_torch(seed, lead, V, T, alpha, kind):
    zs, zt, y = logits_pair(seed, lead, V)
    loss, cache = kd.kd_loss_forward(zs, zt, y, T, alpha, kind)
    ref_loss, ref_grad = torch_kd(zs, zt, y, T, alpha, kind)
    assert_close("loss", np.float64(loss), np.float64(ref_loss), "float64")
    assert_close("dlogits", kd.kd_loss_backward(1.0, cache), ref_grad, "float64")


@FD
@given(seed=seeds, lead=lead_shapes, V=st.integers(1, 9), T=temperatures, kind=kinds)
def test_alpha_zero_is_cross_entropy(seed, lead, V, T, kind):
    zs, zt, y = logits_pair(seed, lead, V)
    loss, cache = kd.kd_loss_forward(zs, zt, y, T, 0.0, kind)
    ce, ce_cache = layers.cross_entropy_forward(zs, y)
    assert float(loss) == float(ce)
    assert np.array_equal(kd.kd_loss_backward(1.0, cache),
                          layers.cross_entropy_backward(1.0, ce_cache, zs.shape))


@FD
@given(seed=seeds, lead=lead_shapes, V=st.integers(1, 9), T=temperatures, kind=kinds)
def test_kl_is_nonnegative_and_zero_for_equal_logits(seed, lead, V, T, kind):
    zs, zt, _ = logits_pair(seed, lead, V)
    loss, _ = kd.kd_loss_forward(zs, zt, None, T, 1.0, kind)
    assert float(loss) >= -1e-12
    same, cache = kd.kd_loss_forward(zs, zs.copy(), None, T, 1.0, kind)
    assert abs(float(same)) < 1e-12
    assert np.abs(kd.kd_loss_backward(1.0, cache)).max() < 1e-12


def test_float32_in_float32_out_and_the_T_squared_scale():
    zs, zt, y = logits_pair(0, (2, 5), 11, np.float32)
    loss, cache = kd.kd_loss_forward(zs, zt, y, 2.0, 0.5)
    assert kd.kd_loss_backward(1.0, cache).dtype == np.float32
    assert_close("float32 loss", np.float64(loss),
                 np.float64(kd.kd_loss_forward(zs.astype(np.float64), zt.astype(np.float64), y,
                                               2.0, 0.5)[0]), "float32")
    # the soft gradient is T (p_s - p_t) / N: with T^2 its size does not fall as 1/T^2
    z64s, z64t = zs.astype(np.float64), zt.astype(np.float64)
    g = {T: np.abs(kd.kd_loss_backward(1.0, kd.kd_loss_forward(z64s, z64t, None, T, 1.0)[1])).sum()
         for T in (4.0, 8.0)}
    assert 0.5 < g[8.0] / g[4.0] < 2.0


# --- a truncated teacher ------------------------------------------------------------------------
@FD
@given(seed=seeds, lead=lead_shapes, V=st.integers(2, 9), T=temperatures, alpha=alphas,
       k=st.integers(1, 9))
def test_topk_teacher_matches_finite_differences_and_torch(seed, lead, V, T, alpha, k):
    k = min(k, V)
    zs, zt, y = logits_pair(seed, lead, V)
    top = kd.topk_logits(zt, k)
    dense = kd.dense_logits(top, V)
    assert np.isneginf(dense).sum() == np.prod(lead) * (V - k)
    loss, cache = kd.kd_loss_forward(zs, dense, y, T, alpha)
    assert np.isfinite(float(loss))
    dzs = kd.kd_loss_backward(1.0, cache)
    check_grads("kd top-k", lambda: float(kd.kd_loss_forward(zs, dense, y, T, alpha)[0]), [zs], [dzs])
    if k == V:                                    # nothing cut: the full teacher
        full, _ = kd.kd_loss_forward(zs, zt, y, T, alpha)
        assert_close("k = V", np.float64(loss), np.float64(full), "float64")


@pytest.mark.peers
def test_topk_teacher_matches_torch_kl_div_with_zero_targets():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    zs, zt, _ = logits_pair(3, (4,), 10)
    dense = kd.dense_logits(kd.topk_logits(zt, 3), 10)
    loss, _ = kd.kd_loss_forward(zs, dense, None, 2.0, 1.0)
    pt = torch.softmax(torch.tensor(dense) / 2.0, -1)                  # zeros outside the top 3
    ref = 4.0 * F.kl_div(F.log_softmax(torch.tensor(zs) / 2.0, -1), pt, reduction="batchmean")
    assert_close("top-k KL", np.float64(loss), np.float64(ref.item()), "float64")


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(alpha=-0.1), "alpha=-0.1"),
    (dict(alpha=1.5), "alpha=1.5"),
    (dict(kind="sideways"), "kind='sideways'"),
])
def test_bad_loss_arguments_name_the_argument(kwargs, match):
    zs, zt, y = logits_pair(0, (2,), 5)
    with pytest.raises(ValueError, match=match):
        kd.kd_loss_forward(zs, zt, y, **kwargs)


def test_bad_loss_inputs_name_them():
    zs, zt, y = logits_pair(0, (2, 3), 5)
    with pytest.raises(ValueError, match="student_logits shape"):
        kd.kd_loss_forward(zs, zt[..., :4], y)
    with pytest.raises(ValueError, match="targets shape"):
        kd.kd_loss_forward(zs, zt, y[:, :2])
    with pytest.raises(ValueError, match="targets must be an integer array"):
        kd.kd_loss_forward(zs, zt, None, alpha=0.5)
    with pytest.raises(ValueError, match="targets hold ids"):
        kd.kd_loss_forward(zs, zt, y + 5)
    with pytest.raises(ValueError, match="teacher_logits hold -inf"):
        kd.kd_loss_forward(zs, kd.dense_logits(kd.topk_logits(zt, 2), 5), y, kind="reverse")
    with pytest.raises(ValueError, match="student_logits must be a float array"):
        kd.kd_loss_forward(y, zt, y)


# --- distill: the training hook -------------------------------------------------------------
TEACHER = mm.GPTConfig(vocab_size=67, block_size=16, n_layer=2, n_head=4, n_embd=32)
STUDENT = mm.GPTConfig(vocab_size=67, block_size=16, n_layer=1, n_head=2, n_embd=16)


def ids(n=3000, seed=0):
    return np.random.default_rng(seed).integers(0, TEACHER.vocab_size, n).astype(np.int32)


def tcfg(steps=4, **kw):
    return TrainConfig(**{**dict(steps=steps, batch_size=3, seq_len=12, lr=1e-2, warmup_steps=1,
                                 eval_interval=2, eval_batches=1), **kw})


@pytest.fixture(scope="module")
def teacher():
    """A teacher with nontrivial weights (a few steps on random ids)."""
    model = mm.GPT(TEACHER, seed=1)
    train(model, ids(seed=1), None, tcfg(steps=5), progress=False)
    return model


def run(teacher, **kw):
    kw = {"steps": 4, "train_ids": ids(), "val_ids": ids(500, 2), "train_config": tcfg(), **kw}
    return kd.distill_run(teacher, STUDENT, **kw)


def test_alpha_zero_equals_training_from_scratch(teacher):
    res = run(teacher, alpha=0.0)
    plain = mm.GPT(STUDENT, seed=0)
    ref = train(plain, ids(), ids(500, 2), tcfg(), progress=False)
    assert res.losses == ref.losses and res.evals == ref.evals
    for k, v in plain.params.items():
        assert np.array_equal(res.model.params[k], v), k


def test_distill_lowers_the_kl_to_the_teacher(teacher):
    res = run(teacher, alpha=1.0, steps=25, train_config=tcfg(lr=3e-2, eval_interval=0))
    kl = [h["kd_kl"] for h in res.history]
    assert np.mean(kl[-5:]) < 0.7 * np.mean(kl[:3])
    assert mm.distill(teacher, STUDENT, steps=2, seed=0, train_ids=ids(),
                      train_config=tcfg()).config == STUDENT


def test_distill_resumes_exactly(teacher, tmp_path):
    full = run(teacher, kind="reverse", temperature=3.0)
    out = tmp_path / "ck"
    run(teacher, kind="reverse", temperature=3.0, steps=2, out_dir=out)
    resumed = run(teacher, kind="reverse", temperature=3.0, out_dir=out, resume=True)
    assert resumed.start_step == 2 and resumed.losses == full.losses
    for k, v in full.model.params.items():
        assert np.array_equal(resumed.model.params[k], v), k
    with pytest.raises(ValueError, match="resume with the same settings"):
        run(teacher, kind="reverse", temperature=2.0, out_dir=out, resume=True)


def test_topk_table_equals_the_online_teacher_when_k_is_v(teacher):
    online = run(teacher, alpha=1.0)
    table = run(teacher, alpha=1.0, top_k=TEACHER.vocab_size)
    assert_close("losses", np.array(table.losses), np.array(online.losses), "float32")
    top = kd.precompute_topk(teacher, ids(), tcfg(), 5, 12)
    assert top.values.shape == top.indices.shape == (4, 3, 12, 5)
    assert run(teacher, top_k=5).history[-1]["kd_kl"] >= 0


def test_micro_batches_read_the_right_rows_of_the_table(teacher):
    whole = run(teacher, alpha=1.0, top_k=7)
    micro = run(teacher, alpha=1.0, top_k=7, train_config=tcfg(micro_batch_size=1))
    assert_close("losses", np.array(micro.losses), np.array(whole.losses), "float32")


def test_distill_bad_input_names_it(teacher):
    with pytest.raises(ValueError, match="student_config.vocab_size=66"):
        kd.distill(teacher, STUDENT.__class__(**{**STUDENT.to_dict(), "vocab_size": 66}),
                   train_ids=ids())
    with pytest.raises(ValueError, match="temperature=0"):
        kd.distill(teacher, STUDENT, temperature=0, train_ids=ids())
    with pytest.raises(ValueError, match="alpha=2"):
        kd.distill(teacher, STUDENT, alpha=2, train_ids=ids())
    with pytest.raises(ValueError, match="kind='kl'"):
        kd.distill(teacher, STUDENT, kind="kl", train_ids=ids())
    with pytest.raises(ValueError, match="tokenizer=None"):
        kd.distill(teacher, STUDENT)
    with pytest.raises(ValueError, match="tokenizer .* is not the teacher's"):
        kd.distill(teacher, STUDENT, tokenizer=BPETokenizer.train("ab" * 200, 260))
    with pytest.raises(ValueError, match="kind='reverse' with top_k"):
        kd.distill(teacher, STUDENT, kind="reverse", top_k=3, train_ids=ids())
    with pytest.raises(ValueError, match="teacher must be a minillm.GPT"):
        kd.distill("teacher", STUDENT, train_ids=ids())
    with pytest.raises(ValueError, match="seq_len=20"):
        kd.distill(teacher, STUDENT.__class__(**{**STUDENT.to_dict(), "block_size": 32}),
                   train_ids=ids(), train_config=tcfg(seq_len=20))


# --- the device stand-in --------------------------------------------------------------------
@pytest.mark.parametrize("active", ["numpy", "numba"])
def test_distill_runs_on_the_device_standin(teacher, active):
    if not backend.available()[active][0]:
        pytest.skip(backend.available()[active][1])
    host = run(teacher, kind="forward", top_k=9)
    dev_teacher = mm.GPT(TEACHER, params={k: v.copy() for k, v in teacher.params.items()})
    dev_teacher.to("standin")
    with backend.use(active):
        for kind, top_k in (("forward", 9), ("reverse", None)):
            res = run(dev_teacher, kind=kind, top_k=top_k)
            assert all(isinstance(v, standin.DeviceArray) for v in res.model.params.values())
            if top_k:
                assert_close("losses", np.array(res.losses), np.array(host.losses), "float32")
        zs = dev_teacher.forward(ids(24).reshape(2, 12))
        loss, cache = kd.kd_loss_forward(zs, zs * 2, None, 2.0, 1.0, "reverse")
        assert isinstance(kd.kd_loss_backward(1.0, cache), standin.DeviceArray)


# --- the command ----------------------------------------------------------------------------
TINY = ["--block-size", "32", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert main(["train", "--preset", "tiny", "--n-embd", "32", *TINY, "--corpus",
                 str(corpus_file), "--vocab-size", "300", "--steps", "3", "--out", str(out)]) == 0
    return out


def test_cli_distill_trains_and_resumes_exactly(teacher_dir, corpus_file, tmp_path, capsys):
    base = ["distill", "--teacher", str(teacher_dir), "--corpus", str(corpus_file), "--preset",
            "tiny", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", *TINY]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*base, "--steps", "4", "--temperature", "3", "--out", str(full)]) == 0
    assert "val loss" in capsys.readouterr().out
    student = mm.GPT.load(full)
    assert (student.config.n_layer, student.config.vocab_size) == (1, 300)
    assert (full / "tokenizer.model").read_bytes() == (teacher_dir / "tokenizer.model").read_bytes()
    assert main([*base, "--steps", "2", "--temperature", "3", "--out", str(part)]) == 0
    assert main(["distill", "--teacher", str(teacher_dir), "--corpus", str(corpus_file),
                 "--out", str(part), "--resume", "--steps", "4", "--no-progress"]) == 0
    a, b = checkpoint.load_meta(full), checkpoint.load_meta(part)
    assert a["history"] == [dict(h, tokens_per_s=g["tokens_per_s"])
                            for h, g in zip(b["history"], a["history"])]


def run_error(capsys, argv) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    return capsys.readouterr().err


def test_cli_distill_errors(teacher_dir, corpus_file, tmp_path, capsys):
    base = ["distill", "--teacher", str(teacher_dir), "--corpus", str(corpus_file), *TINY]
    err = run_error(capsys, [*base, "--alpha", "1.5", "--steps", "2", "--out", str(tmp_path / "a")])
    assert "minillm distill: error: alpha=1.5" in err
    err = run_error(capsys, ["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "b")])
    assert "holds no tokenizer.model" in err
    err = run_error(capsys, [*base, "--resume", "--out", str(tmp_path / "c")])
    assert "--resume" in err
    assert "--teacher" in run_error(capsys, ["distill", "--out", "x"])


def test_tour_row_distills_and_compares_with_scratch(tmp_path):
    from minillm import tour
    rows = tour.run_tour(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", quick=True,
                         techniques=["distillation"], progress=False)
    names = [r.technique for r in rows]
    assert names == ["baseline", "distillation", "distillation_scratch"]
    kd_row, scratch = rows[1], rows[2]
    assert kd_row.params == scratch.params < rows[0].params
    assert kd_row.val_ppl > 0 and scratch.val_ppl > 0 and "scratch ppl" in kd_row.notes
