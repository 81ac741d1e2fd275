"""Tensor splitting: Megatron tensor parallelism and data parallelism over MPI ranks.

What it changes against the baseline: one process holds every weight and runs
every matmul. Here N ranks (processes started by ``mpiexec -n N``, or threads
of one process for tests) each hold a *slice* of every large matrix and compute
with it; collectives (all-reduce, all-gather) stitch the slices together so
that each rank sees exactly the activations the single process would. The
split is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", sec. 3):

    column-parallel   c_attn (C -> 3HD): rank r keeps heads r H/N .. (r+1) H/N - 1 of q, k and v
                      c_fc   (C -> F):   rank r keeps columns r F/N .. (r+1) F/N - 1
    row-parallel      attn.c_proj (HD -> C), mlp.c_proj (F -> C): the matching rows
    vocab-parallel    wte (V, C): rank r keeps token ids r V/N .. (r+1) V/N - 1, so the
                      embedding lookup and the tied LM head + cross-entropy are split too
    replicated        wpe, LayerNorms, the c_projs' biases (tiny)

A column-parallel layer needs its input whole and leaves its output split;
attention (per head) and GELU (per element) work on the split directly; a
row-parallel layer takes the split input and leaves *partial sums* of its
output, which one all-reduce adds up. The two conjugate operators of the paper
(its Fig. 3) are where the collectives go:

    f: forward identity,   backward all-reduce   (before c_attn, c_fc, the LM head)
    g: forward all-reduce, backward identity     (after the c_projs, the embedding)

so a block costs two all-reduces of B*T*C numbers forward and two backward.
Each rank's weights, gradients and AdamW moments are ~1/N of the split
matrices plus the replicated vectors; its KV cache holds its own H/N heads.

Data parallelism (every rank holds the whole model and 1/N of the batch rows)
adds one all-reduce of all gradients per step. Tensor x data parallel: a grid of
``tensor_parallel * data_parallel`` ranks, tensor groups contiguous (as Megatron).

How it joins the baseline: the blocks run ``transformer.block_forward/backward``
unchanged with the linear kind ``"tensor_parallel"`` (``seams.LinearKind``),
whose forward/backward put f and g around the dense matmuls; ``ParallelGPT``
holds one rank's slices and adds the vocab-parallel embedding and loss;
``ParallelStep`` is the training-step hook (``train.TrainHook``): data-parallel
batch split and gradient all-reduce, and the gradient-norm clip over the
*global* norm. A checkpoint is gathered and written by rank 0 as one ordinary
unsharded model directory; loading one shards it again (any N).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

from . import layers, seams, transformer
from .backend import to_numpy, xp_of
from .model import GPT
from .tour import Row, TourContext, technique
from .train import ClipGradNorm

INSTALL_HINT = "pip install mpi4py mpich"


# --- communicators --------------------------------------------------------------------------
class Communicator:
    """What a rank needs of MPI: its ``rank`` among ``size``, the collectives below,
    and counters: ``counts[op] = [calls, bytes]`` (the payload each rank puts in) and
    ``seconds[op]`` (wall time inside the collective, waiting for slower ranks included)."""

    rank, size = 0, 1

    def __init__(self):
        self.counts: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}

    def _timed(self, op: str, x, run):
        c = self.counts.setdefault(op, [0, 0])
        c[0] += 1
        c[1] += int(x.nbytes)
        t0 = time.perf_counter()
        out = run()
        self.seconds[op] = self.seconds.get(op, 0.0) + time.perf_counter() - t0
        return out

    def reset_counts(self) -> dict:
        """Return the counts so far and start again from zero (the seconds too)."""
        out, self.counts, self.seconds = self.counts, {}, {}
        return out

    def allreduce(self, x, op: str = "sum"):
        """Every rank gets the elementwise sum (or max) of everyone's ``x``."""
        if op not in ("sum", "max"):
            raise ValueError(f"op={op!r} must be 'sum' or 'max'")
        return self._timed("allreduce", x, lambda: self._allreduce(x, op))

    def allgather(self, x) -> list:
        """Every rank gets everyone's ``x`` (equal shapes), in rank order."""
        return self._timed("allgather", x, lambda: self._allgather(x))

    def broadcast(self, x, root: int = 0):
        """Every rank gets rank ``root``'s ``x`` (the others pass an array of that shape)."""
        return self._timed("broadcast", x, lambda: self._broadcast(x, root))

    def barrier(self) -> None:
        """Return only when every rank has called it."""

    def split(self, color: int, key: int) -> "Communicator":
        """The ranks of equal ``color`` as a new communicator, ordered by ``key``."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End every rank of the job (a failing rank must not leave the others waiting)."""
        raise SystemExit(code)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class LocalComm(Communicator):
    """A world of one rank: every collective returns its input (still counted)."""

    def _allreduce(self, x, op):
        return x

    def _allgather(self, x):
        return [x]

    def _broadcast(self, x, root):
        return x

    def split(self, color, key):
        return LocalComm()


