"""Adaptive batch sizing and continuous batching: the largest batch that fits, and a
server that never waits for the slowest request.

What it changes against the baseline: the baseline trains with a fixed
``batch_size`` and generates one batch of prompts that starts and ends together.

1. **Training.** Instead of guessing a batch size and halving it after an
   out-of-memory error (accelerate's ``find_executable_batch_size``) or timing
   trial steps while doubling (Lightning's batch-size finder), we *predict* the
   peak memory of a training step from the shapes alone (``memory_model``) and
   take the largest batch under a budget (``find_batch_size``). The prediction
   counts exactly what the forward pass keeps for the backward pass
   (``transformer.block_forward``'s caches) plus the largest set of temporaries
   alive at once; the bench checks it against tracemalloc, which sees every
   NumPy allocation. If the step batch asked for does not fit, gradient
   accumulation (``TrainConfig.micro_batch_size``) keeps the tokens per optimizer
   step; if a step still runs out of memory, ``OOMBackoff`` halves the
   micro-batch and redoes that step (no step is lost). Variable-length inputs
   are batched by length (``bucket_batches``) so little of a batch is padding.

2. **Serving.** Static batching admits a batch, decodes until its *longest*
   request is done, then admits the next one: rows that finished early idle.
   Iteration-level scheduling (Orca, Yu et al., OSDI 2022; vLLM, Kwon et al.,
   SOSP 2023) decides at *every decode step*: finished requests leave their KV
   cache row and waiting requests are prefilled into free rows, so every row
   works. ``Server`` does this on the KV cache's row views: the prompts admitted
   in a step are prefilled together in one pass, packed end to end without
   padding (``prefill_packed``: Orca's selective batching, attention per
   prompt, everything else over all their tokens at once); the decode step runs
   only the busy rows, kept as a prefix of the cache (``decode_step`` on
   ``KVCache.rows(slice(0, n))``; a request whose row is needed moves, state
   and all); greedy rows are sampled with one argmax. Static batching runs the
   same code and keeps its whole batch in the step until the last request is
   done, as a padded batch does. Greedy outputs equal each prompt generated
   alone. ``make_http_server`` puts it behind the OpenAI completions API.

Memory of one training step (float32, dense attention; N = B T tokens; bytes =
4 x the counts below; W = parameter count):

    weights        W            the parameters
    grads          W            (2 W while accumulating micro-batches: the sum and the new)
    optimizer      2 W          AdamW's m and v
    stored         L (17 N C + 2 N + N H) + 2 N C + N   what the backward pass needs:
                   per block: ln_1 xhat + rstd, c_attn input, qkv (3 N C; q, k, v are views),
                   the attention output y and its log-sum-exp (N H: the tiled attention,
                   ``attention.flash_forward``, keeps no T x T matrix), c_proj input,
                   ln_2 xhat + rstd, c_fc input, GELU input and output (4 N C each);
                   ln_f xhat + rstd and its output (+ the int64 ids and positions)
    transient      max(4 N V,                           cross-entropy: logits, shifted logits,
                                                        exp, probs
                       3 N V + N C + max(24.5 N C,      backward: logits, probs, dlogits, dx and
                                         2 V C))        one block's backward (GELU's temporaries,
                                                        the largest) or the two (V, C) wte
                                                        gradients being summed

Decoding (``mode="decode"``): weights, the KV cache ``2 L B H S D`` (``KVCache``),
and the larger of one prefill pass (the server packs the admitted prompts into
passes of at most T tokens, attention one prompt at a time: ``3 H T^2 + 25 T C``
temporaries) and one decode step over B rows (``B (2 V + 25 C)``).
Axis legend as in ``model.py``.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import kv_cache, sampling, seams, transformer
from .backend import current, to_numpy
from .checks import check_choice, check_float, check_int, check_optional_int
from .layers import embedding_forward
from .tour import Row, TourContext, technique
from .train import TrainHook, accumulated_loss_and_grads

log = logging.getLogger("minillm.serve")

# --- 1. budgets --------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_bytes(value, name: str = "memory_budget") -> int:
    """"512MiB", "1GiB", "2GB", "1.5GiB", "1000000" or an int -> bytes (> 0).

    Anything else ("1 GB?", "-1GiB", "1 parsec") is a ValueError naming ``name``.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return check_int(name, value, 1)
    m = _BUDGET.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{name}={value!r} must be a positive size like '512MiB', '1GiB', "
                         f"'2GB' or a number of bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 1:
        raise ValueError(f"{name}={value!r} is zero bytes; give a positive size")
    return n


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as the budgets are usually given)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# --- 2. the memory model -------------------------------------------------------------------
def memory_model(config, batch_size: int, seq_len: int, mode: str = "train",
                 accumulating: bool = False) -> dict:
    """Predicted peak bytes of one training step (or of decoding) -> a dict.

    ``mode="train"``: ``{"weights", "grads", "optimizer", "activations", "total"}``
    for a forward/backward pass over ``batch_size`` rows of ``seq_len`` tokens
    (``accumulating``: the step sums micro-batch gradients, so two gradient sets
    are alive). ``mode="decode"``: the same keys plus ``"kv_cache"``, grads and
    optimizer 0, for a KV cache of ``batch_size`` rows of ``seq_len`` slots.
    The formulas are in the module docstring; they count the dense attention
    kind and dense linear layers (others keep other caches: ValueError).
    """
    B = check_int("batch_size", batch_size, 1)
    T = check_int("seq_len", seq_len, 1, config.block_size)
    check_choice("mode", mode, ("train", "decode"))
    if config.attention != "dense" or config.linear != "dense":
        raise ValueError(f"memory_model counts dense layers; config has attention="
                         f"{config.attention!r}, linear={config.linear!r}")
    size = config.np_dtype.itemsize
    V, L, H, C = config.vocab_size, config.n_layer, config.n_head, config.n_embd
    weights = config.num_params() * size
    if mode == "decode":
        kv = 2 * L * B * H * T * config.head_size * size                       # K and V, every layer
        prefill = 3 * H * T * T + 25 * T * C                                   # one prompt of T tokens
        step = B * (2 * V + 25 * C)                                            # one token per row
        act = max(prefill, step) * size
        return {"weights": weights, "grads": 0, "optimizer": 0, "kv_cache": kv,
                "activations": act, "total": weights + kv + act}
    N = B * T
    stored = stored_bytes(config, B, T)
    backward = 3 * N * V + N * C + max(24.5 * N * C, 2 * V * C)
    act = stored + int(max(4 * N * V, backward) * size)
    grads = weights * (2 if accumulating else 1)
    optimizer = 2 * weights
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": act,
            "total": weights + grads + optimizer + act}


