"""Numba twins of minillm.tokenizer's BPE kernels (split, bpe_train, bpe_encode).

Why they are fast (the reference is the readable version; results are equal):

- ``tokenizer.split``: the gpt2 / gpt4 regexes are hand-compiled into one scan
  over code points, with a per-code-point class table (letter / number /
  whitespace, built once from the ``regex`` package itself so classes agree
  with the reference). No Python object per chunk. Other patterns use
  ``regex`` exactly as the reference does.
- ``tokenizer.bpe_train``: pair counts are updated incrementally. Each pair
  keeps a list of the positions where it occurs; a merge visits only those
  positions, fixes the counts of the neighbouring pairs, and a max-heap (count
  high first, then pair key low first: the reference's tie-break) gives the
  next pair. Cost ~ number of occurrences changed, not (merges x corpus).
- ``tokenizer.bpe_encode``: merges live in an open-addressing hash table
  (pair key -> rank); per chunk, the rank of each adjacent pair is kept and
  only the two pairs next to a merge are looked up again.

All kernels are ``nogil`` so ``encode_batch`` runs them on several threads.
This module never imports ``minillm``.
"""
from __future__ import annotations

import numpy as np
import regex
from numba import njit

_JIT = dict(cache=True, nogil=True)

# Same strings as minillm.tokenizer.GPT2_PATTERN / GPT4_PATTERN (a test checks it).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

# class bits per code point; the high nibble numbers the contraction letter
L_, N_, S_ = 1, 2, 4
_FOLD = "sdmtlver"          # (?i:...) letters of the contractions: code 1..8
_TABLE: list = []


def class_table() -> np.ndarray:
    """(0x110000,) uint8: bit 1 \\p{L}, bit 2 \\p{N}, bit 4 \\s; high nibble: which
    of ``s d m t l v e r`` the code point equals case-insensitively (0: none)."""
    if not _TABLE:
        cps = np.r_[0:0xD800, 0xE000:0x110000].astype(np.uint32)       # no lone surrogates
        text = cps.astype("<u4").tobytes().decode("utf-32-le")
        table = np.zeros(0x110000, dtype=np.uint8)
        for bit, rx in ((L_, r"\p{L}+"), (N_, r"\p{N}+"), (S_, r"\s+")):
            for m in regex.finditer(rx, text):
                table[cps[m.start():m.end()]] |= bit
        for code, letter in enumerate(_FOLD, start=1):
            for m in regex.finditer(f"(?i:{letter})", text):
                table[cps[m.start()]] |= code << 4
        _TABLE.append(table)
    return _TABLE[0]


# --- pre-tokenizer ---------------------------------------------------------------
@njit(**_JIT)
def _run(cls, cps, i, n, bit):
    """End of the run of code points with class ``bit`` starting at ``i``."""
    while i < n and cls[cps[i]] & bit:
        i += 1
    return i


@njit(**_JIT)
def _run_other(cls, cps, i, n):
    """End of the run of code points that are not letter / number / whitespace."""
    while i < n and (cls[cps[i]] & 7) == 0:
        i += 1
    return i


@njit(**_JIT)
def _contraction(cls, cps, i, n, ci):
    """End of ``'s 't 're 've 'm 'll 'd`` at ``i`` (case-insensitive if ``ci``), else -1."""
    if cps[i] != 39 or i + 1 >= n:
        return -1
    a = cls[cps[i + 1]] >> 4 if ci else _FOLD_EXACT(cps[i + 1])
    if 1 <= a <= 4:                                   # s d m t
        return i + 2
    if i + 2 < n:
        b = cls[cps[i + 2]] >> 4 if ci else _FOLD_EXACT(cps[i + 2])
        if (a == 5 and b == 5) or (a == 6 and b == 7) or (a == 8 and b == 7):   # ll ve re
            return i + 3
    return -1


@njit(**_JIT)
def _FOLD_EXACT(cp):
    """Code 1..8 for the lowercase ASCII letters s d m t l v e r, else 0."""
    for k, c in enumerate((115, 100, 109, 116, 108, 118, 101, 114)):
        if cp == c:
            return k + 1
    return 0


