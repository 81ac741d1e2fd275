"""Pruning: zero the least important weights, or remove whole heads and MLP neurons.

What it changes against the baseline: the four linear weights of every block
(c_attn, attn.c_proj, c_fc, mlp.c_proj; embeddings untouched) lose entries.

* Unstructured (``magnitude``, ``wanda``) and semi-structured (``2:4``): some
  entries become exact zeros. The model's linear *kind* becomes ``"sparse"``
  (``SparseLinear`` below): the dense ``weight`` and ``bias`` as before plus a
  frozen ``mask`` (uint8, 1 = kept). Its backward projects the weight gradient
  onto the mask and its training hook (``KeepMasks``) re-applies the mask after
  every optimizer step, so plain ``train.train(pm, ...)`` fine-tunes a pruned
  model and its zeros stay exact zeros.
* Structured (``heads``, ``neurons``): parameters are physically sliced away.
  A block reads its head count and MLP width from its shapes
  (``seams.block_dims``), so the smaller model forwards, trains, decodes (the
  KV cache sizes each layer) and saves with no config change.

Criteria (weights in GPT-2's (in, out) layout: output j is column j):

    magnitude  score |W_ij|, the s fraction lowest of each matrix pruned
               (Han et al. 2015, "Learning both Weights and Connections")
    wanda      score |W_ij| * ||X_i||_2, X_i the i-th input feature over every
               calibration token; the s fraction lowest of each column pruned
               (Sun et al. 2023, "A Simple and Effective Pruning Approach for
               LLMs", eq. 1; comparison group: one output, sec. 3)
    2:4        in each column, every group of 4 consecutive inputs keeps its 2
               highest scores (Wanda's, or |W| without calibration; Mishra et
               al. 2021, "Accelerating Sparse Deep Neural Networks")
    heads      per layer, the s fraction of heads whose output, projected by
               attn.c_proj, has the smallest L2 norm over the calibration
               tokens: exactly what removing the head takes out of the
               residual stream (cf. Michel et al. 2019, "Are Sixteen Heads
               Really Better than One?")
    neurons    per MLP, the s fraction of hidden neurons with the smallest
               ||a_j||_2 * ||W_proj[j, :]||_2 (a_j: the neuron's GELU output over
               the calibration tokens): the Frobenius norm of the neuron's
               contribution a_j W_proj[j, :], Wanda's score for a whole row

Counts: a group of n entries loses ``n_pruned(s, n) = floor(s n + 1/2)``; ties
are broken by index (the lower index goes first).

Cost: with dense storage, zeros cost as much as any weight (dense BLAS does
2 flops with each), and the mask adds one byte per weight:
``bytes = (itemsize + 1) * in * out`` per layer, 1.25x the float32 baseline's.
Compressed sparse rows (``to_csr``, ``csr_matmul``) need
``(itemsize + 4) * nnz + 4 * (in + 1)`` bytes and ``2 nnz`` flops per token,
smaller than dense below 50% density (float32) and faster only where the
irregular access pays for the skipped work (``bench/bench_pruning.py``
measures where). Structured removal shrinks the dense matmuls themselves: a
block with H_i heads and F_i neurons holds ``4 C H_i D + 2 C F_i`` weights.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import numpy as np

from . import layers, seams
from .backend import kernel, to_numpy, xp_of
from .checks import check_choice, check_float
from .train import TrainHook
from .tour import Row, TourContext, technique

METHODS = ("magnitude", "wanda", "2:4", "heads", "neurons")
DEFAULT_SPARSITY = {"magnitude": 0.5, "wanda": 0.5, "heads": 0.25, "neurons": 0.25}
NEEDS_CALIBRATION = ("wanda", "heads", "neurons")
PRUNABLE_KINDS = ("dense", "sparse")     # kinds that store a float ``weight`` (in, out)
CALIBRATION_ROWS = 8                     # calibration rows per forward pass (bounds memory)


def n_pruned(sparsity: float, n: int) -> int:
    """Entries a group of ``n`` loses at ``sparsity``: floor(s n + 1/2)."""
    return int(math.floor(sparsity * n + 0.5))


# --- the sparse linear kind: dense weight + frozen mask ----------------------------------------
class SparseCache(NamedTuple):
    x: np.ndarray          # (..., n_in) the input (kept for dW; calibration reads it too)
    w: np.ndarray          # (n_in, n_out) the weight, zeros included (a reference, no copy)
    has_bias: bool
    mask: np.ndarray       # (n_in, n_out) uint8, 1 = kept: projects dW


class SparseLinear(seams.LinearKind):
    """``y = x W + b`` with W's pruned entries held at exact zeros.

    Stores ``weight`` (in, out) with its zeros, ``bias`` (out,) and a frozen
    ``mask`` (in, out) uint8. Invariant: ``weight == weight * mask`` (made by
    ``prune``, kept by ``backward`` and ``KeepMasks``), so the forward pass is the
    dense one. The gradient returned for ``weight`` is ``dW * mask``: the
    gradient of the loss over the kept entries only (pruned ones get none).
    """

    name = "sparse"
    suffixes = ("weight", "bias", "mask")
    trainable = ("weight", "bias")

    def specs(self, n_in, n_out, dtype):
        return {"weight": ((n_in, n_out), np.dtype(dtype)), "bias": ((n_out,), np.dtype(dtype)),
                "mask": ((n_in, n_out), np.dtype(np.uint8))}

    def dims(self, lp):
        return tuple(lp["weight"].shape)

    def from_dense(self, w, b):
        return {"weight": w, "bias": b, "mask": xp_of(w).ones(w.shape, dtype=np.uint8)}   # all kept

    def forward(self, lp, x, name):
        y, c = layers.linear_forward(x, lp["weight"], lp["bias"])                 # (..., n_out)
        return y, SparseCache(c.x, c.w, c.has_bias, lp["mask"])

    def backward(self, dy, cache):
        dx, dw, db = layers.linear_backward(dy, layers.LinearCache(cache.x, cache.w, cache.has_bias))
        return dx, {"weight": dw * cache.mask.astype(dw.dtype), "bias": db}

    def train_hooks(self, model):
        return [KeepMasks()]


class KeepMasks(TrainHook):
    """After each update: ``weight *= mask`` in every sparse layer. The masked gradient
    already keeps AdamW from moving a zero (its moments stay 0, decay of 0 is 0);
    this makes the invariant independent of the optimizer and of other hooks."""

    name = "pruning_masks"

    def after_update(self, model, step, record):
        for name in linear_names(model.config):
            model.params[name + ".weight"] *= model.params[name + ".mask"]


seams.register_linear(SparseLinear())


def linear_names(config) -> list[str]:
    """"h.{i}.{role}" of every block's four linear layers."""
    return [f"h.{i}.{role}" for i in range(config.n_layer) for role in seams.LINEAR_ROLES]