def stored_bytes(config, batch_size: int, seq_len: int) -> int:
    """Bytes the forward pass keeps for the backward pass (the ``stored`` term):
    per block 17 N C + 2 N + N H values, the head 2 N C + N, the int64 ids and positions."""
    B, T, C = batch_size, seq_len, config.n_embd
    N, L, H = B * T, config.n_layer, config.n_head
    per_block = 17 * N * C + 2 * N + N * H
    if H == 1 or T == 1:             # merge_heads(y) is then a view of y, not a copy: one N C less
        per_block -= N * C
    return (L * per_block + 2 * N * C + N) * config.np_dtype.itemsize + 8 * (N + T)


def stored_activation_bytes(cache, params: dict) -> int:
    """Bytes of the distinct buffers a ``ForwardCache`` keeps alive, parameters excluded.

    Views (q, k, v of qkv; ``wte.T``) count once, through the array that owns the
    memory: this is what the ``stored`` term of ``memory_model`` must equal.
    """
    owners, skip = {}, {id(_owner(p)) for p in params.values()}

    def walk(obj):
        if isinstance(obj, (tuple, list)):
            for o in obj:
                walk(o)
        elif hasattr(obj, "nbytes") and hasattr(obj, "shape"):
            o = _owner(obj)
            if id(o) not in skip:
                owners[id(o)] = o
    walk(cache)
    return int(sum(o.nbytes for o in owners.values()))


def _owner(a):
    while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
        a = a.base
    return a


