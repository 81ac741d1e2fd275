"""minillm.parallel: Megatron tensor parallelism and data parallelism equal the single process.

- sharding then gathering is the identity (hypothesis: shapes, N in {1, 2, 4});
- the simulated communicator's collectives, counts, and a failing rank that releases the others;
- column- and row-parallel linear forward/backward against float64 central differences;
- TP = 2, 4 and DP = 2 (simulated ranks): forward, loss, every gradient and 5 AdamW steps
  with the global-norm clip equal the single process (float64 1e-10, float32 1e-5);
  generation with the KV cache split by heads gives the same tokens;
- per-rank bytes and collective bytes/calls against the formulas;
- a TP checkpoint is one unsharded model; resuming it with another N continues exactly;
- the device stand-in runs the single-rank path;
- bad input: ValueErrors naming the argument; mpi4py missing says how to install;
- the CLI under a real ``mpiexec -n 2`` (subprocess): train TP/DP = single, generate, a
  failing rank ends the job with its message and no checkpoint;
- ``mpi``-marked tests: the same equalities over real MPI ranks. ``make test`` runs them
  as ``mpiexec -n 2 python -m pytest -m mpi tests/test_parallel.py``; in a plain run
  (one rank) they skip.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import checkpoint, parallel as par
from minillm.train import TrainConfig, train
from tests import standin
from tests.conftest import mpi_status, mpiexec_path
from tests.helpers import assert_close, check_grads

CFG = mm.GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16, dtype="float64")
TC = TrainConfig(steps=5, batch_size=4, seq_len=8, warmup_steps=1, eval_interval=0, grad_clip=0.5)
TOL = {"float64": {"rtol": 1e-10, "atol": 1e-12}, "float32": {"rtol": 1e-5, "atol": 1e-6}}


def nontrivial(cfg=CFG, seed=0):
    """GPT-2 init moved by noise: LayerNorms off 1/0, biases off 0."""
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


def batch(cfg=CFG, B=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, cfg.vocab_size, (B, cfg.block_size)),
            rng.integers(0, cfg.vocab_size, (B, cfg.block_size)))


def data(cfg=CFG, n=600, seed=2):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n)


def gather_grads(comm, grads: dict) -> dict:
    """Full gradients from every rank's slices (a collective)."""
    return {k: par.unshard(comm.allgather(g), par.split_rule(k)) if par.split_rule(k) else g
            for k, g in grads.items()}


# --- the bodies: run on simulated ranks here and on MPI ranks in the mpi tests -------------
def check_forward_and_grads(comm, dtype="float64"):
    """ParallelGPT's logits, loss and every gradient equal the single process's."""
    full = nontrivial(dataclasses.replace(CFG, dtype=dtype))
    x, y = batch()
    loss, grads = full.loss_and_grads(x, y)
    model = par.ParallelGPT(full, comm)
    got_loss, got = model.loss_and_grads(x, y)
    tol = TOL[dtype]
    assert_close("logits", model.forward(x), full.forward(x), **tol)
    assert_close("loss", np.array(got_loss), np.array(loss), **tol)
    assert set(got) == set(grads)
    for k, g in gather_grads(comm, got).items():
        assert_close(f"grad {k}", g, grads[k], **tol)
    assert_close("grad norm", np.array(model.grad_norm(got)), np.array(mm.optim.grad_norm(grads)), **tol)