@njit(**_JIT)
def _ws_end(cls, cps, i, n):
    """``\\s++$|\\s+(?!\\S)|\\s`` at a whitespace code point ``i``."""
    j = _run(cls, cps, i, n, S_)
    if j == n:
        return n
    if j - i >= 2:
        return j - 1                                  # leave one space for the next word
    return i + 1


@njit(**_JIT)
def _gpt2_end(cls, cps, i, n):
    """End of the GPT-2 regex match at ``i``."""
    e = _contraction(cls, cps, i, n, False)
    if e >= 0:
        return e
    j = i + 1 if cps[i] == 32 and i + 1 < n else i    # ` ?` before a letter/number/other run
    c = cls[cps[j]] & 7
    if j > i and c & S_:
        j, c = i, S_                                  # "  ": the space is whitespace
    if c & L_:
        return _run(cls, cps, j, n, L_)
    if c & N_:
        return _run(cls, cps, j, n, N_)
    if c == 0:
        return _run_other(cls, cps, j, n)
    return _ws_end(cls, cps, i, n)


@njit(**_JIT)
def _gpt4_end(cls, cps, i, n):
    """End of the cl100k (GPT-4) regex match at ``i``."""
    e = _contraction(cls, cps, i, n, True)
    if e >= 0:
        return e
    c = cls[cps[i]] & 7
    cr = cps[i] == 10 or cps[i] == 13
    # [^\r\n\p{L}\p{N}]?+\p{L}++
    if c & L_:
        return _run(cls, cps, i, n, L_)
    if not cr and not (c & N_) and i + 1 < n and cls[cps[i + 1]] & L_:
        return _run(cls, cps, i + 1, n, L_)
    # \p{N}{1,3}+
    if c & N_:
        j = i + 1
        while j < n and j < i + 3 and cls[cps[j]] & N_:
            j += 1
        return j
    # ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
    j = i + 1 if cps[i] == 32 and i + 1 < n and (cls[cps[i + 1]] & 7) == 0 else i
    if (cls[cps[j]] & 7) == 0:
        j = _run_other(cls, cps, j, n)
        while j < n and (cps[j] == 10 or cps[j] == 13):
            j += 1
        return j
    # whitespace: \s++$ | \s*[\r\n] | \s+(?!\S) | \s
    j = _run(cls, cps, i, n, S_)
    if j == n:
        return n
    for k in range(j - 1, i - 1, -1):                 # the last \r or \n of the run
        if cps[k] == 10 or cps[k] == 13:
            return k + 1
    if j - i >= 2:
        return j - 1
    return i + 1


@njit(**_JIT)
def _split_cps(cps, cls, gpt4):
    """Chunk spans of code points ``cps`` as UTF-8 byte offsets (n, 2) int64."""
    n = cps.shape[0]
    spans = np.empty((n, 2), dtype=np.int64)
    i, k, b = 0, 0, 0
    while i < n:
        e = _gpt4_end(cls, cps, i, n) if gpt4 else _gpt2_end(cls, cps, i, n)
        spans[k, 0] = b
        for t in range(i, e):                         # UTF-8 width of each code point
            cp = cps[t]
            b += 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
        spans[k, 1] = b
        k += 1
        i = e
    return spans[:k]


def split(text: str, pattern: str) -> np.ndarray:
    """Accelerated minillm.tokenizer.split — see it for the math."""
    if pattern not in (GPT2_PATTERN, GPT4_PATTERN):
        return _split_regex(text, pattern)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (L,)
    return _split_cps(cps, class_table(), pattern == GPT4_PATTERN)


def _split_regex(text, pattern):
    """Any other pattern: the ``regex`` package, as the reference does."""
    spans = np.array([m.span() for m in regex.finditer(pattern, text)], dtype=np.int64).reshape(-1, 2)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)]).astype(np.int64)[spans]


# --- hash table: int64 key -> slot, open addressing, linear probing ----------------
@njit(**_JIT)
def _slot(keys, key):
    """Index of ``key`` in ``keys`` (power-of-two size, -1 = empty), or of the empty slot for it."""
    mask = keys.shape[0] - 1
    h = key ^ (key >> 29)
    h *= -49064778989728563                           # 0xff51afd7ed558ccd (murmur3 finaliser)
    h ^= h >> 32
    i = h & mask
    while keys[i] != -1 and keys[i] != key:
        i = (i + 1) & mask
    return i