# --- masks from scores: pure functions of one matrix -------------------------------------------
def _rank(score, axis):
    """Position of each entry in the stable ascending order along ``axis`` (ties: lower index first)."""
    xp = xp_of(score)
    return xp.argsort(xp.argsort(score, axis=axis, kind="stable"), axis=axis, kind="stable")


def matrix_mask(score, sparsity: float):
    """Keep-mask (bool, score's shape): the ``sparsity`` fraction of lowest scores of the whole matrix go."""
    rank = _rank(score.reshape(-1), 0)                                            # (in * out,)
    return (rank >= n_pruned(sparsity, score.size)).reshape(score.shape)


def column_mask(score, sparsity: float):
    """Keep-mask: in each column (output), the ``sparsity`` fraction of lowest scores go."""
    return _rank(score, 0) >= n_pruned(sparsity, score.shape[0])                  # (in, out)


def n_m_mask(score, n: int = 2, m: int = 4):
    """Keep-mask: in each column, every group of ``m`` consecutive rows keeps its ``n`` highest."""
    n_in, n_out = score.shape
    rank = _rank(score.reshape(n_in // m, m, n_out), 1)                          # (in/m, m, out)
    return (rank >= m - n).reshape(n_in, n_out)


def wanda_score(w, x_norm):
    """|W_ij| * ||X_i||_2: w (in, out), x_norm (in,) -> (in, out) (Sun et al. 2023, eq. 1)."""
    return abs(w) * x_norm[:, None]


# --- calibration: what reaches each layer ------------------------------------------------------
def calibrate(model, calibration) -> dict:
    """Run ``calibration`` (B, T) ids through ``model`` (``forward_train``'s caches) -> norms:

    ``"h.{i}.{role}"``: (n_in,) L2 norm of each input feature of that linear layer
    over every calibration token; ``"h.{i}.attn.heads"``: (H_i,) L2 norm of each
    head's output after attn.c_proj (its share of the residual stream).
    """
    idx = model.check_idx(calibration, "calibration")
    xp = model.xp
    sums: dict = {}
    for r0 in range(0, idx.shape[0], CALIBRATION_ROWS):
        _, cache = model.forward_train(idx[r0:r0 + CALIBRATION_ROWS])
        for i, bc in enumerate(cache.blocks):
            h = f"h.{i}."
            for role, lc in zip(seams.LINEAR_ROLES, (bc.c_attn, bc.attn_proj, bc.c_fc, bc.mlp_proj)):
                x = layers.f32(lc.x).reshape(-1, lc.x.shape[-1])                  # (N, n_in)
                _add(sums, h + role, (x * x).sum(axis=0))
            _add(sums, h + "attn.heads", _head_output_sq(model, i, bc.attn_proj.x))
    return {k: xp.sqrt(v) for k, v in sums.items()}


def _add(sums, key, value):
    sums[key] = value if key not in sums else sums[key] + value


def _head_output_sq(model, i: int, y):
    """Sum over tokens and channels of (y_h W_o,h)^2 per head: y (B, T, H D) -> (H,)."""
    H, D = model.block_dims(i).n_head, model.config.head_size
    xp = xp_of(y)
    w_o = layers.f32(model.params[f"h.{i}.attn.c_proj.weight"]).reshape(H, D, -1)   # (H, D, C)
    y = layers.f32(y).reshape(-1, H, D)                                             # (N, H, D)
    out = xp.einsum("nhd,hdc->nhc", y, w_o)                                         # (N, H, C)
    return (out * out).sum(axis=(0, 2))                                             # (H,)


# --- prune ---------------------------------------------------------------------------------
def prune(model, method: str, sparsity: float | None = None, calibration=None):
    """A pruned copy of ``model`` (a new GPT; ``model`` is untouched).

    method       "magnitude" | "wanda" | "2:4" (zeros, linear kind "sparse") or
                 "heads" | "neurons" (removed; the config is unchanged)
    sparsity     fraction in [0, 1) pruned per group (see the module docstring);
                 None: 0.5 for magnitude/wanda, 0.25 for heads/neurons; 2:4 takes none
    calibration  (B, T) token ids run through ``model`` for the activation norms;
                 needed by wanda, heads, neurons; 2:4 uses Wanda's score with it, |W| without
    """
    from .model import GPT
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a minillm GPT, got {type(model).__name__}")
    check_choice("method", method, METHODS)
    sparsity = _check_sparsity(method, sparsity)
    if model.config.linear not in PRUNABLE_KINDS:
        raise ValueError(f"model has linear kind {model.config.linear!r}; prune works on "
                         f"{list(PRUNABLE_KINDS)} (prune before quantizing)")
    if calibration is None and method in NEEDS_CALIBRATION:
        raise ValueError(f"method={method!r} needs calibration= token ids (B, T): its score "
                         f"uses the activations that reach each layer")
    norms = None if calibration is None else calibrate(model, calibration)
    params = {k: v.copy() for k, v in model.params.items()}                      # never the input's
    if method == "heads":
        return GPT(model.config, params=_remove_heads(model, params, sparsity, norms))
    if method == "neurons":
        return GPT(model.config, params=_remove_neurons(model, params, sparsity, norms))
    config = dataclasses.replace(model.config, linear="sparse")
    return GPT(config, params=_zero_entries(model.config, params, method, sparsity, norms))


def _check_sparsity(method: str, sparsity):
    if method == "2:4":
        if sparsity is not None:
            raise ValueError(f"sparsity={sparsity!r} cannot be given with method='2:4' "
                             f"(its sparsity is 2 of every 4, i.e. 0.5)")
        return 0.5
    if sparsity is None:
        return DEFAULT_SPARSITY[method]
    return check_float("sparsity", sparsity, 0.0, 1.0, hi_open=True)


def _zero_entries(config, p: dict, method: str, sparsity: float, norms) -> dict:
    """Unstructured / 2:4: each linear weight's keep-mask by ``method``; -> the sparse layout."""
    keep = {}
    for name in linear_names(config):
        w = p[name + ".weight"]                                                  # (in, out)
        score = abs(w) if norms is None or method == "magnitude" else wanda_score(w, norms[name])
        if method == "magnitude":
            keep[name] = matrix_mask(score, sparsity)
        elif method == "wanda":
            keep[name] = column_mask(score, sparsity)
        elif w.shape[0] % 4:
            raise ValueError(f"method='2:4' needs a multiple of 4 inputs; layer {name} has {w.shape[0]}")
        else:
            keep[name] = n_m_mask(score, 2, 4)
    return masked_params(config, p, keep)


def masked_params(config, p: dict, keep: dict) -> dict:
    """``p`` (dense or sparse layout) with each linear weight multiplied by ``keep[name]``
    (bool (in, out); a layer not in ``keep`` keeps all) -> the sparse kind's layout. An
    entry the old mask pruned stays pruned. Changes ``p`` in place; returns it."""
    for name in linear_names(config):
        w, old = p[name + ".weight"], p.pop(name + ".mask", None)
        k = keep.get(name, xp_of(w).ones(w.shape, dtype=bool))
        if old is not None:
            k = k & (old != 0)
        p[name + ".weight"] = w * k                                              # (in, out)
        p[name + ".mask"] = k.astype(np.uint8)
    return p


def with_masks(model, keep: dict):
    """A sparse-kind copy of ``model`` whose linear weights keep only ``keep[name]`` (bool
    (in, out) per "h.{i}.{role}"): for criteria of your own (``prune`` uses the same path)."""
    if model.config.linear not in PRUNABLE_KINDS:
        raise ValueError(f"model has linear kind {model.config.linear!r}; masks apply to "
                         f"{list(PRUNABLE_KINDS)}")
    unknown = sorted(set(keep) - set(linear_names(model.config)))
    if unknown:
        raise ValueError(f"keep names {unknown[:3]}, not linear layers of the model (e.g. 'h.0.mlp.c_fc')")
    params = {k: v.copy() for k, v in model.params.items()}
    for name, k in keep.items():
        if tuple(k.shape) != tuple(params[name + ".weight"].shape):
            raise ValueError(f"keep[{name!r}] has shape {tuple(k.shape)}; the weight is "
                             f"{tuple(params[name + '.weight'].shape)}")
    config = dataclasses.replace(model.config, linear="sparse")
    return type(model)(config, params=masked_params(config, params, keep))


def _lowest(scores, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest of a small score vector (stable), on the host, sorted."""
    return np.sort(np.argsort(to_numpy(scores), kind="stable")[:k])


def _remove_heads(model, p: dict, sparsity: float, norms) -> dict:
    """Slice the q/k/v columns of c_attn and the rows of attn.c_proj of the pruned heads."""
    D, xp = model.config.head_size, model.xp
    for i in range(model.config.n_layer):
        H = model.block_dims(i).n_head
        drop = _lowest(norms[f"h.{i}.attn.heads"], n_pruned(sparsity, H))
        if len(drop) == H:
            raise ValueError(f"sparsity={sparsity} would remove all {H} heads of layer {i} "
                             f"(h.{i}.attn); at least one head must stay")
        keep = np.setdiff1d(np.arange(H), drop)
        HD = H * D
        cols = np.concatenate([j * HD + np.arange(hd * D, (hd + 1) * D) for j in range(3) for hd in keep])
        rows = np.concatenate([np.arange(hd * D, (hd + 1) * D) for hd in keep])
        _slice(p, f"h.{i}.attn.c_attn", xp.asarray(cols), columns=True)        # (C, 3 H' D)
        _slice(p, f"h.{i}.attn.c_proj", xp.asarray(rows), columns=False)       # (H' D, C)
    return p


def _remove_neurons(model, p: dict, sparsity: float, norms) -> dict:
    """Slice the columns of c_fc and the rows of mlp.c_proj of the pruned neurons."""
    xp = model.xp
    for i in range(model.config.n_layer):
        h = f"h.{i}.mlp."
        F = model.block_dims(i).d_mlp
        w_proj = layers.f32(model.params[h + "c_proj.weight"])                  # (F, C)
        score = norms[h + "c_proj"] * xp.sqrt((w_proj * w_proj).sum(axis=1))   # (F,)
        drop = _lowest(score, n_pruned(sparsity, F))
        if len(drop) == F:
            raise ValueError(f"sparsity={sparsity} would remove all {F} neurons of layer {i} "
                             f"(h.{i}.mlp); at least one must stay")
        keep = xp.asarray(np.setdiff1d(np.arange(F), drop))
        _slice(p, h + "c_fc", keep, columns=True)                               # (C, F')
        _slice(p, h + "c_proj", keep, columns=False)                            # (F', C)
    return p


def _slice(p: dict, name: str, index, columns: bool) -> None:
    """Keep outputs ``index`` of layer ``name`` (columns of its 2-D arrays, entries of its
    bias) or its inputs ``index`` (rows of its 2-D arrays; the bias stays)."""
    for key in [k for k in p if k.startswith(name + ".")]:
        a = p[key]
        if a.ndim == 2:
            p[key] = a[:, index] if columns else a[index]
        elif columns:
            p[key] = a[index]


# --- reading a pruned model ------------------------------------------------------------------
def sparsity(model) -> dict[str, float]:
    """``{"h.{i}.{role}.weight": fraction of exact zeros}`` of every block's linear weights."""
    if model.config.linear not in PRUNABLE_KINDS:
        raise ValueError(f"model has linear kind {model.config.linear!r}; sparsity reads the "
                         f"float weights of {list(PRUNABLE_KINDS)}")
    return {name + ".weight": float((model.params[name + ".weight"] == 0).mean())
            for name in linear_names(model.config)}


def nonzero_params(model) -> int:
    """Trainable entries that are not exactly zero (what a sparse format would store)."""
    return int(sum(int((v != 0).sum()) for v in model.trainable().values()))


# --- compressed sparse rows: what makes zeros cheap ---------------------------------------
class CSR(NamedTuple):
    data: np.ndarray       # (nnz,) the nonzero values, row by row
    indices: np.ndarray    # (nnz,) int32 column (output) of each value
    indptr: np.ndarray     # (n_in + 1,) int32: row i holds data[indptr[i]:indptr[i + 1]]
    shape: tuple           # (n_in, n_out)


def to_csr(w) -> CSR:
    """W (in, out) on the host -> its CSR by input rows ((itemsize + 4) nnz + 4 (in + 1) bytes)."""
    w = np.asarray(to_numpy(w))
    rows, cols = np.nonzero(w)                                                   # row-major order
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))])
    return CSR(w[rows, cols], cols.astype(np.int32), indptr.astype(np.int32), w.shape)