def check_training(comm, tp_n, dp_n, dtype="float64", out=None):
    """5 AdamW steps with the global clip equal the single run (losses, norms, weights)."""
    cfg = dataclasses.replace(CFG, dtype=dtype)
    ref = train(nontrivial(cfg), data(), None, TC, progress=False)
    tp, dp = par.grid(tp_n, dp_n, comm)
    model = par.ParallelGPT(nontrivial(cfg), tp, dp)
    res = train(model, data(), None, TC, progress=False, out_dir=out,
                hooks=[par.ParallelStep(TC.grad_clip, model)])
    tol = TOL[dtype]
    assert max(h["grad_norm"] for h in ref.history) > TC.grad_clip     # the clip did work
    assert_close("losses", np.array(res.losses), np.array(ref.losses), **tol)
    assert_close("grad norms", np.array([h["grad_norm"] for h in res.history]),
                 np.array([h["grad_norm"] for h in ref.history]), **tol)
    full = model.gather()
    for k, v in ref.model.params.items():
        got = full.params[k]
        if dtype == "float32" and k.endswith("c_attn.bias"):
            # The key bias has an exactly zero gradient (q . b_k is the same for every key:
            # softmax ignores it); in float32 its computed gradient is rounding noise that
            # AdamW's m / sqrt(v) scales up to ~lr, so any other summation order moves it.
            C = CFG.n_embd
            assert np.abs(ref.model.params[k][C:2 * C] - nontrivial(cfg).params[k][C:2 * C]).max() < 0.05
            got, v = np.delete(got, np.s_[C:2 * C]), np.delete(v, np.s_[C:2 * C])
        assert_close(f"param {k} after 5 steps", got, v, **tol)
    assert_close("logits after 5 steps", full.forward(batch()[0]), ref.model.forward(batch()[0]), **tol)
    return ref


def check_generation(comm):
    """TP decoding (KV cache split by heads) samples the single process's tokens."""
    full = nontrivial(dataclasses.replace(CFG, dtype="float32", block_size=16))
    prompt = np.array([[3, 1, 4], [1, 5, 9]])
    want = full.generate(prompt, 10, temperature=1.0, top_k=8, seed=7)
    model = par.ParallelGPT(full, comm)
    got = model.generate(prompt, 10, temperature=1.0, top_k=8, seed=7)
    assert np.array_equal(got, want)
    cache = mm.kv_cache.KVCache.for_model(model.decode_model(), 2, 13)
    assert cache.layers[0][0].shape[1] == CFG.n_head // comm.size            # H/N heads here
    assert cache.nbytes * comm.size == mm.kv_cache.KVCache.for_model(full, 2, 13).nbytes


# --- sharding ------------------------------------------------------------------------------------
@given(N=st.sampled_from([1, 2, 4]), lead=st.integers(1, 5), per=st.integers(1, 3),
       rule=st.sampled_from(["rows", "cols", "qkv", None]), seed=st.integers(0, 99))
@settings(deadline=None, max_examples=30)
def test_shard_then_unshard_is_the_identity(N, lead, per, rule, seed):
    n = N * per * (3 if rule == "qkv" else 1)
    shape = (n, lead) if rule == "rows" else (lead, n)
    a = np.random.default_rng(seed).standard_normal(shape)
    parts = [par.shard(a, rule, r, N) for r in range(N)]
    assert sum(p.size for p in parts) == (a.size * N if rule is None else a.size)
    assert np.array_equal(par.unshard(parts, rule), a)
    gathered = par.run_simulated(N, lambda c: par.unshard(c.allgather(parts[c.rank]), rule))
    assert all(np.array_equal(g, a) for g in gathered)