class MPIComm(Communicator):
    """The collectives of an ``mpi4py`` communicator, on NumPy buffers (device arrays
    are copied to the host and back)."""

    def __init__(self, comm=None):
        super().__init__()
        MPI = mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _allreduce(self, x, op):
        MPI = mpi()
        buf = np.ascontiguousarray(to_numpy(x))
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM if op == "sum" else MPI.MAX)
        return xp_of(x).asarray(out)

    def _allgather(self, x):
        buf = np.ascontiguousarray(to_numpy(x))
        out = np.empty((self.size,) + buf.shape, dtype=buf.dtype)      # (N, ...)
        self.comm.Allgather(buf, out)
        return [xp_of(x).asarray(o) for o in out]

    def _broadcast(self, x, root):
        buf = np.ascontiguousarray(to_numpy(x)).copy()
        self.comm.Bcast(buf, root=root)
        return xp_of(x).asarray(buf)

    def barrier(self):
        self.comm.Barrier()

    def split(self, color, key):
        return MPIComm(self.comm.Split(color, key))

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def mpi():
    """``mpi4py.MPI``, imported on first use (minillm itself runs without it)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(f"tensor/data parallelism runs on MPI through mpi4py, which is not "
                           f"installed ({exc}): {INSTALL_HINT}") from None
    return MPI


def launched_size() -> int:
    """Ranks of the job that ``mpiexec`` started this process in (1 without mpiexec).
    Read from the launcher's environment, so MPI is not initialised to find out."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def world() -> Communicator:
    """All ranks of this job: an ``MPIComm`` when started by ``mpiexec``, else one rank."""
    return MPIComm() if launched_size() > 1 else LocalComm()


class _Rendezvous:
    """Where the threads of a simulated world meet: one slot per rank and a barrier."""

    def __init__(self, size: int, timeout: float):
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)


class SimComm(Communicator):
    """Rank ``rank`` of ``size`` threads in one process (tests, the chapter). Every
    collective reduces in rank order, so all ranks get bit-identical results."""

    def __init__(self, rank: int, size: int, rendezvous: _Rendezvous):
        super().__init__()
        self.rank, self.size, self.rdv = rank, size, rendezvous

    def _exchange(self, x) -> list:
        self.rdv.slots[self.rank] = x
        self.rdv.barrier.wait()                        # everyone has written
        got = list(self.rdv.slots)
        self.rdv.barrier.wait()                        # everyone has read: slots may be reused
        return got

    def _allreduce(self, x, op):
        got = self._exchange(x)
        out = got[0].copy()
        for y in got[1:]:
            out = out + y if op == "sum" else xp_of(out).maximum(out, y)
        return out

    def _allgather(self, x):
        return [y.copy() for y in self._exchange(x)]

    def _broadcast(self, x, root):
        return self._exchange(x)[root].copy()

    def barrier(self):
        self._exchange(None)

    def abort(self, code=1):
        self.rdv.barrier.abort()                       # the other ranks stop waiting
        raise SystemExit(code)