def find_batch_size(config, seq_len: int, budget_bytes, max_batch: int = 4096,
                    mode: str = "train", accumulating: bool = False, trace: list | None = None) -> int:
    """The largest batch B <= ``max_batch`` whose predicted peak fits ``budget_bytes``.

    Grows B by doubling while it fits, then bisects between the last fit and the
    first miss (the search of Lightning's finder, run on the model instead of on
    trial steps: no step is run, no memory is touched). ValueError if batch 1
    does not fit, with the bytes it needs. ``trace``: a list that gets every
    probe as ``(B, predicted bytes, fits)``.
    """
    budget = parse_bytes(budget_bytes, "budget_bytes")
    max_batch = check_int("max_batch", max_batch, 1)

    def need(b):
        total = memory_model(config, b, seq_len, mode, accumulating)["total"]
        if trace is not None:
            trace.append((b, total, total <= budget))
        return total
    if need(1) > budget:
        parts = memory_model(config, 1, seq_len, mode, accumulating)
        raise ValueError(f"budget_bytes={budget} ({format_bytes(budget)}) is below what batch 1 "
                         f"needs at seq_len={seq_len}: {parts['total']} bytes "
                         f"({format_bytes(parts['total'])}: " + ", ".join(
                             f"{k} {format_bytes(v)}" for k, v in parts.items() if k != "total") + ")")
    lo = 1                                                   # fits
    while lo < max_batch and need(min(2 * lo, max_batch)) <= budget:
        lo = min(2 * lo, max_batch)
    hi = min(2 * lo, max_batch + 1)                          # does not fit (or past max_batch)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
    return lo


def plan_batch(config, seq_len: int, budget_bytes, batch_size: int | None = None,
               max_batch: int = 1024) -> tuple[int, int | None]:
    """``(batch_size, micro_batch_size)`` for a training run under a budget.

    ``batch_size`` None ("auto"): the largest batch that fits, no accumulation.
    An int: that many rows per optimizer step; if they do not fit at once, the
    largest micro-batch that fits while accumulating (tokens per step are kept).
    """
    if batch_size is None:
        return find_batch_size(config, seq_len, budget_bytes, max_batch), None
    batch_size = check_int("batch_size", batch_size, 1)
    if memory_model(config, batch_size, seq_len)["total"] <= parse_bytes(budget_bytes, "budget_bytes"):
        return batch_size, None
    micro = find_batch_size(config, seq_len, budget_bytes, batch_size, accumulating=True)
    return batch_size, micro