def _pow2_at_least(n):
    return 1 << max(4, int(n - 1).bit_length())


# --- counting distinct chunks ------------------------------------------------------
@njit(**_JIT)
def _chunk_hash(data, s, e):
    h = np.int64(-3750763034362895579)                        # FNV-1a offset basis
    for i in range(s, e):
        h = (h ^ data[i]) * 1099511628211
    return h


@njit(**_JIT)
def _same(data, s1, e1, s2, e2):
    if e1 - s1 != e2 - s2:
        return False
    for i in range(e1 - s1):
        if data[s1 + i] != data[s2 + i]:
            return False
    return True


@njit(**_JIT)
def _count_chunks(data, spans, table_size):
    n = spans.shape[0]
    mask = table_size - 1
    first = np.full(table_size, -1, np.int64)                 # hash slot -> unique index
    uspan = np.empty(n, np.int64)                             # unique index -> its first span
    counts = np.zeros(n, np.int64)
    u = 0
    for c in range(n):
        s, e = spans[c, 0], spans[c, 1]
        h = _chunk_hash(data, s, e) & mask
        while first[h] != -1:
            f = uspan[first[h]]
            if _same(data, spans[f, 0], spans[f, 1], s, e):
                break
            h = (h + 1) & mask
        if first[h] == -1:
            first[h] = u
            uspan[u] = c
            u += 1
        counts[first[h]] += 1
    offsets = np.zeros(u + 1, np.int64)
    for k in range(u):
        offsets[k + 1] = offsets[k] + spans[uspan[k], 1] - spans[uspan[k], 0]
    ids = np.empty(offsets[u], np.int32)
    for k in range(u):
        s = spans[uspan[k], 0]
        for i in range(offsets[k + 1] - offsets[k]):
            ids[offsets[k] + i] = data[s + i]
    return ids, offsets, counts[:u]


def count_chunks(data, spans):
    """Accelerated minillm.tokenizer.count_chunks — see it for the math."""
    spans = np.ascontiguousarray(spans, np.int64).reshape(-1, 2)
    return _count_chunks(np.ascontiguousarray(data, np.uint8), spans, _pow2_at_least(2 * len(spans) + 16))


# --- training ------------------------------------------------------------------
@njit(**_JIT)
def _heap_better(hc, hk, i, j):
    """Entry i before entry j: higher count, then lower key."""
    return hc[i] > hc[j] or (hc[i] == hc[j] and hk[i] < hk[j])


@njit(**_JIT)
def _heap_push(hc, hk, size, count, key):
    i = size
    hc[i], hk[i] = count, key
    while i > 0:
        parent = (i - 1) >> 1
        if not _heap_better(hc, hk, i, parent):
            break
        hc[i], hc[parent] = hc[parent], hc[i]
        hk[i], hk[parent] = hk[parent], hk[i]
        i = parent
    return size + 1


@njit(**_JIT)
def _heap_pop(hc, hk, size):
    """Remove the top entry; returns the new size (the top was read by the caller)."""
    size -= 1
    hc[0], hk[0] = hc[size], hk[size]
    i = 0
    while True:
        best, left, right = i, 2 * i + 1, 2 * i + 2
        if left < size and _heap_better(hc, hk, left, best):
            best = left
        if right < size and _heap_better(hc, hk, right, best):
            best = right
        if best == i:
            return size
        hc[i], hc[best] = hc[best], hc[i]
        hk[i], hk[best] = hk[best], hk[i]
        i = best