def test_qkv_split_keeps_whole_heads():
    """Rank r's c_attn columns are heads r H/N.. of q, of k and of v (attention.split_qkv)."""
    full = nontrivial()
    H, N = CFG.n_head, 2
    w = full.params["h.0.attn.c_attn.weight"]
    q, k, v = mm.attention.split_qkv(w[None], H)                              # 3 x (1, H, C, D)
    for r in range(N):
        qr, kr, vr = mm.attention.split_qkv(par.shard(w, "qkv", r, N)[None], H // N)
        for got, ref in ((qr, q), (kr, k), (vr, v)):
            assert np.array_equal(got, ref[:, r * H // N:(r + 1) * H // N])


@given(N=st.sampled_from([1, 2, 4]), seed=st.integers(0, 9))
@settings(deadline=None, max_examples=6)
def test_shard_params_then_gather_params_is_the_identity(N, seed):
    full = nontrivial(seed=seed)
    shards = [par.shard_params(full.params, CFG, r, N) for r in range(N)]
    back = par.gather_params(shards)
    assert all(np.array_equal(back[k], v) for k, v in full.params.items())
    assert shards[0]["h.0.attn.c_attn.weight"].shape == (16, 3 * 16 // N)
    assert shards[0]["h.1.mlp.c_proj.weight"].shape == (64 // N, 16)
    assert shards[0]["wte.weight"].shape == (32 // N, 16)


# --- the simulated communicator ----------------------------------------------------------------
def test_simulated_collectives_and_counts():
    def body(c):
        x = np.full(3, c.rank + 1.0)
        out = (c.allreduce(x), c.allreduce(x, op="max"), c.allgather(x), c.broadcast(x, root=2))
        c.barrier()
        return out, c.counts
    for (s, m, g, b), counts in par.run_simulated(3, body):
        assert np.array_equal(s, [6.0] * 3) and np.array_equal(m, [3.0] * 3)
        assert [a[0] for a in g] == [1, 2, 3] and np.array_equal(b, [3.0] * 3)
        assert counts == {"allreduce": [2, 48], "allgather": [1, 24], "broadcast": [1, 24]}


def test_a_failing_rank_releases_the_others_and_is_named():
    def body(c):
        if c.rank == 1:
            raise ValueError("rank one breaks")
        return c.allreduce(np.ones(2))                 # would wait forever for rank 1
    with pytest.raises(RuntimeError, match="rank 1 of 3 failed: ValueError: rank one breaks"):
        par.run_simulated(3, body, timeout=30)


# --- column/row-parallel linears against central differences ----------------------------------
@pytest.mark.parametrize("role", ["mlp.c_fc", "attn.c_attn", "mlp.c_proj"])
def test_parallel_linear_backward_matches_central_differences(role, rng):
    N, C, F = 2, 6, 12 if role != "attn.c_attn" else 3 * 4
    name = f"h.0.{role}"
    rule = par.split_rule(name + ".weight")
    row = rule == "rows"
    x = rng.standard_normal((2, 3, F if row else C))
    w = rng.standard_normal((F, C) if row else (C, F))
    b = rng.standard_normal(C if row else F)
    dout = rng.standard_normal((2, 3, C if row else F))
    kind = mm.seams.linear_kind("tensor_parallel")

    def ranks(c, backward):
        xs = par.shard(x, "cols", c.rank, N) if row else x                 # a row layer takes x split
        lp = {"weight": par.shard(w, rule, c.rank, N), "bias": b if row else par.shard(b, rule, c.rank, N)}
        with par.tensor_parallel(c):
            y, cache = kind.forward(lp, xs, name)
            if not backward:
                return y
            dy = dout if row else par.shard(dout, rule, c.rank, N)
            return kind.backward(dy, cache)

    def forward():
        ys = par.run_simulated(N, lambda c: ranks(c, False))
        return ys[0] if row else par.unshard(ys, rule)

    out = par.run_simulated(N, lambda c: ranks(c, True))
    dx = par.unshard([o[0] for o in out], "cols") if row else out[0][0]
    dw = par.unshard([o[1]["weight"] for o in out], rule)
    db = out[0][1]["bias"] if row else par.unshard([o[1]["bias"] for o in out], rule)
    assert_close("y", forward(), x @ w + b)
    check_grads(role, lambda: float((forward() * dout).sum()), [x, w, b], [dx, dw, db],
                rng=rng, max_entries=5)


# --- the model over simulated ranks ------------------------------------------------------------
@pytest.mark.parametrize("N", [2, 4])
def test_tensor_parallel_forward_loss_grads_equal_single_float64(N):
    par.run_simulated(N, check_forward_and_grads)


def test_tensor_parallel_forward_loss_grads_equal_single_float32():
    par.run_simulated(2, functools.partial(check_forward_and_grads, dtype="float32"))


@pytest.mark.parametrize("tp_n, dp_n, dtype", [(2, 1, "float64"), (1, 2, "float64"),
                                               (2, 1, "float32"), (1, 2, "float32")])
def test_five_adamw_steps_with_clip_equal_single(tp_n, dp_n, dtype):
    par.run_simulated(tp_n * dp_n, lambda c: check_training(c, tp_n, dp_n, dtype))


def test_tensor_parallel_generation_gives_the_same_tokens():
    par.run_simulated(2, check_generation)


def test_per_rank_bytes_are_one_nth_of_the_split_plus_the_replicated():
    full = nontrivial()
    split = sum(v.nbytes for k, v in full.params.items() if par.split_rule(k))
    repl = full.nbytes() - split
    x, y = batch()

    def body(c):
        model = par.ParallelGPT(full, c)
        _, grads = model.loss_and_grads(x, y)
        return par.memory_per_rank(model, grads, mm.optim.AdamW(model.trainable()), 3, 8)
    for N in (1, 2, 4):
        got = par.run_simulated(N, body)
        assert got == [par.memory_formula(CFG, N, 3, 8)] * N
        assert got[0]["weights"] == split // N + repl
        assert got[0]["kv_cache"] == 2 * CFG.n_layer * 3 * (CFG.n_head // N) * 8 * CFG.head_size * 8


def test_collective_bytes_and_calls_match_megatrons_count():
    """Per forward+backward: 2 all-reduces of B*T*C per block each way, 1 for the
    embedding, 1 for the head's input gradient, and the cross-entropy's 3 N-vectors."""
    x, y = batch()
    B, T, C, L = *x.shape, CFG.n_embd, CFG.n_layer

    def body(c):
        model = par.ParallelGPT(nontrivial(), c)
        c.reset_counts()
        model.loss_and_grads(x, y)
        return c.reset_counts()
    counts = par.run_simulated(2, body)[0]
    assert counts == {"allreduce": [4 * L + 2 + 2, ((4 * L + 2) * B * T * C + 3 * B * T) * 8]}

    def step(c):
        model = par.ParallelGPT(nontrivial(), c)
        c.reset_counts()
        train(model, data(), None, dataclasses.replace(TC, steps=1, batch_size=B), progress=False,
              hooks=[par.ParallelStep(1.0, model)])
        return c.counts
    want = par.comm_formula(CFG, B, T, tensor_parallel=2)                # + the global norm
    assert par.run_simulated(2, step)[0]["allreduce"] == [want["allreduce_calls"], want["allreduce_bytes"]]


def test_data_parallel_sends_every_gradient_once_per_step():
    def body(c):
        model = par.ParallelGPT(nontrivial(), None, c)
        train(model, data(), None, dataclasses.replace(TC, steps=1), progress=False,
              hooks=[par.ParallelStep(1.0, model)])
        return c.counts
    want = par.comm_formula(CFG, 4, 8, data_parallel=2)
    assert par.run_simulated(2, body)[0]["allreduce"] == [want["allreduce_calls"], want["allreduce_bytes"]]


# --- checkpoints: one unsharded model, resumable with any N ------------------------------------
def test_tensor_parallel_checkpoint_is_unsharded_and_resumes_with_another_n(tmp_path):
    out = tmp_path / "tp"
    long = dataclasses.replace(TC, steps=5)
    short = dataclasses.replace(TC, steps=3)

    def run(c, tcfg, resume):
        model = par.ParallelGPT(nontrivial(), c)
        return train(model, data(), None, tcfg, out_dir=out, resume=resume, progress=False,
                     hooks=[par.ParallelStep(tcfg.grad_clip, model)]).losses
    par.run_simulated(2, lambda c: run(c, short, False))
    saved = mm.GPT.load(out)                                # an ordinary model directory
    assert saved.config == CFG and saved.params["wte.weight"].shape == (32, 16)
    assert checkpoint.load_meta(out)["hooks"] == ["clip"]
    resumed = par.run_simulated(4, lambda c: run(c, long, True))[0]
    train(nontrivial(), data(), None, short, out_dir=tmp_path / "one", progress=False)
    ref = train(nontrivial(), data(), None, long, out_dir=tmp_path / "one", resume=True, progress=False)
    assert_close("losses after resuming TP=2 as TP=4", np.array(resumed), np.array(ref.losses),
                 **TOL["float64"])
    plain = train(mm.GPT.load(out), data(), None, long, out_dir=out, resume=True, progress=False)
    assert plain.start_step == 5                            # a single process resumes it too


# --- the device stand-in: the single-rank path ---------------------------------------------------
def test_device_standin_runs_the_single_rank_path():
    cpu = nontrivial(dataclasses.replace(CFG, dtype="float32"))
    dev = mm.GPT(cpu.config, params={k: v.copy() for k, v in cpu.params.items()}).to("standin")
    x, y = batch()
    loss, grads = cpu.loss_and_grads(x, y)
    model = par.ParallelGPT(dev)
    got_loss, got = model.loss_and_grads(x, y)
    assert all(isinstance(g, standin.DeviceArray) for g in got.values())
    assert_close("loss", np.array(got_loss), np.array(loss), **TOL["float32"])
    for k in grads:
        assert_close(k, got[k], grads[k], **TOL["float32"])
    tokens = model.generate(x[:1, :3], 4, temperature=0)
    assert np.array_equal(tokens, cpu.generate(x[:1, :3], 4, temperature=0))


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, N, match", [
    ({"n_head": 2, "n_embd": 16}, 4, "n_head=2"),
    ({"vocab_size": 30}, 4, "vocab_size=30"),
    ({}, 3, "vocab_size=32"),
])
def test_divisibility_is_checked_naming_the_flag(change, N, match):
    model = mm.GPT(dataclasses.replace(CFG, **change))
    with pytest.raises(ValueError, match=f"--tensor-parallel={N}: .*{match}"):
        par.shard_params(model.params, model.config, 0, N)


def test_pruned_mlp_width_must_divide_too():
    model = nontrivial()
    from minillm import pruning
    pruned = pruning.prune(model, "neurons", 0.25, batch()[0])               # F = 48 per layer
    with pytest.raises(ValueError, match="--tensor-parallel=32: block 0"):
        par.shard_params(pruned.params, pruned.config, 0, 32)


def test_world_size_must_equal_tp_times_dp():
    with pytest.raises(ValueError, match=r"--tensor-parallel=2 x --data-parallel=1 needs 2 ranks; "
                                         r"this job has 1 \(start it with mpiexec -n 2\)"):
        par.grid(2, 1, par.LocalComm())
    with pytest.raises(RuntimeError, match="needs 4 ranks; this job has 2"):
        par.run_simulated(2, lambda c: par.grid(2, 2, c))
    with pytest.raises(ValueError, match="tensor_parallel=0 must be an int >= 1"):
        par.grid(0, 1, par.LocalComm())


def test_other_bad_input():
    with pytest.raises(ValueError, match="linear='sparse'"):
        par.ParallelGPT(mm.GPT(dataclasses.replace(CFG, linear="sparse")))
    with pytest.raises(ValueError, match="float32 or float64"):
        par.ParallelGPT(mm.GPT(dataclasses.replace(CFG, dtype="float16")))
    with pytest.raises(ValueError, match="--precision='bf16' is not supported"):
        par.parallel_training(mm.GPT(CFG), dataclasses.replace(TC, precision="bf16"),
                              par.LocalComm(), par.LocalComm())
    with pytest.raises(ValueError, match="inside a ParallelGPT"):
        mm.GPT(dataclasses.replace(CFG, linear="tensor_parallel")).forward(batch()[0])
    odd = dataclasses.replace(TC, batch_size=3)

    def body(c):
        model = par.ParallelGPT(mm.GPT(CFG), None, c)
        train(model, data(), None, odd, progress=False, hooks=[par.ParallelStep(1.0, model)])
    with pytest.raises(RuntimeError, match="batch of 3 rows .* not divisible by --data-parallel=2"):
        par.run_simulated(2, body)


def test_missing_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RuntimeError, match="pip install mpi4py mpich"):
        par.mpi()
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(RuntimeError, match="pip install mpi4py mpich"):
        par.world()


def test_cli_without_mpiexec_names_the_flag(tmp_path, corpus_file, capsys):
    from minillm.cli import main
    rc = main(["train", "--preset", "tiny", "--tensor-parallel", "2", "--steps", "1",
               "--corpus", str(corpus_file), "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert "--tensor-parallel=2 x --data-parallel=1 needs 2 ranks; this job has 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- the CLI under a real mpiexec (subprocesses) --------------------------------------------------
needs_mpiexec = pytest.mark.skipif(os.environ.get("PMI_SIZE") is not None or not mpi_status()[0],
                                   reason="needs mpiexec + mpi4py (and not already inside mpiexec)")
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def minillm_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "minillm.cli", *map(str, args)]


def mpirun(n, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([mpiexec_path(), "-n", str(n), *minillm_cmd(*args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@needs_mpiexec
def test_cli_tp_and_dp_runs_equal_the_single_process(tmp_path, corpus_file):
    common = ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
              "--corpus", corpus_file, "--eval-batches", "1", "--no-progress"]
    single = subprocess.run(minillm_cmd("train", *common, "--out", tmp_path / "one"),
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert single.returncode == 0, single.stderr
    for flag in ("--tensor-parallel", "--data-parallel"):
        run = mpirun(2, "train", *common, flag, 2, "--out", tmp_path / flag)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("checkpoint:") == 1                 # rank 0 speaks for the job
        got = checkpoint.load_meta(tmp_path / flag)["history"]
        want = checkpoint.load_meta(tmp_path / "one")["history"]
        assert_close(f"{flag} losses", np.array([h["loss"] for h in got]),
                     np.array([h["loss"] for h in want]), **TOL["float32"])
        a, b = mm.GPT.load(tmp_path / flag), mm.GPT.load(tmp_path / "one")
        for k in b.params:
            assert_close(f"{flag} {k}", a.params[k], b.params[k], rtol=1e-4, atol=1e-5)
    gen = ["generate", "--prompt", "And God said", "--max-new-tokens", "12", "--seed", "3"]
    want = subprocess.run(minillm_cmd(*gen, "--model", tmp_path / "one"), capture_output=True,
                          text=True, timeout=60, env=ENV).stdout
    got = mpirun(2, *gen, "--model", tmp_path / "one", "--tensor-parallel", 2)
    assert got.returncode == 0 and got.stdout == want, got.stderr


@needs_mpiexec
def test_cli_a_failing_rank_ends_the_job_with_its_message(tmp_path, corpus_file):
    out = tmp_path / "tp"
    args = ["train", "--preset", "tiny", "--tensor-parallel", 2, "--steps", 2, "--out", out,
            "--no-progress", "--corpus"]
    cmd = [mpiexec_path(), "-n", "1", *minillm_cmd(*args, corpus_file), ":",
           "-n", "1", *minillm_cmd(*args, tmp_path / "missing.txt")]        # rank 1 fails
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode != 0
    assert "minillm train: error on rank 1 of 2: ValueError: corpus path=" in run.stderr
    assert not out.exists() and not list(tmp_path.glob(".tp.*"))          # no checkpoint, no debris


# --- the same equalities over real MPI ranks (make test: mpiexec -n 2 pytest -m mpi) ------------
def mpi_test(fn):
    """An mpi test runs on every rank of the job; a rank whose test fails prints why and
    aborts the job, so no rank is left waiting in a collective."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if par.launched_size() < 2:
            pytest.skip("runs under mpiexec -n 2 (make test)")
        comm = par.world()
        try:
            fn(comm, *args, **kwargs)
        except BaseException:
            sys.stderr.write(f"\nrank {comm.rank} of {comm.size} failed {fn.__name__}:\n"
                             f"{traceback.format_exc()}")
            comm.abort(1)
    run.__signature__ = __import__("inspect").Signature()       # pytest: no fixtures to fill
    return pytest.mark.mpi(run)


@mpi_test
def test_mpi_shard_gather_and_collectives(comm):
    a = np.arange(24.0).reshape(4, 6)
    for rule in ("rows", "cols", "qkv"):
        assert np.array_equal(par.unshard(comm.allgather(par.shard(a, rule, comm.rank, comm.size)), rule), a)
    assert np.array_equal(comm.allreduce(np.full(2, comm.rank + 1.0), op="max"), [comm.size] * 2)
    assert comm.broadcast(np.full(1, comm.rank), root=1)[0] == 1


@mpi_test
def test_mpi_tensor_parallel_equals_single(comm):
    check_forward_and_grads(comm)
    check_forward_and_grads(comm, "float32")
    check_generation(comm)


@mpi_test
def test_mpi_five_steps_tp_and_dp_equal_single(comm):
    for tp_n, dp_n in ((comm.size, 1), (1, comm.size)):
        check_training(comm, tp_n, dp_n, "float32")


@mpi_test
def test_mpi_rank0_writes_one_unsharded_checkpoint(comm):
    import tempfile
    name = np.zeros(200, dtype=np.uint8)                      # rank 0's directory, sent to all
    if comm.rank == 0:
        raw = tempfile.mkdtemp(prefix="minillm-mpi-").encode()
        name[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    out = Path(bytes(comm.broadcast(name)).rstrip(b"\0").decode()) / "tp"
    ref = check_training(comm, comm.size, 1, "float64", out=out)
    saved = mm.GPT.load(out)
    for k, v in ref.model.params.items():
        assert_close(k, saved.params[k], v, **TOL["float64"])


def run_ranks(n: int, code: str, timeout=120) -> subprocess.CompletedProcess:
    """``code`` (Python, with ``comm`` = this rank's world) on ``n`` MPI ranks."""
    prog = ("import sys; sys.path.insert(0, %r)\nfrom minillm import parallel as par\n"
            "comm = par.world()\n" % str(Path(__file__).resolve().parents[1])) + code
    return subprocess.run([mpiexec_path(), "-n", str(n), sys.executable, "-c", prog],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@needs_mpiexec
def test_tensor_times_data_parallel_grid_of_four_ranks_equals_single():
    run = run_ranks(4, "from tests.test_parallel import check_training\n"
                       "with par.abort_on_error(comm, 'grid'):\n"
                       "    check_training(comm, 2, 2, 'float64')\n"
                       "    tp, dp = par.grid(2, 2, comm)\n"
                       "    import numpy as np\n"
                       "    got = comm.allgather(np.array([comm.rank, tp.rank, dp.rank]))\n"
                       "    if comm.rank == 0:\n"
                       "        print([a.tolist() for a in got])\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[[0, 0, 0], [1, 1, 0], [2, 0, 1], [3, 1, 1]]"    # tensor groups contiguous


@needs_mpiexec
def test_a_rank_failing_mid_run_leaves_the_last_whole_checkpoint(tmp_path):
    """Rank 1 raises at step 3 of a run that checkpoints every 2 steps: the job ends with
    rank 1's message; the directory holds step 2's complete checkpoint and no debris."""
    out = tmp_path / "tp"
    run = run_ranks(2, f"""
import dataclasses
import minillm as mm
from minillm.train import TrainHook, train
from tests.test_parallel import TC, data, nontrivial

class Fail(TrainHook):
    name = "fail"
    def transform_grads(self, grads, step, record):
        if step == 2 and comm.rank == 1:
            raise RuntimeError("rank 1 lost its GPU")
        return grads

with par.abort_on_error(comm, "test"):
    model = par.ParallelGPT(nontrivial(), comm)
    train(model, data(), None, dataclasses.replace(TC, checkpoint_interval=2), out_dir={str(out)!r},
          progress=False, hooks=[Fail(), par.ParallelStep(TC.grad_clip, model)])
""")
    assert run.returncode != 0
    assert "test: error on rank 1 of 2: RuntimeError: rank 1 lost its GPU" in run.stderr
    assert checkpoint.load_meta(out)["step"] == 2
    assert mm.GPT.load(out).params["wte.weight"].shape == (32, 16)          # whole, unsharded
    assert [p.name for p in tmp_path.iterdir()] == ["tp"]                     # no temp directories