# --- 3. training: out-of-memory backoff --------------------------------------------------------
class OOMBackoff(TrainHook):
    """Computes each step's loss and grads in micro-batches of ``micro_batch_size``
    rows; a ``MemoryError`` (CuPy's ``OutOfMemoryError`` is one) halves the
    micro-batch and redoes the *same* step from scratch, so no step is lost and
    the result equals the step at any micro-batch size (up to rounding).
    ``inner``: hooks whose ``loss_and_grads`` should answer inside (e.g. a
    distillation loss). Records ``micro_batch_size`` and ``oom_backoffs``; the
    reduced micro-batch is saved with the checkpoint, so a resume keeps it.
    Put it after hooks that supply their own loss (fp16's): the first answer wins.
    """

    name = "oom_backoff"

    def __init__(self, micro_batch_size: int, inner=()):
        self.micro = check_int("micro_batch_size", micro_batch_size, 1)
        self.inner, self.backoffs, self._step_backoffs = list(inner), 0, 0

    def loss_and_grads(self, model, x, y, step):
        self._step_backoffs = 0
        while True:
            try:
                # the loss and grads are pure functions of (parameters, batch): redoing is safe
                return accumulated_loss_and_grads(model, x, y, step, self.inner, self.micro)
            except MemoryError as exc:
                if self.micro == 1:
                    raise MemoryError(f"step {step + 1}: out of memory at micro-batch 1 "
                                      f"(seq_len {x.shape[1]}); nothing left to halve") from exc
                self.micro = max(1, min(self.micro, x.shape[0]) // 2)
                self.backoffs += 1
                self._step_backoffs += 1
                log.warning("step %d: %s; redoing it with micro-batch %d", step + 1,
                            type(exc).__name__, self.micro)

    def transform_grads(self, grads, step, record):
        record["micro_batch_size"] = self.micro
        record["oom_backoffs"] = self._step_backoffs
        return grads

    def state_dict(self):
        return {"micro_batch_size": np.array(self.micro)}

    def load_state_dict(self, state):
        self.micro = int(state["micro_batch_size"])


# --- 4. variable lengths: buckets ------------------------------------------------------------
def bucket_batches(lengths, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of indices of sequences of similar length: sorted longest first, then
    cut into consecutive batches of ``batch_size`` with the one short batch (if any)
    placed where it pads least, which minimises the padded slots of any split into
    batches of ``batch_size`` (with sizes fixed, an optimal split is consecutive in
    sorted order). The batch order is shuffled with ``seed`` so training does not
    see lengths in order."""
    lengths = _check_lengths(lengths)
    B = check_int("batch_size", batch_size, 1)
    order = np.argsort(-lengths, kind="stable")
    s, full = lengths[order], len(order) // B                       # sorted lengths, full batches
    r = len(order) - full * B                                       # the short batch's size
    sizes = [B] * full
    if r:                                                           # padded slots if k full batches
        before = np.concatenate([[0], np.cumsum(s[0:full * B:B])])  # come first: their maxima,
        after = np.concatenate([np.cumsum(s[r::B][::-1])[::-1], [0]])   # those after it,
        k = int(np.argmin(B * before + r * s[np.arange(full + 1) * B] + B * after))   # its own
        sizes.insert(k, r)
    ends = np.cumsum(sizes)
    batches = [order[e - n:e] for n, e in zip(sizes, ends)]
    perm = np.random.default_rng(seed).permutation(len(batches))
    return [batches[i] for i in perm]


def random_batches(lengths, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of indices in random order (what ``bucket_batches`` is compared with)."""
    lengths = _check_lengths(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    batch_size = check_int("batch_size", batch_size, 1)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_waste(batches, lengths) -> float:
    """Fraction of the padded token slots (each batch padded to its longest) that are padding."""
    lengths = _check_lengths(lengths)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - float(sum(int(lengths[b].sum()) for b in batches)) / padded


def _check_lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 1:
        raise ValueError(f"lengths must be a non-empty 1-D array of ints >= 1, got {lengths!r:.80}")
    return lengths


# --- 5. serving: iteration-level scheduling ---------------------------------------------------
def prefill_packed(model, cache, rows, prompts):
    """Prefill several prompts, each into its own cache row, in one pass -> logits (k, V).

    ``prompts``: k 1-D id arrays; ``rows``: the cache row of each. The prompts are
    laid end to end as one sequence of N = sum P tokens, without padding: the
    embeddings, layer norms, linear layers and MLP run over all N tokens at once,
    and only attention runs per prompt, on its own row and positions 0..P-1
    (Orca's *selective batching*, Yu et al. 2022, sec. 4.2). Row k ends up as
    ``kv_cache.prefill`` of that prompt alone would leave it; the logits are
    those at each prompt's last token. The other rows are untouched.
    """
    p, cfg, xp = model.params, model.config, model.xp
    kind = seams.attention_kind(cfg.attention)
    lens = np.array([q.shape[0] for q in prompts], dtype=np.int64)                # (k,)
    ends = np.cumsum(lens)
    starts = ends - lens
    ids = np.concatenate(prompts)[:, None]                                           # (N, 1)
    pos = np.concatenate([np.arange(n) for n in lens])                               # (N,)
    x, _ = embedding_forward(xp.asarray(ids), p["wte.weight"], p["wpe.weight"], pos)  # (N, 1, C)
    x = x.reshape(1, -1, x.shape[-1])                                                # (1, N, C)
    zero = np.zeros(1, dtype=np.int64)
    for i in range(cfg.n_layer):
        def attention(qkv, n_head, state=cache.layers[i]):                           # qkv (1, N, 3C)
            ys = []
            for r, s, e in zip(rows, starts, ends):
                extra = {"n_valid": np.array([e - s])} if kind.takes_n_valid else {}
                row = tuple(a[r:r + 1] for a in state)                               # a view
                ys.append(kind.step(qkv[:, s:e], row, zero, n_head, cfg, **extra))  # (1, P, C)
            return xp.concatenate(ys, axis=1), None                                  # (1, N, C)
        x, _ = transformer.block_forward(x, p, i, cfg, attention=attention)
    cache.lengths[np.asarray(rows)] = lens
    logits, _ = transformer.head_forward(x[0, xp.asarray(ends - 1)], p, cfg)         # (k, V)
    return logits


@dataclass
class Request:
    """One request: its prompt, sampling settings, tokens so far and timestamps."""
    id: int
    prompt: np.ndarray                       # (P,) int64
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    rng: np.random.Generator
    eos_id: int | None
    new: list = field(default_factory=list)  # the generated ids
    slot: int | None = None                  # KV cache row while decoding
    t_submit: float = 0.0
    t_first: float | None = None             # first new token (time to first token)
    t_done: float | None = None
    finish_reason: str | None = None         # "length", "stop" (eos) or "cancelled"
    events: queue.Queue | None = None        # ("token", id) ... ("done", reason) for streaming
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Server:
    """Continuous (iteration-level) batching over one KV cache of ``slots`` rows.

    One step (``step``): drop cancelled requests; *admit* waiting requests into
    free rows (all of them prefilled together by ``prefill_packed``, in passes of
    at most ``max_len`` tokens; each samples its first token); *decode* one token
    for rows [0, n) (``decode_step`` on a ``KVCache.rows`` view, ``active=`` the
    busy ones), sample, and free the rows that finished. Continuous batching keeps
    the busy rows a prefix (a request moves into a hole no newcomer filled), so n
    is the number of running requests. ``policy="static"`` admits only into an
    empty cache and keeps n at its batch until the last request is done (finished
    rows compute on a dummy token, as rows of a padded batch do): the baseline.
    ``memory_budget`` (bytes or "512MiB") caps the rows so that weights + KV cache
    + the step's temporaries fit (``memory_model``, ``mode="decode"``). ``submit``
    may be called from any thread; the scheduler runs in the caller's thread
    (``run_until_done``) or its own (``start``).
    """

    def __init__(self, model, max_batch: int = 16, memory_budget=None, max_len: int | None = None,
                 policy: str = "continuous"):
        self.model = model
        self.max_len = check_int("max_len", model.config.block_size if max_len is None else max_len,
                                 2, model.config.block_size)
        slots = check_int("max_batch", max_batch, 1)
        self.memory_budget = None
        if memory_budget is not None:
            self.memory_budget = parse_bytes(memory_budget, "memory_budget")
            slots = min(slots, find_batch_size(model.config, self.max_len, self.memory_budget,
                                               slots, mode="decode"))
        self.policy = check_choice("policy", policy, ("continuous", "static"))
        self.cache = kv_cache.KVCache.for_model(model, slots, self.max_len)
        self.rows: list[Request | None] = [None] * slots              # who holds each row
        self.next_token = np.zeros(slots, dtype=np.int64)              # (B,) fed at the next step
        self.waiting: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.timeline: list[list[int]] = []                           # per step: request id per row (-1 free)
        self._width = 0                                               # decode steps run rows [0, _width)
        self.rows_run = self.prefill_passes = 0                       # rows decoded (sum over steps), passes
        self.decode_s = self.prefill_s = 0.0                          # seconds in each (host clock)
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    @property
    def slots(self) -> int:
        return self.cache.batch_size

    # --- the public API ------------------------------------------------------------
    def submit(self, prompt_ids, max_new_tokens: int = 50, temperature: float = 0.0,
               seed=0, top_k: int | None = None, top_p: float | None = None,
               eos_id: int | None = None, stream: bool = False) -> int:
        """Queue a prompt (1-D ids) -> a handle. Its tokens equal ``generate(model,
        prompt[None], ..., seed=seed)``'s: the same generator, ``default_rng([seed, 0])``."""
        ids = to_numpy(self.model.check_idx(np.asarray(prompt_ids).reshape(1, -1), "prompt_ids"))[0]
        sampling.check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        check_int("max_new_tokens", max_new_tokens, 1)
        if ids.shape[0] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {ids.shape[0]} tokens + max_new_tokens={max_new_tokens} "
                             f"exceeds the context of {self.max_len} tokens")
        if eos_id is not None:
            self.model.check_idx(np.array([[eos_id]]), "eos_id")
        with self._lock:
            h = next(self._ids)
            req = Request(h, ids.astype(np.int64), max_new_tokens, float(temperature), top_k, top_p,
                          sampling.row_rngs(seed, 1)[0], eos_id, t_submit=time.perf_counter(),
                          events=queue.Queue() if stream else None)
            self.requests[h] = req
        self._inbox.put(req)
        return h

    def cancel(self, handle: int) -> None:
        """Stop a request (a client went away): its row is freed at the next step."""
        self._request(handle).cancelled = True

    def result(self, handle: int) -> np.ndarray:
        """The prompt's ids followed by its new ids (ValueError if not done yet)."""
        req = self._request(handle)
        if not req.done:
            raise ValueError(f"request {handle} is not done yet (run the server first)")
        return np.concatenate([req.prompt, np.asarray(req.new, dtype=np.int64)])

    def stats(self, handle: int) -> dict:
        """Seconds from submit to the first token (ttft) and to the last (latency), and counts."""
        r = self._request(handle)
        return {"prompt_tokens": int(r.prompt.shape[0]), "new_tokens": len(r.new),
                "ttft_s": None if r.t_first is None else r.t_first - r.t_submit,
                "latency_s": None if r.t_done is None else r.t_done - r.t_submit,
                "finish_reason": r.finish_reason}

    def run_until_done(self) -> None:
        """Step until every submitted request is done (in this thread)."""
        while self.step():
            pass

    def start(self) -> "Server":
        """Run the scheduler in a background thread (for ``serve_http``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minillm-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    # --- one scheduler iteration ---------------------------------------------------------
    def step(self) -> bool:
        """Admit, decode one token per busy row, retire -> False when there is no work."""
        self._drain_inbox()
        for req in self.rows:
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        self.waiting = [q for q in self.waiting if not q.cancelled]
        self._admit()
        n = self._width                                                          # rows [0, n) run
        busy = np.array([req is not None for req in self.rows[:n]], dtype=bool)   # (n,)
        if not busy.any():
            return bool(self.waiting) or not self._inbox.empty()
        self.timeline.append([-1 if req is None else req.id for req in self.rows])
        t0 = time.perf_counter()
        logits = kv_cache.decode_step(self.model, self.cache.rows(slice(0, n)), self.next_token[:n],
                                      active=busy)                               # (n, V)
        logits = to_numpy(logits)[busy]
        self.decode_s += time.perf_counter() - t0
        self.rows_run += n
        self._emit([self.rows[r] for r in np.flatnonzero(busy)], logits)
        return True

    def _admit(self) -> None:
        """Give waiting requests free rows, keep the busy rows a prefix, prefill the new ones."""
        n = self._width
        if self.policy == "static":
            if any(req is not None for req in self.rows[:n]):
                return                                  # static: wait until the whole batch left
            n = 0
        free = [r for r in range(n) if self.rows[r] is None] + list(range(n, self.slots))
        admitted = []
        for r in free[:len(self.waiting)]:
            req = self.waiting.pop(0)
            req.slot, self.rows[r] = r, req
            admitted.append(req)
        n = max([n] + [req.slot + 1 for req in admitted])
        # static runs its whole batch until the last request is done (finished rows compute
        # on a dummy token, as a padded batch does); continuous runs only the busy rows
        self._width = n if self.policy == "static" else self._compact(n)
        group, tokens = [], 0
        for req in admitted + [None]:                   # packed prefills of <= max_len tokens each
            if group and (req is None or tokens + req.prompt.shape[0] > self.max_len):
                t0 = time.perf_counter()
                logits = to_numpy(prefill_packed(self.model, self.cache, [q.slot for q in group],
                                                 [q.prompt for q in group]))    # (k, V)
                self.prefill_s += time.perf_counter() - t0
                self.prefill_passes += 1
                self._emit(group, logits)
                group, tokens = [], 0
            if req is not None:
                group.append(req)
                tokens += req.prompt.shape[0]

    def _compact(self, n: int) -> int:
        """Move busy rows from the end of [0, n) into its holes -> the number of busy rows.

        Holes appear when requests finish and no waiting request takes their row; a
        move copies that row's decode state, so the request continues unchanged."""
        busy = [r for r in range(n) if self.rows[r] is not None]
        holes = [r for r in range(len(busy)) if self.rows[r] is None]
        for dst, src in zip(holes, [r for r in busy if r >= len(busy)]):
            for state in self.cache.layers:
                for a in state:
                    a[dst] = a[src]
            self.cache.lengths[dst], self.cache.lengths[src] = self.cache.lengths[src], 0
            self.next_token[dst] = self.next_token[src]
            req = self.rows[src]
            self.rows[dst], self.rows[src], req.slot = req, None, dst
        return len(busy)

    def _emit(self, reqs: list, logits) -> None:
        """Sample each request's next token from its row of logits (k, V) on the host;
        finish it or queue the token. Greedy rows take one argmax over all rows."""
        greedy = sampling.sample_next(logits, 0.0) if any(q.temperature == 0 for q in reqs) else None
        now = time.perf_counter()
        for j, req in enumerate(reqs):
            if req.temperature == 0:
                nxt = int(greedy[j])
            else:
                nxt = int(sampling.sample_next(logits[j:j + 1], req.temperature, req.top_k, req.top_p,
                                               [req.rng])[0])
            req.new.append(nxt)
            req.t_first = now if req.t_first is None else req.t_first
            if req.events is not None:
                req.events.put(("token", nxt))
            if req.eos_id is not None and nxt == req.eos_id:
                self._finish(req, "stop")
            elif len(req.new) == req.max_new_tokens:
                self._finish(req, "length")
            else:
                self.next_token[req.slot] = nxt

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason, req.t_done = reason, time.perf_counter()
        if req.slot is not None:
            self.cache.free(req.slot)
            self.rows[req.slot], req.slot = None, None
        if req.events is not None:
            req.events.put(("done", reason))
        s = self.stats(req.id)
        log.info("request %d: %d prompt + %d new tokens, %s, ttft %.3f s, latency %.3f s",
                 req.id, s["prompt_tokens"], s["new_tokens"], reason, s["ttft_s"] or 0.0,
                 s["latency_s"])

    def _drain_inbox(self, block: bool = False) -> None:
        while True:
            try:
                req = self._inbox.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                return
            if req is not None:
                self.waiting.append(req)
            block = False

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self._drain_inbox(block=True)      # idle: wait for a request
        except BaseException as exc:                   # surfaced to every waiting client
            self.error = exc
            log.exception("scheduler stopped")
            for req in list(self.requests.values()):
                if not req.done:
                    self._finish(req, "error")

    def _request(self, handle) -> Request:
        if handle not in self.requests:
            raise ValueError(f"handle={handle!r} is not a request of this server")
        return self.requests[handle]


# --- 6. the HTTP front: OpenAI's /v1/completions ----------------------------------------------
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream"}
MAX_BODY = 1 << 20                       # bytes of one request body


class RequestError(ValueError):
    """A bad request: answered with HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_completion(body: bytes, tokenizer, max_len: int) -> dict:
    """The JSON body of a completions request -> checked ``Server.submit`` arguments.

    Defaults as OpenAI's: max_tokens 16, temperature 1; seed None (fresh entropy).
    """
    try:
        req = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError(f"the body must be a JSON object, got {type(req).__name__}")
    unknown = sorted(set(req) - COMPLETION_FIELDS)
    if unknown:
        raise RequestError(f"unknown fields {unknown}; this server accepts {sorted(COMPLETION_FIELDS)}")
    prompt = req.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(f"prompt must be a non-empty string, got {prompt!r:.60}")
    ids = tokenizer.encode(prompt)
    if not ids or len(ids) >= max_len:
        raise RequestError(f"prompt is {len(ids)} tokens; it must be 1 .. {max_len - 1} "
                           f"(the context is {max_len})")
    out = {"prompt_ids": np.asarray(ids, dtype=np.int64), "stream": req.get("stream", False),
           "max_new_tokens": req.get("max_tokens", 16), "temperature": req.get("temperature", 1.0),
           "top_p": req.get("top_p"), "seed": req.get("seed")}
    if not isinstance(out["stream"], bool):
        raise RequestError(f"stream must be true or false, got {out['stream']!r}")
    try:
        check_int("max_tokens", out["max_new_tokens"], 1, max_len - len(ids))
        check_float("temperature", out["temperature"], 0)
        if out["top_p"] is not None:
            check_float("top_p", out["top_p"], 0, 1, lo_open=True)
        check_optional_int("seed", out["seed"], 0)
    except ValueError as exc:
        raise RequestError(f"{exc} (prompt: {len(ids)} tokens, context: {max_len})") from None
    return out


def make_http_server(server: Server, tokenizer, host: str = "127.0.0.1", port: int = 8000,
                     model_name: str = "minillm"):
    """A ``ThreadingHTTPServer`` answering ``POST /v1/completions`` from ``server``
    (started here if it is not running). Call ``serve_forever()`` on it; port 0
    picks a free port (``.server_address[1]``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    server.start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):                    # into the logger, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, {"status": "ok", "slots": server.slots,
                                        "waiting": len(server.waiting)})
            self._error(RequestError(f"no route GET {self.path}; POST /v1/completions", 404,
                                     "not_found"))

        def do_POST(self):
            try:
                if self.path != "/v1/completions":
                    raise RequestError(f"no route POST {self.path}; POST /v1/completions", 404,
                                       "not_found")
                size = self.headers.get("Content-Length") or "0"
                if not size.isdigit() or int(size) > MAX_BODY:
                    raise RequestError(f"Content-Length={size!r} must be a byte count <= {MAX_BODY}",
                                       413 if size.isdigit() else 400)
                body = self.rfile.read(int(size))
                args = parse_completion(body, tokenizer, server.max_len)
                stream = args.pop("stream")
                h = server.submit(args.pop("prompt_ids"), stream=True, **args)
            except RequestError as exc:
                return self._error(exc)
            self._stream(h) if stream else self._complete(h)

        def _complete(self, h):
            reason = _wait_done(server, h)
            req = server.requests[h]
            try:
                self._json(200 if reason != "error" else 500,
                           _completion(h, model_name, tokenizer.decode(req.new), reason, req))
            except (BrokenPipeError, ConnectionResetError):
                log.info("request %d: the client left before its answer", h)

        def _stream(self, h):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            req, sent = server.requests[h], ""
            try:
                while True:
                    kind, value = req.events.get()
                    text = tokenizer.decode(req.new)
                    if kind == "token" and text.endswith("\ufffd"):
                        continue                  # half of a UTF-8 character: wait for the rest
                    chunk = _completion(h, model_name, text[len(sent):],
                                        value if kind == "done" else None, None)
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    sent = text
                    if kind == "done":
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                server.cancel(h)                  # the client left: free its row
                log.info("request %d: client disconnected; cancelled", h)
            self.close_connection = True

        def _json(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: RequestError):
            self._json(exc.status, {"error": {"message": str(exc), "type": exc.kind}})

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    return httpd