@njit(**_JIT)
def _train(ids, offsets, counts, num_merges, progress, table_size):
    N = ids.shape[0]
    base = 256 + num_merges
    tok = ids.astype(np.int64)                                     # (N,) current id at each position
    nxt = np.full(N, -1, np.int64)                                 # next live position in the chunk
    prv = np.full(N, -1, np.int64)
    w = np.empty(N, np.int64)                                      # count of the position's chunk
    for c in range(offsets.shape[0] - 1):
        for p in range(offsets[c], offsets[c + 1]):
            w[p] = counts[c]
            if p + 1 < offsets[c + 1]:
                nxt[p] = p + 1
            if p > offsets[c]:
                prv[p] = p - 1
    cap = 3 * N + 16                                               # pairs ever made <= 3N
    keys = np.full(table_size, -1, np.int64)                       # hash: pair key -> slot
    slot_of = np.empty(table_size, np.int64)
    pcount = np.zeros(cap, np.int64)                               # per slot: weighted count
    phead = np.full(cap, -1, np.int64)                             # per slot: occurrence list head
    pkey = np.empty(cap, np.int64)
    opos = np.empty(cap, np.int64)                                 # occurrence nodes: position, next
    onext = np.empty(cap, np.int64)
    state = np.zeros(2, np.int64)                                  # [slots used, nodes used]
    for p in range(N):
        if nxt[p] != -1:
            _add(keys, slot_of, pcount, phead, pkey, opos, onext, state,
                 tok[p] * base + tok[nxt[p]], w[p], p)
    hc = np.empty(cap + 4 * N + 16, np.int64)                      # heap: count, key
    hk = np.empty(cap + 4 * N + 16, np.int64)
    size = 0
    for s in range(state[0]):
        size = _heap_push(hc, hk, size, pcount[s], pkey[s])
    merges = np.empty((num_merges, 2), np.int32)
    touched = np.empty(cap, np.int64)
    stamp = np.full(cap, -1, np.int64)
    found = np.empty(cap, np.int64)
    m = 0
    while m < num_merges:
        # 1. the best pair: pop until an entry matches its pair's current count
        best = -1
        while size > 0:
            c, key = hc[0], hk[0]
            size = _heap_pop(hc, hk, size)
            s = slot_of[_slot(keys, key)]
            if c > 0 and pcount[s] == c:
                best = s
                break
        if best < 0:
            break
        a, b = pkey[best] // base, pkey[best] % base
        new = 256 + m
        merges[m, 0], merges[m, 1] = a, b
        # 2. its positions, left to right
        k, node = 0, phead[best]
        while node != -1:
            found[k] = opos[node]
            k += 1
            node = onext[node]
        pos = np.sort(found[:k])
        # 3. merge each live occurrence, fixing the neighbours' pair counts
        nt = 0
        for p in pos:
            q = nxt[p]
            if tok[p] != a or q == -1 or tok[q] != b:
                continue                                           # stale, or eaten by an overlap
            l, r, wt = prv[p], nxt[q], w[p]
            if l != -1:
                nt = _touch(_add(keys, slot_of, pcount, phead, pkey, opos, onext, state,
                                 tok[l] * base + a, -wt, -1), touched, stamp, nt, m)
                nt = _touch(_add(keys, slot_of, pcount, phead, pkey, opos, onext, state,
                                 tok[l] * base + new, wt, l), touched, stamp, nt, m)
            if r != -1:
                nt = _touch(_add(keys, slot_of, pcount, phead, pkey, opos, onext, state,
                                 b * base + tok[r], -wt, -1), touched, stamp, nt, m)
                nt = _touch(_add(keys, slot_of, pcount, phead, pkey, opos, onext, state,
                                 new * base + tok[r], wt, p), touched, stamp, nt, m)
            tok[p] = new
            tok[q] = -1
            nxt[p] = r
            if r != -1:
                prv[r] = p
        pcount[best] = 0
        phead[best] = -1
        # 4. every pair whose count changed gets a heap entry with its new count
        for t in range(nt):
            s = touched[t]
            if pcount[s] > 0:
                size = _heap_push(hc, hk, size, pcount[s], pkey[s])
        m += 1
        progress[0] = m
    return merges[:m]


@njit(**_JIT)
def _touch(s, touched, stamp, nt, m):
    """Remember slot ``s`` once per merge."""
    if stamp[s] != m:
        stamp[s] = m
        touched[nt] = s
        nt += 1
    return nt