def run_simulated(size: int, fn, timeout: float = 120.0) -> list:
    """Run ``fn(comm)`` on ``size`` threads, one ``SimComm`` each -> their results in
    rank order. If a rank raises, the others are released and the error is re-raised
    here, naming the rank."""
    size = _check_size("size", size)
    rdv = _Rendezvous(size, timeout)
    results, errors = [None] * size, [None] * size

    def work(r):
        try:
            results[r] = fn(SimComm(r, size, rdv))
        except BaseException as exc:                   # noqa: BLE001 (re-raised below)
            errors[r] = exc
            rdv.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((r for r, e in enumerate(errors)
                  if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None:
        first = next((r for r, e in enumerate(errors) if e is not None), None)
    if first is not None:
        raise RuntimeError(f"rank {first} of {size} failed: {type(errors[first]).__name__}: "
                           f"{errors[first]}") from errors[first]
    return results


def _check_size(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name}={n!r} must be an int >= 1 (ranks)")
    return int(n)


# --- the split: which parameter is cut along which axis -----------------------------------
def split_rule(name: str) -> str | None:
    """How parameter ``name`` is split over tensor-parallel ranks: "qkv" (the heads of q,
    k and v, last axis), "cols" (last axis), "rows" (first axis) or None (replicated)."""
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        return "qkv"
    if name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias"):
        return "cols"
    if name.endswith("c_proj.weight") or name == "wte.weight":
        return "rows"
    return None                          # wpe, LayerNorms, c_proj biases


def shard(a, rule: str | None, rank: int, size: int):
    """Rank ``rank``'s slice of the full array ``a`` under ``rule`` (a copy)."""
    if rule is None:
        return a.copy()
    if rule == "rows":
        n = a.shape[0] // size
        return a[rank * n:(rank + 1) * n].copy()
    if rule == "cols":
        n = a.shape[-1] // size
        return a[..., rank * n:(rank + 1) * n].copy()
    m = a.shape[-1] // 3                               # qkv: q, k, v each m = H D columns
    n = m // size
    qkv = a.reshape(a.shape[:-1] + (3, m))             # (..., 3, HD)
    return qkv[..., rank * n:(rank + 1) * n].reshape(a.shape[:-1] + (3 * n,)).copy()


def unshard(parts: list, rule: str | None):
    """The full array from the ranks' slices (the reverse of ``shard``)."""
    xp = xp_of(parts[0])
    if rule is None:
        return parts[0].copy()
    if rule == "rows":
        return xp.concatenate(parts, axis=0)
    if rule == "cols":
        return xp.concatenate(parts, axis=-1)
    lead, n = parts[0].shape[:-1], parts[0].shape[-1] // 3
    qkv = xp.concatenate([p.reshape(lead + (3, n)) for p in parts], axis=-1)   # (..., 3, HD)
    return qkv.reshape(lead + (3 * n * len(parts),))


def check_tensor_parallel(params: dict, config, size: int) -> None:
    """Every block's heads and MLP width and the vocabulary must divide by ``size``."""
    size = _check_size("tensor_parallel", size)
    if config.linear != "dense":
        raise ValueError(f"tensor parallelism splits dense linear layers; this model has "
                         f"linear={config.linear!r}")
    if config.vocab_size % size:
        raise ValueError(f"--tensor-parallel={size}: vocab_size={config.vocab_size} is not "
                         f"divisible by it (each rank holds vocab_size / N token ids)")
    for i in range(config.n_layer):
        H, F = seams.block_dims(params, i, config)
        if H % size or F % size:
            raise ValueError(f"--tensor-parallel={size}: block {i} has n_head={H} and MLP width "
                             f"{F} (4 * n_embd); both must be divisible by it (each rank holds "
                             f"whole heads and an equal share of the MLP)")


def shard_params(params: dict, config, rank: int, size: int) -> dict:
    """Rank ``rank``'s parameters of ``size`` tensor-parallel ranks (checked divisible)."""
    check_tensor_parallel(params, config, size)
    return {k: shard(v, split_rule(k), rank, size) for k, v in params.items()}


def gather_params(shards: list[dict]) -> dict:
    """The full parameters from every rank's ``shard_params`` output (rank order)."""
    return {k: unshard([s[k] for s in shards], split_rule(k)) for k in shards[0]}


# --- the linear kind: f and g around the dense matmul ----------------------------------------
_active = threading.local()          # the communicator of this thread's tensor-parallel run


@contextlib.contextmanager
def tensor_parallel(comm: Communicator):
    """Within this block, the ``"tensor_parallel"`` linear kind communicates over ``comm``.
    (Per thread, so simulated ranks do not see each other's communicator.)"""
    before = getattr(_active, "comm", None)
    _active.comm = comm
    try:
        yield comm
    finally:
        _active.comm = before


def active_comm() -> Communicator:
    comm = getattr(_active, "comm", None)
    if comm is None:
        raise ValueError("linear='tensor_parallel' runs inside a ParallelGPT (or "
                         "parallel.tensor_parallel(comm)), which names the ranks to talk to")
    return comm


class ParallelLinearCache(NamedTuple):
    linear: layers.LinearCache
    row: bool                        # row-parallel (c_proj) or column-parallel (c_attn, c_fc)
    comm: Communicator


class TensorParallelLinear(seams.DenseLinear):
    """This rank's slice of a dense layer, with Megatron's f and g around it.

    column-parallel (c_attn, c_fc): y_r = x W_r + b_r      forward: f = identity
                                    dx = sum_r dy_r W_r^T  backward: f = all-reduce
    row-parallel (the c_projs):     y = sum_r x_r W_r + b  forward: g = all-reduce
                                    dx_r = dy W_r^T        backward: g = identity
    The row-parallel bias is added once, after the sum, and its gradient is the
    same on every rank. Parameters are stored as the dense kind's (a slice is a
    smaller dense matrix), so ``seams.block_dims`` reads H/N heads and F/N neurons.
    """

    name = "tensor_parallel"

    def forward(self, lp, x, name):
        comm = active_comm()
        if name.endswith("c_proj"):
            y, cache = layers.linear_forward(x, lp["weight"])          # (..., C) partial sums
            y = comm.allreduce(y) + lp["bias"]                          # g
            return y, ParallelLinearCache(cache, True, comm)
        y, cache = layers.linear_forward(x, lp["weight"], lp["bias"])   # (..., n_out / N)
        return y, ParallelLinearCache(cache, False, comm)

    def backward(self, dy, cache):
        dx, dw, db = layers.linear_backward(dy, cache.linear)
        if cache.row:
            db = dy.reshape(-1, dy.shape[-1]).sum(axis=0)               # (C,) the whole bias
        else:
            dx = cache.comm.allreduce(dx)                               # f's backward
        return dx, {"weight": dw, "bias": db}


seams.register_linear(TensorParallelLinear())


# --- vocab-parallel embedding and cross-entropy ---------------------------------------------
class VocabEmbeddingCache(NamedTuple):
    local: np.ndarray                # (B, T) ids relative to this rank's first id (0 where not ours)
    mine: np.ndarray                 # (B, T) bool: the id lies in this rank's vocabulary slice
    T: int


def vocab_embedding_forward(idx, wte_r, wpe, vocab_start: int, comm: Communicator):
    """x = wte[idx] + wpe[:T] with wte split by rows: each rank looks up the ids it
    holds (zeros for the others) and an all-reduce (g) adds the ranks' rows."""
    xp = xp_of(wte_r)
    T = idx.shape[1]
    local = idx - vocab_start                                           # (B, T)
    mine = (local >= 0) & (local < wte_r.shape[0])
    local = xp.where(mine, local, 0)
    tok = wte_r[local] * mine[..., None].astype(wte_r.dtype)            # (B, T, C)
    x = comm.allreduce(tok) + wpe[:T]                                   # (B, T, C) g
    return x, VocabEmbeddingCache(local, mine, T)


def vocab_embedding_backward(dx, cache: VocabEmbeddingCache, wte_r, wpe):
    """-> (dwte_r (V/N, C), dwpe (T_max, C)); dx is whole on every rank (g's backward)."""
    xp, C = xp_of(dx), dx.shape[-1]
    dwte = xp.zeros(wte_r.shape, dtype=dx.dtype)
    mask = cache.mine[..., None].astype(dx.dtype)
    xp.add.at(dwte, cache.local.reshape(-1), (dx * mask).reshape(-1, C))   # repeated ids add up
    dwpe = xp.zeros(wpe.shape, dtype=dx.dtype)
    dwpe[:cache.T] = dx.sum(axis=0)                                     # (T, C)
    return dwte, dwpe


class VocabCrossEntropyCache(NamedTuple):
    probs: np.ndarray                # (N, V/N) this rank's slice of the softmax
    local: np.ndarray                # (N,) target ids relative to this rank's first id
    mine: np.ndarray                 # (N,) bool: the target lies in this rank's slice


def vocab_cross_entropy_forward(logits_r, targets, vocab_start: int, comm: Communicator):
    """Mean cross-entropy of logits split over the vocabulary (Megatron sec. 3): the
    max, the sum of exponentials and the target's logit are all-reduced as N-vectors
    instead of gathering the (N, V) logits. -> (loss, cache)."""
    xp = xp_of(logits_r)
    V_r = logits_r.shape[-1]
    z = logits_r.reshape(-1, V_r)                                       # (N, V/N)
    t = targets.reshape(-1)                                             # (N,)
    m = comm.allreduce(z.max(axis=-1), op="max")                        # (N,) the global max
    e = xp.exp(z - m[:, None])                                          # (N, V/N)
    local = t - vocab_start
    mine = (local >= 0) & (local < V_r)
    local = xp.where(mine, local, 0)
    picked = xp.where(mine, z[xp.arange(z.shape[0]), local] - m, 0)     # (N,) 0 unless ours
    sums = comm.allreduce(xp.stack([e.sum(axis=-1), picked]))           # (2, N) one call for both
    logsumexp = xp.log(sums[0])
    loss = (logsumexp - sums[1]).mean()
    return loss, VocabCrossEntropyCache(e / sums[0][:, None], local, mine)


def vocab_cross_entropy_backward(dloss, cache: VocabCrossEntropyCache, shape):
    """dlogits_r = dloss * (softmax_r - onehot_r(target)) / N: no communication."""
    probs, local, mine = cache
    xp, N = xp_of(probs), probs.shape[0]
    scale = xp.asarray(dloss / N, dtype=probs.dtype)
    dz = probs * scale                                                  # (N, V/N)
    dz[xp.arange(N), local] -= scale * mine.astype(probs.dtype)
    return dz.reshape(shape)


# --- one rank's model -------------------------------------------------------------------------
class ParallelGPT(GPT):
    """This rank's part of a GPT split over ``tp`` (tensor-parallel) ranks, one replica
    of ``dp`` data-parallel ones. ``config`` stays the full model's (so checkpoints,
    resumes and ``trainable()`` match the single process); the blocks run with
    ``linear="tensor_parallel"``. ``params`` are this rank's slices."""

    def __init__(self, model: GPT, tp: Communicator | None = None, dp: Communicator | None = None):
        if not isinstance(model, GPT) or isinstance(model, ParallelGPT):
            raise ValueError(f"model must be a GPT (the full model), got {type(model).__name__}")
        if model.config.dtype not in ("float32", "float64"):
            raise ValueError(f"tensor/data parallelism runs in float32 or float64; the model is "
                             f"{model.config.dtype}")
        self.tp, self.dp = tp or LocalComm(), dp or LocalComm()
        self.config = model.config
        self.run_config = dataclasses.replace(model.config, linear="tensor_parallel")
        self.params = shard_params(model.params, model.config, self.tp.rank, self.tp.size)
        self.vocab_start = self.tp.rank * (model.config.vocab_size // self.tp.size)

    # --- forward / backward: embedding, the baseline's blocks, head, all split -----------
    def forward_train(self, idx):
        """-> (this rank's logits (B, T, V/N), cache)."""
        p, cfg = self.params, self.run_config
        idx = self.check_idx(idx)
        x, emb = vocab_embedding_forward(idx, p["wte.weight"], p["wpe.weight"],
                                         self.vocab_start, self.tp)      # (B, T, C)
        blocks = []
        with tensor_parallel(self.tp):
            for i in range(cfg.n_layer):
                x, cache = transformer.block_forward(x, p, i, cfg)      # (B, T, C)
                blocks.append(cache)
        logits, head = transformer.head_forward(x, p, cfg)              # (B, T, V/N) f: x is whole
        return logits, transformer.ForwardCache(emb, blocks, head)

    def backward(self, dlogits, cache) -> dict:
        """This rank's d loss / d logits (B, T, V/N) -> grads of this rank's parameters."""
        p, cfg, grads = self.params, self.run_config, {}
        dx, dwte_t, _ = layers.linear_backward(dlogits, cache.head.head)  # dx: this rank's vocab part
        dx = self.tp.allreduce(dx)                                        # f's backward
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layernorm_backward(dx, cache.head.ln_f)
        with tensor_parallel(self.tp):
            for i in reversed(range(cfg.n_layer)):
                dx = transformer.block_backward(dx, cache.blocks[i], i, cfg, grads)
        dwte, grads["wpe.weight"] = vocab_embedding_backward(dx, cache.emb, p["wte.weight"],
                                                             p["wpe.weight"])
        grads["wte.weight"] = dwte + dwte_t.T                             # tied: both uses add up
        return {k: grads[k] for k in p if k in grads}

    def loss_and_grads(self, idx, targets):
        idx, targets = self._check_pair(idx, targets)
        logits, cache = self.forward_train(idx)                           # (B, T, V/N)
        loss, ce = vocab_cross_entropy_forward(logits, targets, self.vocab_start, self.tp)
        dlogits = vocab_cross_entropy_backward(1.0, ce, logits.shape)
        return float(loss), self.backward(dlogits.astype(logits.dtype, copy=False), cache)

    def loss(self, idx, targets) -> float:
        idx, targets = self._check_pair(idx, targets)
        logits, _ = self.forward_train(idx)
        return float(vocab_cross_entropy_forward(logits, targets, self.vocab_start, self.tp)[0])

    def forward(self, idx):
        """The whole logits (B, T, V) on every rank (an all-gather of the vocab slices)."""
        logits, _ = self.forward_train(idx)
        return xp_of(logits).concatenate(self.tp.allgather(logits), axis=-1)

    __call__ = forward

    def grad_norm(self, grads: dict) -> float:
        """Global L2 norm of the full model's gradients: the split parts' squares summed
        over the ranks, the replicated ones counted once."""
        def squares(split: bool) -> float:
            return sum(float(xp_of(g).sum(g.astype(np.float64) ** 2)) for k, g in grads.items()
                       if (split_rule(k) is not None) == split)
        split = float(self.tp.allreduce(np.array([squares(True)]))[0])
        return math.sqrt(split + squares(False))

    # --- generation: the baseline's loop, KV cache split by heads -------------------------
    def decode_model(self) -> GPT:
        """A GPT for the generation loop: this rank's blocks (H/N heads, so the KV cache
        ``KVCache.for_model`` makes holds H/N heads) and the whole ``wte`` (gathered once,
        so every rank computes the whole logits and samples the same token). That needs
        the all-reduces to return bit-identical sums on every rank: true for the simulated
        ranks and MPICH with 2 ranks (tested); MPI does not promise it for every N."""
        p = dict(self.params)
        p["wte.weight"] = unshard(self.tp.allgather(p["wte.weight"]), "rows")   # (V, C)
        return GPT(self.run_config, params=p)

    def generate(self, idx, max_new_tokens: int = 50, temperature: float = 1.0, top_k=None,
                 top_p=None, seed=0, use_cache: bool = True, eos_id=None):
        from . import generation
        model = self.decode_model()
        with tensor_parallel(self.tp):
            return generation.generate(model, idx, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, use_cache=use_cache, eos_id=eos_id)

    # --- checkpoints: one ordinary, unsharded directory ----------------------------------
    def gather(self) -> GPT:
        """The full model (a collective of the tensor-parallel group)."""
        full = {k: unshard(self.tp.allgather(v), split_rule(k)) if split_rule(k) else v.copy()
                for k, v in self.params.items()}
        return GPT(self.config, params=full)

    def gather_state(self, state: dict) -> dict:
        """Full AdamW state (``m.<name>``, ``v.<name>``, ``step``) from this rank's slices."""
        def rule(key):
            return split_rule(key.split(".", 1)[1]) if key[:2] in ("m.", "v.") else None
        return {k: unshard(self.tp.allgather(v), rule(k)) if rule(k) else v for k, v in state.items()}

    def shard_state(self, params: dict, state: dict | None):
        """This rank's slices of full parameters and AdamW state (resuming a checkpoint)."""
        params = shard_params(params, self.config, self.tp.rank, self.tp.size)
        if state is not None:
            state = {k: shard(v, split_rule(k.split(".", 1)[1]) if k[:2] in ("m.", "v.") else None,
                              self.tp.rank, self.tp.size) for k, v in state.items()}
        return params, state

    def save(self, path, extra=None, meta=None, files=None) -> None:
        """Gather the full model (and its optimizer state); rank 0 writes it atomically
        (``checkpoint.save``) while the others wait. A collective: every rank calls it."""
        from . import checkpoint
        if self.dp.rank == 0:                        # data-parallel replicas are equal
            full = self.gather()
            extra = {g: self.gather_state(t) if g == "optimizer" else t
                     for g, t in (extra or {}).items()}
            if self.tp.rank == 0:
                checkpoint.save(path, full, extra=extra, meta=meta, files=files)
        self.tp.barrier()
        self.dp.barrier()

    def __repr__(self) -> str:
        return (f"ParallelGPT(rank {self.tp.rank}/{self.tp.size} tensor, {self.dp.rank}/"
                f"{self.dp.size} data; {self.num_params():,} of the params here)")


# --- the training step: data-parallel split, gradient all-reduce, global clip ---------------
class ParallelStep(ClipGradNorm):
    """The step hook of a parallel run (it *is* the run's gradient clip, named "clip"
    as in a single process, so checkpoints resume with any N).

    data parallel: each replica takes rows r B/M .. (r+1) B/M - 1 of the step's batch
    (every rank draws the same batch), the losses are averaged, and the gradients
    all-reduced (one buffer per step) and divided by M: the mean over the whole batch.
    tensor parallel: the clip's norm is ``ParallelGPT.grad_norm``, the global one.
    """

    def __init__(self, max_norm, model: ParallelGPT):
        if not isinstance(model, ParallelGPT):
            raise ValueError(f"model must be a ParallelGPT, got {type(model).__name__}")
        super().__init__(max_norm, norm=model.grad_norm)
        self.dp = model.dp

    def loss_and_grads(self, model, x, y, step):
        M, r = self.dp.size, self.dp.rank
        if M == 1:
            return None
        B = x.shape[0]
        if B % M:
            raise ValueError(f"batch of {B} rows (batch_size / micro_batch_size) is not "
                             f"divisible by --data-parallel={M}")
        rows = slice(r * B // M, (r + 1) * B // M)
        loss, grads = model.loss_and_grads(x[rows], y[rows])
        return float(self.dp.allreduce(np.array([loss]))[0]) / M, grads

    def transform_grads(self, grads, step, record):
        if self.dp.size > 1:
            xp = xp_of(next(iter(grads.values())))
            flat = self.dp.allreduce(xp.concatenate([g.reshape(-1) for g in grads.values()]))
            flat = flat * flat.dtype.type(1 / self.dp.size)
            out, i = {}, 0
            for k, g in grads.items():
                out[k] = flat[i:i + g.size].reshape(g.shape)
                i += g.size
            grads = out
        return super().transform_grads(grads, step, record)


def grid(tensor_parallel: int = 1, data_parallel: int = 1, comm: Communicator | None = None):
    """-> (tp, dp) communicators of this rank in a grid of ``tensor_parallel *
    data_parallel`` ranks (``comm``: the job's, default ``world()``)."""
    tp_n = _check_size("tensor_parallel", tensor_parallel)
    dp_n = _check_size("data_parallel", data_parallel)
    comm = world() if comm is None else comm
    if tp_n * dp_n != comm.size:
        raise ValueError(f"--tensor-parallel={tp_n} x --data-parallel={dp_n} needs {tp_n * dp_n} "
                         f"ranks; this job has {comm.size} (start it with mpiexec -n {tp_n * dp_n})")
    if comm.size == 1:
        return LocalComm(), LocalComm()
    if comm.size in (tp_n, dp_n):                                  # one kind only: no split needed
        return (comm, LocalComm()) if tp_n > 1 else (LocalComm(), comm)
    tp_rank, dp_rank = comm.rank % tp_n, comm.rank // tp_n         # tensor groups contiguous
    return comm.split(dp_rank, tp_rank), comm.split(tp_rank, dp_rank)


@contextlib.contextmanager
def abort_on_error(comm: Communicator, command: str = "minillm"):
    """A rank that fails prints its error with its rank and ends the whole job (MPI
    Abort), so the other ranks do not wait forever in a collective."""
    try:
        yield
    except Exception as exc:
        if comm.size == 1:
            raise
        print(f"{command}: error on rank {comm.rank} of {comm.size}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        comm.abort(2)


# --- the command line: mpiexec -n N minillm train --tensor-parallel N ... ------------------
def cli_grid(tensor_parallel: int | None, data_parallel: int | None = None):
    """(tp, dp) communicators of this rank for the CLI flags (checked against the
    job's size before any work). Ranks other than 0 print nothing (stdout goes to
    /dev/null; their errors still reach stderr), so the job prints one log."""
    tp, dp = grid(tensor_parallel or 1, data_parallel or 1)
    if tp.rank or dp.rank:
        sys.stdout = open(os.devnull, "w")
    return tp, dp


def parallel_training(model: GPT, tcfg, tp: Communicator, dp: Communicator):
    """-> (this rank's ``ParallelGPT``, the hooks to pass to ``train``)."""
    if tcfg.precision != "fp32":
        raise ValueError(f"--precision={tcfg.precision!r} is not supported with --tensor-parallel "
                         f"/ --data-parallel (the collectives run in the model's fp32)")
    model = ParallelGPT(model, tp, dp)
    return model, [ParallelStep(tcfg.grad_clip, model)]


# --- what a rank holds and sends: the formulas the bench and the chapter check -------------
def memory_formula(config, tensor_parallel: int, batch_size: int = 1, max_len: int | None = None) -> dict:
    """Bytes per rank predicted from the shapes: weights = split / N + replicated; the
    gradients the same; AdamW's m and v twice that; the KV cache 2 L B (H/N) S D itemsize."""
    from .model import param_shapes
    N, item = _check_size("tensor_parallel", tensor_parallel), config.np_dtype.itemsize
    S = config.block_size if max_len is None else max_len
    sizes = {k: int(np.prod(s)) * item for k, s in param_shapes(config).items()}
    split = sum(b for k, b in sizes.items() if split_rule(k))
    weights = split // N + sum(b for k, b in sizes.items() if not split_rule(k))
    kv = 2 * config.n_layer * batch_size * (config.n_head // N) * S * config.head_size * item
    return {"weights": weights, "grads": weights, "optimizer": 2 * weights, "kv_cache": kv}


def comm_formula(config, B: int, T: int, tensor_parallel: int = 1, data_parallel: int = 1) -> dict:
    """Collective calls and bytes per training step (each rank's payload).

    tensor parallel (Megatron sec. 3): per block 2 all-reduces of B T C forward (g after
    each c_proj) and 2 backward (f before c_attn and c_fc): 4 L; plus the vocab-parallel
    embedding (1 forward), the head's input gradient (1 backward) and the cross-entropy's
    max and (sum, target logit): 3 B T numbers in 2 calls; and the global gradient norm
    (one float64). Data parallel: one all-reduce of every gradient and one of the loss
    (per micro-batch).
    """
    item, C, L = config.np_dtype.itemsize, config.n_embd, config.n_layer
    calls = bytes_ = 0
    if tensor_parallel > 1:
        calls += 4 * L + 2 + 2 + 1
        bytes_ += (4 * L + 2) * B * T * C * item + 3 * B * T * item + 8
    if data_parallel > 1:
        P = config.num_params()
        calls += 2
        bytes_ += P // max(tensor_parallel, 1) * item + 8
    return {"allreduce_calls": calls, "allreduce_bytes": bytes_,
            "megatron_per_layer_bytes": 4 * B * T * C * item}


def memory_per_rank(model: ParallelGPT, grads: dict, opt, batch_size: int = 1,
                    max_len: int | None = None) -> dict:
    """Bytes this rank holds, counted from the arrays: weights, ``grads``, the optimizer's
    m and v, and the KV cache generation would make (its H/N heads)."""
    from .kv_cache import KVCache
    cache = KVCache(model.run_config, batch_size, max_len,
                    n_heads=[model.block_dims(i).n_head for i in range(model.config.n_layer)])
    return {"weights": model.nbytes(), "grads": int(sum(g.nbytes for g in grads.values())),
            "optimizer": int(sum(a.nbytes for d in (opt.m, opt.v) for a in d.values())),
            "kv_cache": cache.nbytes}


# --- the tour row: a live 2-rank run of the tour's model ----------------------------------------
TOUR_RANKS = 2


def tour_measure(comm: Communicator, model_dir, val_ids, train_ids, settings: dict) -> dict:
    """What every rank of the tour's run does: validation perplexity of the split model
    on the tour's fixed batches, and training tokens/s of a few TP steps (first dropped)."""
    from .tour import val_perplexity
    full = GPT.load(model_dir)
    model = ParallelGPT(full, comm)
    comm.reset_counts()
    ppl = val_perplexity(model, val_ids, settings["batch"], settings["seq_len"], settings["batches"],
                         settings["seed"])
    from .train import TrainConfig, train as run_train
    tcfg = TrainConfig(steps=3, batch_size=settings["batch"], seq_len=settings["seq_len"], lr=1e-4,
                       warmup_steps=0, eval_interval=0, seed=settings["seed"])
    res = run_train(model, train_ids, None, tcfg, progress=False, hooks=[ParallelStep(tcfg.grad_clip, model)])
    return {"val_ppl": ppl, "train_tok_s": float(np.median([h["tokens_per_s"] for h in res.history[1:]])),
            "rank_bytes": model.nbytes(), "ranks": comm.size, "launcher": type(comm).__name__}


def tour_worker(model_dir: str) -> None:
    """Entry point of the tour's ``mpiexec`` ranks: read the inputs the row wrote to
    ``model_dir``, measure, and let rank 0 write ``tour.json`` there."""
    from pathlib import Path
    from .files import atomic_write_text
    import json
    d = Path(model_dir)
    comm = world()
    with abort_on_error(comm, "minillm tour (tensor_parallel)"):
        settings = json.loads((d / "settings.json").read_text())
        ids = {k: np.load(d / f"{k}.npy", allow_pickle=False) for k in ("val_ids", "train_ids")}
        out = tour_measure(comm, d, ids["val_ids"], ids["train_ids"], settings)
        if comm.rank == 0:
            atomic_write_text(d / "tour.json", json.dumps(out))


@technique("tensor_parallel", order=8)
def tensor_parallel_row(ctx: TourContext) -> Row:
    """The tour's model split over 2 ranks (``mpiexec -n 2``, or 2 threads when MPI is not
    installed): the same perplexity from half the weights per rank, and its training speed
    with 4 all-reduces of B*T*C per block per step."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path
    from .files import atomic_write_text
    model, N = ctx.model, TOUR_RANKS
    settings = {"batch": ctx.eval_batch_size, "seq_len": ctx.eval_seq_len, "batches": ctx.eval_batches,
                "seed": ctx.seed}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model.save(d)
        atomic_write_text(d / "settings.json", json.dumps(settings))
        for k in ("val_ids", "train_ids"):
            np.save(d / f"{k}.npy", getattr(ctx, k))
        launcher = Path(sys.executable).parent / "mpiexec"
        if launcher.exists() and _has_mpi4py():
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
            code = f"from minillm.parallel import tour_worker; tour_worker({str(d)!r})"
            run = subprocess.run([str(launcher), "-n", str(N), sys.executable, "-c", code], env=env,
                                 timeout=max(60.0, 2 * ctx.budget_s), capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"the tour's mpiexec -n {N} run failed (exit {run.returncode}):\n"
                                   + (run.stderr or run.stdout)[-2000:])
            out = json.loads((d / "tour.json").read_text())
        else:
            out = run_simulated(N, lambda c: tour_measure(c, d, ctx.val_ids, ctx.train_ids, settings))[0]
    base_ppl = ctx.baseline.val_ppl if ctx.baseline else ctx.val_ppl()
    counts = comm_formula(model.config, settings["batch"], settings["seq_len"], N)
    return Row("tensor_parallel", model.num_params(), out["rank_bytes"], out["val_ppl"], out["train_tok_s"],
               None, f"TP={N} over {'MPI ranks (mpiexec)' if out['launcher'] == 'MPIComm' else 'threads'}: "
                     f"weight bytes are one rank's ({out['rank_bytes'] / model.nbytes():.2f} of the model); "
                     f"perplexity {out['val_ppl']:.3f} vs {base_ppl:.3f} single; "
                     f"{counts['allreduce_calls']} all-reduces, {counts['allreduce_bytes'] / 1e6:.1f} MB "
                     f"per step; train tok/s on {N} ranks sharing this machine's cores",
               {"ranks": N, "launcher": out["launcher"], "rank_bytes": out["rank_bytes"],
                "allreduce_calls": counts["allreduce_calls"], "allreduce_bytes": counts["allreduce_bytes"]})


def _has_mpi4py() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None