def _wait_done(server: Server, h: int) -> str:
    """Block until request ``h`` is done (its events end with ("done", reason))."""
    events = server.requests[h].events
    while True:
        kind, value = events.get()
        if kind == "done":
            return value


def _completion(h: int, model_name: str, text: str, reason, req) -> dict:
    """An OpenAI ``text_completion`` object (a stream chunk when ``req`` is None)."""
    out = {"id": f"cmpl-{h}", "object": "text_completion", "created": int(time.time()),
           "model": model_name, "choices": [{"text": text, "index": 0, "logprobs": None,
                                              "finish_reason": reason}]}
    if req is not None:
        n_prompt, n_new = int(req.prompt.shape[0]), len(req.new)
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                        "total_tokens": n_prompt + n_new}
    return out


# --- 7. the tour row -------------------------------------------------------------------------
@technique("batching", order=9)
def batching_row(ctx: TourContext) -> Row:
    """Continuous batching: the baseline's weights (same perplexity) served by the
    iteration-level scheduler; 12 greedy requests with mixed output lengths, max batch 4,
    continuous vs static (same code, ``policy``), and the batch ``find_batch_size``
    picks for training under 1 GiB."""
    model, cfg = ctx.model, ctx.model.config
    rng = np.random.default_rng(ctx.seed)
    longest = min(16, cfg.block_size // 4)                              # prompt lengths 2..longest
    work = []
    for s in rng.integers(0, len(ctx.val_ids) - longest, 12):
        prompt = ctx.val_ids[s:s + int(rng.integers(2, longest + 1))]
        work.append((prompt, int(rng.integers(4, min(32, cfg.block_size - len(prompt)) + 1))))
    tok_s, steps = {}, {}
    for policy in ("static", "continuous"):
        server = Server(model, max_batch=4, policy=policy)
        t0 = time.perf_counter()
        for prompt, n in work:
            server.submit(prompt, n, temperature=0.0)
        server.run_until_done()
        tok_s[policy] = sum(n for _, n in work) / (time.perf_counter() - t0)
        steps[policy] = len(server.timeline)
    auto = find_batch_size(cfg, cfg.block_size, 2**30) if cfg.attention == "dense" else None
    ppl = ctx.baseline.val_ppl if ctx.baseline else ctx.val_ppl()
    speedup = tok_s["continuous"] / tok_s["static"]
    return Row("batching", model.num_params(), model.nbytes(), ppl, None, tok_s["continuous"],
               f"12 greedy requests (4-{max(n for _, n in work)} new tokens), max batch 4: continuous "
               f"{tok_s['continuous']:.0f} tok/s in {steps['continuous']} decode steps vs static "
               f"{tok_s['static']:.0f} in {steps['static']} ({speedup:.2f}x); training batch that "
               f"fits 1 GiB at T={cfg.block_size}: {auto}; perplexity unchanged (same weights)",
               {"static_tok_s": tok_s["static"], "continuous_over_static": speedup,
                "decode_steps": steps, "auto_batch_1GiB": auto, "backend": current()})