@njit(**_JIT)
def _add(keys, slot_of, pcount, phead, pkey, opos, onext, state, key, dw, p):
    """count[key] += dw; record position ``p`` (if >= 0) as an occurrence. Returns the slot."""
    h = _slot(keys, key)
    if keys[h] == -1:
        keys[h] = key
        slot_of[h] = state[0]
        pkey[state[0]] = key
        state[0] += 1
    s = slot_of[h]
    pcount[s] += dw
    if p >= 0:
        node = state[1]
        opos[node], onext[node] = p, phead[s]
        phead[s] = node
        state[1] += 1
    return s


def bpe_train(ids, offsets, counts, num_merges, progress):
    """Accelerated minillm.tokenizer.bpe_train — see it for the math."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    table = _pow2_at_least(2 * (3 * len(ids) + 16))
    return _train(ids, np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(counts, np.int64),
                  int(num_merges), progress, table)


# --- encoding ---------------------------------------------------------------------
@njit(**_JIT)
def _rank_table(merges, base, size):
    keys = np.full(size, -1, np.int64)
    ranks = np.empty(size, np.int32)
    for r in range(merges.shape[0]):
        key = np.int64(merges[r, 0]) * base + merges[r, 1]
        h = _slot(keys, key)
        if keys[h] == -1:                                   # keep the first (lowest) rank
            keys[h] = key
            ranks[h] = r
    return keys, ranks


@njit(**_JIT)
def _rank(keys, ranks, base, a, b):
    h = _slot(keys, np.int64(a) * base + b)
    return ranks[h] if keys[h] != -1 else 2147483647


@njit(**_JIT)
def _encode(data, spans, byte_ids, merge_ids, keys, ranks, base):
    out = np.empty(data.shape[0], np.int32)
    buf = np.empty(256, np.int32)
    rk = np.empty(256, np.int32)
    n = 0
    for c in range(spans.shape[0]):
        s, e = spans[c, 0], spans[c, 1]
        L = e - s
        if L > buf.shape[0]:
            buf = np.empty(2 * L, np.int32)
            rk = np.empty(2 * L, np.int32)
        for i in range(L):
            buf[i] = byte_ids[data[s + i]]
        for i in range(L - 1):
            rk[i] = _rank(keys, ranks, base, buf[i], buf[i + 1])
        while L > 1:
            i, best = 0, rk[0]                               # leftmost lowest rank
            for j in range(1, L - 1):
                if rk[j] < best:
                    i, best = j, rk[j]
            if best == 2147483647:
                break
            buf[i] = merge_ids[best]
            for j in range(i + 1, L - 1):                    # drop buf[i + 1]
                buf[j] = buf[j + 1]
                rk[j] = rk[j + 1]
            L -= 1
            if i > 0:
                rk[i - 1] = _rank(keys, ranks, base, buf[i - 1], buf[i])
            if i < L - 1:
                rk[i] = _rank(keys, ranks, base, buf[i], buf[i + 1])
        for i in range(L):
            out[n + i] = buf[i]
        n += L
    return out[:n]


_RANKS: dict = {}


def bpe_encode(data, spans, byte_ids, merges, merge_ids):
    """Accelerated minillm.tokenizer.bpe_encode — see it for the math."""
    base = int(max(byte_ids.max(initial=0), merge_ids.max(initial=0))) + 1
    entry = _RANKS.get("last")                               # (merges, base, table): reuse
    if entry is None or entry[0] is not merges or entry[1] != base:
        size = _pow2_at_least(4 * merges.shape[0] + 16)
        entry = (merges, base, _rank_table(np.ascontiguousarray(merges, np.int32), base, size))
        _RANKS["last"] = entry
    keys, ranks = entry[2]
    return _encode(np.ascontiguousarray(data, np.uint8), np.ascontiguousarray(spans, np.int64),
                   np.ascontiguousarray(byte_ids, np.int32), np.ascontiguousarray(merge_ids, np.int32),
                   keys, ranks, base)


KERNELS = {
    "tokenizer.split": split,
    "tokenizer.count_chunks": count_chunks,
    "tokenizer.bpe_train": bpe_train,
    "tokenizer.bpe_encode": bpe_encode,
}