@kernel("pruning.csr_matmul")
def csr_matmul(x, data, indices, indptr, n_out: int):
    """y = x W for x (N, n_in) and W (n_in, n_out) in CSR (``to_csr``) -> (N, n_out).

    Row i of W scatters into the outputs it reaches: y[:, j] += x[:, i] W[i, j]
    for its nonzeros only, 2 nnz flops per row of x.
    """
    xp = xp_of(x)
    y = xp.zeros((x.shape[0], n_out), dtype=x.dtype)                             # (N, n_out)
    for i in range(x.shape[1]):
        a, b = int(indptr[i]), int(indptr[i + 1])
        y[:, indices[a:b]] += x[:, i:i + 1] * data[a:b]                          # (N, nnz_i)
    return y


# --- the tour row ------------------------------------------------------------------
def calibration_ids(ids, n_seq: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n_seq`` windows of ``seq_len`` ids from a 1-D id array (fixed seed) -> (n_seq, seq_len)."""
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, n_seq)
    return np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int64)


def train_tok_s(model, ctx: TourContext, steps: int = 3) -> float:
    """Median tokens/s of ``steps`` training steps on a copy of ``model`` (first one dropped)."""
    from .train import TrainConfig, train
    tc = ctx.train_config
    tcfg = TrainConfig(steps=steps, batch_size=tc.batch_size, seq_len=tc.seq_len, lr=1e-4,
                       warmup_steps=0, eval_interval=0, seed=ctx.seed)
    copy = type(model)(model.config, params={k: v.copy() for k, v in model.params.items()})
    res = train(copy, ctx.train_ids, None, tcfg, progress=False)
    return float(np.median([h["tokens_per_s"] for h in res.history[1:]]))


@technique("pruning", order=4)
def pruning_rows(ctx: TourContext) -> list[Row]:
    """Magnitude vs Wanda at 50%, 2:4 (Wanda scores), and 25% heads + 25% neurons removed."""
    model, t0 = ctx.model, time.perf_counter()
    seq = min(128, model.config.block_size)
    cal = calibration_ids(ctx.train_ids, 2 if ctx.quick else 8, seq, ctx.seed)
    rows = []
    for method, s in (("magnitude", 0.5), ("wanda", 0.5), ("2:4", None)):
        pm = prune(model, method, sparsity=s, calibration=None if method == "magnitude" else cal)
        zeros = 1 - nonzero_params(pm) / nonzero_params(model)
        rows.append(Row(f"pruning {method}" + (f" {s:.0%}" if s else ""), nonzero_params(pm),
                        pm.nbytes(), ctx.val_ppl(pm), None, None,
                        f"{zeros:.1%} of trainable entries zero; params = nonzeros; bytes: dense "
                        f"weights + uint8 mask (dense BLAS: no speedup)",
                        {"method": method, "sparsity": s}))
    sm = prune(prune(model, "heads", 0.25, cal), "neurons", 0.25, cal)
    base_decode, decode = (ctx.decode_tok_s(m, use_cache=True, repeats=3) for m in (model, sm))
    notes = (f"25% of heads and of MLP neurons removed per layer (calibration {cal.shape[0]}x{seq} "
             f"tokens); cached greedy decode {decode:.0f} vs {base_decode:.0f} tok/s unpruned "
             f"({decode / base_decode:.2f}x)")
    train_s = None
    if time.perf_counter() - t0 < 0.5 * ctx.budget_s:      # train tok/s of both, measured alike
        base_train, train_s = (train_tok_s(m, ctx) for m in (model, sm))
        notes += f"; train {train_s:,.0f} vs {base_train:,.0f} tok/s ({train_s / base_train:.2f}x)"
    rows.append(Row("pruning heads+neurons 25%", sm.num_params(), sm.nbytes(), ctx.val_ppl(sm),
                    train_s, decode, notes, {"unpruned_cached_decode_tok_s": base_decode}))
    return rows
