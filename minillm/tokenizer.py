"""Byte-level BPE: text -> bytes -> ids, as GPT-2 and tiktoken do it.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare
Words with Subword Units"; byte-level variant: Radford et al. 2019, GPT-2):

1. Pre-tokenize: a regex cuts the text into chunks (words with their leading
   space, numbers, punctuation runs, whitespace). Merges never cross a chunk.
2. Every chunk is its UTF-8 bytes; the 256 byte values are the first 256 ids,
   so any text can be encoded (no unknown token).
3. Training: count every adjacent pair of ids inside the chunks (each unique
   chunk weighted by how often it occurs), merge the most frequent pair into a
   new id ``256 + i``, repeat until ``vocab_size``.
   **Tie-break**: among pairs with the same count, the lowest
   ``(left id, right id)`` pair (lexicographic) wins. Inside a chunk a merge
   replaces occurrences left to right (``"aaa"`` with ``a+a`` -> ``aa a``).
   Training stops early, with a warning, when no pair is left.
4. Encoding a chunk applies the learned merges by rank (lowest rank first,
   left to right), the way GPT-2's ``encoder.py`` and Hugging Face do; it
   gives the same ids as tiktoken for our trained tokenizers (tests check it).
5. Decoding joins the bytes of the ids; ``decode`` then reads UTF-8 with
   ``errors="replace"``; ``decode_bytes`` returns the raw bytes.

Special tokens (e.g. ``<|endoftext|>``) follow tiktoken's rules: they are only
recognised when listed in ``allowed_special``; a special token text that is in
``disallowed_special`` (default: every special not allowed) raises ValueError.

The three array kernels below (``tokenizer.split``, ``tokenizer.bpe_train``,
``tokenizer.bpe_encode``) are the reference; ``backends/numba_bpe.py`` holds
their compiled twins (same names, same results).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import regex

from .backend import kernel
from .files import atomic_write_text
from .tour import Row, TourContext, technique

# The exact pre-tokenizer regexes of tiktoken (r50k/gpt2 and cl100k/gpt4).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

FORMAT_HEADER = "minillm-bpe 1"


# --- 1. pre-tokenization --------------------------------------------------------
@kernel("tokenizer.split")
def split(text: str, pattern: str) -> np.ndarray:
    """Chunks of ``text`` under the regex ``pattern`` as UTF-8 byte spans (n, 2) int64.

    Span ``[s, e)`` indexes ``text.encode("utf-8")``. Characters no alternative
    matches are skipped (as tiktoken does); the gpt2/gpt4 patterns match all.
    """
    char_spans = np.array([m.span() for m in regex.finditer(pattern, text)],
                          dtype=np.int64).reshape(-1, 2)                 # (n, 2) in characters
    return char_spans_to_bytes(text, char_spans)


def char_spans_to_bytes(text: str, char_spans: np.ndarray) -> np.ndarray:
    """Character offsets -> UTF-8 byte offsets (n, 2) int64."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (L,)
    width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)       # (L,) UTF-8 bytes per char
    byte_at = np.concatenate([[0], np.cumsum(width)]).astype(np.int64)   # (L + 1,)
    return byte_at[char_spans]                                           # (n, 2)


# --- 2. training: full recount per merge ---------------------------------------------
@kernel("tokenizer.bpe_train")
def bpe_train(ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray,
              num_merges: int, progress: np.ndarray) -> np.ndarray:
    """Learn up to ``num_merges`` merges over unique chunks; returns merges (M, 2) int32.

    ids (N,) int32: the byte values of all unique chunks, concatenated.
    offsets (n + 1,) int64: chunk i is ``ids[offsets[i]:offsets[i + 1]]``.
    counts (n,) int64: how often chunk i occurs in the text.
    progress (1,) int64: the number of merges done is written here (progress bars).
    Merge i joins ``(left, right)`` into id ``256 + i``; the most frequent pair
    wins, ties go to the lowest ``(left, right)``. Fewer than ``num_merges``
    rows come back when no pair is left.
    """
    lengths = np.diff(offsets)                                           # (n,)
    x = ids.astype(np.int64)                                             # (N,)
    weight = np.repeat(counts, lengths).astype(np.float64)              # (N,) count of each id's chunk
    last = np.zeros(len(x), dtype=bool)                                  # (N,) id ends its chunk
    last[offsets[1:][lengths > 0] - 1] = True
    base = 256 + num_merges                                              # key = left * base + right
    merges = []
    for m in range(num_merges):
        inside = ~last[:-1]                                              # (N-1,) pair within a chunk
        keys = x[:-1][inside] * base + x[1:][inside]                     # (P,)
        if keys.size == 0:
            break
        uniq, inverse = np.unique(keys, return_inverse=True)             # sorted pair keys
        totals = np.bincount(inverse, weights=weight[:-1][inside])       # (K,) weighted counts
        left, right = divmod(int(uniq[np.argmax(totals)]), base)         # argmax: first max = lowest pair
        x, weight, last = merge_pair(x, weight, last, left, right, 256 + m)
        merges.append((left, right))
        progress[0] = m + 1
    return np.array(merges, dtype=np.int32).reshape(-1, 2)               # (M, 2)


def merge_pair(x, weight, last, left, right, new):
    """Replace every (left, right) inside a chunk by ``new``, left to right."""
    hit = np.flatnonzero((x[:-1] == left) & (x[1:] == right) & ~last[:-1])  # pair starts
    if left == right:
        hit = _left_to_right(hit)
    x, last = x.copy(), last.copy()
    x[hit] = new
    last[hit] = last[hit + 1]                  # the merged id ends a chunk if its right half did
    keep = np.ones(len(x), dtype=bool)
    keep[hit + 1] = False                      # the right halves disappear
    return x[keep], weight[keep], last[keep]


def _left_to_right(hit: np.ndarray) -> np.ndarray:
    """In runs of overlapping matches (``aaaa``: 0, 1, 2) keep every other one from the left."""
    i = np.arange(len(hit))
    starts = np.concatenate([[True], np.diff(hit) != 1])                 # a run begins
    run_start = np.maximum.accumulate(np.where(starts, i, 0))
    return hit[(i - run_start) % 2 == 0]


# --- 3. encoding: apply merges by rank ------------------------------------------
@kernel("tokenizer.bpe_encode")
def bpe_encode(data: np.ndarray, spans: np.ndarray, byte_ids: np.ndarray,
               merges: np.ndarray, merge_ids: np.ndarray) -> np.ndarray:
    """Encode each chunk ``data[s:e]`` (uint8) of ``spans`` (n, 2); returns ids (K,) int32.

    byte_ids (256,) int32: the id of each byte. merges (M, 2) int32: the pair
    merged at rank i; merge_ids (M,) int32: the id it makes.
    """
    ranks = {(int(a), int(b)): (rank, int(new))
             for rank, ((a, b), new) in enumerate(zip(merges, merge_ids))}
    byte_id = [int(i) for i in byte_ids]
    cache: dict[bytes, list[int]] = {}         # a chunk's ids do not depend on its context
    out: list[int] = []
    for s, e in spans.tolist():
        chunk = data[s:e].tobytes()
        if chunk not in cache:
            cache[chunk] = encode_chunk([byte_id[b] for b in chunk], ranks)
        out.extend(cache[chunk])
    return np.array(out, dtype=np.int32)                                 # (K,)


def encode_chunk(ids: list[int], ranks: dict) -> list[int]:
    """Merge the lowest-rank pair (all its occurrences, left to right) until none applies."""
    never = (float("inf"), -1)
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, never)[0])
        if pair not in ranks:
            break
        ids = replace_pair(ids, pair, ranks[pair][1])
    return ids


def replace_pair(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """``[a, b, a, b, c]`` with ``(a, b) -> x`` gives ``[x, x, c]``."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --- the tokenizer ------------------------------------------------------------
class BPETokenizer:
    """A byte-level BPE tokenizer: merges + pre-tokenizer pattern + special tokens.

    ``merges[i] = (left, right)`` makes id ``256 + i`` (or ``merge_ids[i]`` for
    imported vocabularies such as GPT-2's, whose byte ids are permuted).
    """

    def __init__(self, merges=(), pattern: str = "gpt2", special_tokens=None, *,
                 byte_ids=None, merge_ids=None):
        self.pattern = resolve_pattern(pattern)
        self._regex = regex.compile(self.pattern)
        merges = np.asarray(list(merges), dtype=np.int64).reshape(-1, 2)   # (M, 2)
        self._byte_ids = (np.arange(256, dtype=np.int32) if byte_ids is None
                          else np.asarray(byte_ids, dtype=np.int32))         # (256,)
        self._merge_ids = (np.arange(256, 256 + len(merges), dtype=np.int32) if merge_ids is None
                           else np.asarray(merge_ids, dtype=np.int32))       # (M,)
        self._merges = merges.astype(np.int32)                               # (M, 2)
        self.vocab = self._build_vocab()                                     # id -> bytes
        self.special_tokens = self._check_specials(special_tokens)          # text -> id
        self._special_regex = None
        self._decoder = self._build_decoder()

    # -- construction helpers
    def _build_vocab(self) -> dict[int, bytes]:
        if self._byte_ids.shape != (256,) or len(set(self._byte_ids.tolist())) != 256:
            raise ValueError("byte_ids must hold 256 distinct ids, one per byte value")
        if self._merge_ids.shape != (len(self._merges),):
            raise ValueError(f"merge_ids has {self._merge_ids.size} ids for {len(self._merges)} merges")
        vocab = {int(i): bytes([b]) for b, i in enumerate(self._byte_ids)}
        for rank, ((a, b), new) in enumerate(zip(self._merges.tolist(), self._merge_ids.tolist())):
            if a not in vocab or b not in vocab:
                raise ValueError(f"merge {rank} = ({a}, {b}) uses an id not defined before it")
            if new in vocab or new < 0:
                raise ValueError(f"merge {rank} = ({a}, {b}) makes id {new}, which is already taken")
            vocab[new] = vocab[a] + vocab[b]
        return vocab

    def _check_specials(self, special_tokens) -> dict[str, int]:
        if special_tokens is None:
            return {}
        if not isinstance(special_tokens, dict):       # a list: ids follow the merges
            first = max(self.vocab) + 1
            special_tokens = {t: first + i for i, t in enumerate(special_tokens)}
        seen = set(self.vocab)
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty string")
            if not isinstance(i, (int, np.integer)) or i < 0 or int(i) in seen:
                raise ValueError(f"special token {text!r} has id {i!r}, which is taken or not an int >= 0")
            seen.add(int(i))
        return {t: int(i) for t, i in special_tokens.items()}

    def _build_decoder(self) -> list:
        table = [None] * self.vocab_size
        for i, b in self.vocab.items():
            table[i] = b
        for t, i in self.special_tokens.items():
            table[i] = t.encode("utf-8")
        return table

    # -- properties
    @property
    def merges(self) -> list[tuple[int, int]]:
        return [tuple(p) for p in self._merges.tolist()]

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (largest id + 1)."""
        return 1 + max([*self.vocab, *self.special_tokens.values()])

    def __repr__(self) -> str:
        name = {v: k for k, v in PATTERNS.items()}.get(self.pattern, "custom")
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"pattern={name!r}, special_tokens={len(self.special_tokens)})")

    # -- training
    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = "gpt2",
              special_tokens=None, progress: bool = False) -> "BPETokenizer":
        """Learn merges on ``text`` until ``vocab_size`` ids (specials included)."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"text must be a non-empty str, got {type(text).__name__} "
                             f"of length {len(text) if hasattr(text, '__len__') else '?'}")
        n_special = len(special_tokens or ())
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 256 + "
                             f"{n_special} special tokens = {256 + n_special}")
        pattern = resolve_pattern(pattern)
        ids, offsets, counts = unique_chunks(text, pattern, list(special_tokens or ()))
        num_merges = int(vocab_size) - 256 - n_special
        merges = _train_with_progress(ids, offsets, counts, num_merges, progress)
        if len(merges) < num_merges:
            warnings.warn(f"vocab_size={vocab_size} is not reachable on this text: no pair "
                          f"left after {len(merges)} merges; vocab_size is "
                          f"{256 + len(merges) + n_special}", stacklevel=2)
        if isinstance(special_tokens, dict) and len(merges) < num_merges:
            special_tokens = list(sorted(special_tokens, key=special_tokens.get))
        return cls(merges, pattern, special_tokens)

    # -- encoding
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` ignoring special tokens (their text is encoded as ordinary text)."""
        return self._encode_array(_as_text(text, "text")).tolist()

    def _encode_array(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)       # (nbytes,)
        spans = split(text, self.pattern)                                # (n, 2)
        return bpe_encode(data, spans, self._byte_ids, self._merges, self._merge_ids)

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Encode ``text``; special tokens follow tiktoken's allowed/disallowed rules."""
        text = _as_text(text, "text")
        allowed = self._special_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed:
            found = regex.search("|".join(map(regex.escape, sorted(disallowed, key=len, reverse=True))), text)
            if found:
                raise ValueError(
                    f"text contains the special token {found.group()!r} at character {found.start()}, "
                    f"which is not allowed; pass allowed_special={{{found.group()!r}}} (or 'all') to "
                    f"encode it as a special token, or disallowed_special=() to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        pieces = regex.split("(" + "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True)))
                             + ")", text)
        out: list[int] = []
        for k, piece in enumerate(pieces):     # odd pieces are the special tokens themselves
            out.extend([self.special_tokens[piece]] if k % 2 else self.encode_ordinary(piece))
        return out

    def _special_set(self, value, name) -> set:
        if value == "all":
            return set(self.special_tokens)
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name}={value!r} must be 'all' or a set of special token strings")
        value = set(value)
        unknown = value - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{name} names {sorted(unknown)}, which are not special tokens of "
                             f"this tokenizer ({sorted(self.special_tokens)})")
        return value

    def encode_batch(self, texts, num_threads: int | None = None, **kwargs) -> list[list[int]]:
        """Encode many texts on ``num_threads`` threads (default: all cores).

        The compiled kernels release the GIL, so threads run in parallel on the
        numba backend; the reference runs them one at a time.
        """
        texts = list(texts)
        n = (os.cpu_count() or 1) if num_threads is None else num_threads
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_threads={num_threads!r} must be an int >= 1 or None")
        if n == 1 or len(texts) < 2:
            return [self.encode(t, **kwargs) for t in texts]
        with ThreadPoolExecutor(max_workers=int(n)) as pool:
            return list(pool.map(lambda t: self.encode(t, **kwargs), texts))

    # -- decoding
    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of ``ids`` (special tokens give their UTF-8 text)."""
        table, ids = self._decoder, _as_id_list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not 0 <= i < len(table) or table[i] is None)
            raise ValueError(f"id {bad} is not in the vocabulary (ids run 0..{len(table) - 1}"
                             f"{' with holes' if None in table else ''})") from None

    def decode(self, ids) -> str:
        """UTF-8 text of ``ids``; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one id."""
        return self.decode_bytes([i])

    # -- save / load (minillm's text format)
    def save(self, path) -> None:
        """Write the tokenizer to ``path`` (text) and a vocab listing to ``path + '.vocab'``."""
        path = Path(path)
        atomic_write_text(path, self._format())
        atomic_write_text(Path(str(path) + ".vocab"), self._vocab_listing())

    def _format(self) -> str:
        identity = np.array_equal(self._byte_ids, np.arange(256))
        lines = [FORMAT_HEADER,
                 "pattern " + json.dumps(self.pattern),
                 "bytes identity" if identity else "bytes " + " ".join(map(str, self._byte_ids.tolist())),
                 f"special {len(self.special_tokens)}"]
        lines += [f"{json.dumps(t)} {i}" for t, i in self.special_tokens.items()]
        lines.append(f"merges {len(self._merges)}")
        lines += [f"{a} {b} {n}" for (a, b), n in zip(self._merges.tolist(), self._merge_ids.tolist())]
        return "\n".join(lines) + "\n"

    def _vocab_listing(self) -> str:
        """One line per id: ``id <tab> token text`` and, for merges, the two parts."""
        parts = {n: (a, b) for (a, b), n in zip(self._merges.tolist(), self._merge_ids.tolist())}
        lines = ["# id\ttoken\t[left][right]  (not needed by load; bytes shown as text, "
                 "invalid UTF-8 as \\x..)"]
        for i in sorted(self.vocab):
            line = f"{i}\t{render_token(self.vocab[i])}"
            if i in parts:
                a, b = parts[i]
                line += f"\t[{render_token(self.vocab[a])}][{render_token(self.vocab[b])}]"
            lines.append(line)
        lines += [f"{i}\t{t}\tspecial" for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])]
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        """Read a file written by ``save``; a malformed file -> ValueError with the line."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from None
        return _parse(lines, str(path), cls)

    # -- other formats
    def to_tiktoken(self, name: str = "minillm"):
        """A ``tiktoken.Encoding`` with the same ids (tiktoken must be installed)."""
        try:
            import tiktoken
        except ImportError:
            raise ImportError("to_tiktoken needs the tiktoken package: pip install tiktoken") from None
        ranks = {self.vocab[i]: i for i in self.vocab}
        if not (np.all(np.diff(self._merge_ids) > 0) and self._byte_ids.max() < self._merge_ids.min(initial=1 << 30)):
            raise ValueError("to_tiktoken needs ids that grow with the merge rank (tiktoken ranks by id)")
        return tiktoken.Encoding(name=name, pat_str=self.pattern, mergeable_ranks=ranks,
                                 special_tokens=dict(self.special_tokens))

    def save_hf(self, directory) -> None:
        """Write GPT-2's ``vocab.json`` + ``merges.txt``, and ``tokenizer.json`` (our pattern).

        ``vocab.json``/``merges.txt`` spell bytes with GPT-2's byte-to-unicode
        table; loaders that take only those two files use GPT-2's own regex, so
        a "gpt4"/custom pattern needs ``tokenizer.json`` (the ``tokenizers`` library).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        b2u = bytes_to_unicode()
        spell = {i: "".join(b2u[c] for c in b) for i, b in self.vocab.items()}
        vocab = {spell[i]: i for i in sorted(spell)}
        vocab.update(self.special_tokens)
        merges = [f"{spell[a]} {spell[b]}" for a, b in self._merges.tolist()]
        atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=0))
        atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        atomic_write_text(directory / "tokenizer.json", json.dumps(
            _hf_tokenizer_json(self.pattern, vocab, merges, self.special_tokens), ensure_ascii=False))
        eos = next(iter(self.special_tokens), None)
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
             "model_max_length": 1024, **({"bos_token": eos, "eos_token": eos, "unk_token": eos} if eos else {})},
            indent=1))

    @classmethod
    def from_hf(cls, directory, pattern: str | None = None) -> "BPETokenizer":
        """Read GPT-2 style ``vocab.json`` + ``merges.txt`` from ``directory``.

        The pattern comes from ``pattern``, else from ``tokenizer.json``'s Split
        pre-tokenizer if there is one, else GPT-2's. Vocabulary entries that are
        neither a byte nor a merge result become special tokens (``<|endoftext|>``).
        """
        directory = Path(directory)
        vocab = _read_hf_vocab(directory / "vocab.json")
        pairs = _read_hf_merges(directory / "merges.txt")
        b2u = bytes_to_unicode()
        missing = [bytes([b]) for b in range(256) if b2u[b] not in vocab]
        if missing:
            raise ValueError(f"{directory / 'vocab.json'}: no id for the byte tokens {missing[:5]}")
        byte_ids = [vocab[b2u[b]] for b in range(256)]
        merges, merge_ids = [], []
        for line_no, (a, b) in pairs:
            for part in (a, b, a + b):
                if part not in vocab:
                    raise ValueError(f"{directory / 'merges.txt'}:{line_no}: token {part!r} is not in vocab.json")
            merges.append((vocab[a], vocab[b]))
            merge_ids.append(vocab[a + b])
        known = set(byte_ids) | set(merge_ids)
        special = {t: i for t, i in vocab.items() if i not in known}
        if pattern is None:
            pattern = _hf_pattern(directory / "tokenizer.json") or "gpt2"
        return cls(merges, pattern, special, byte_ids=byte_ids, merge_ids=merge_ids)


# --- helpers ------------------------------------------------------------------
def resolve_pattern(pattern: str) -> str:
    """``"gpt2"`` / ``"gpt4"`` -> the regex; any other string must be a valid regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern={pattern!r} must be 'gpt2', 'gpt4' or a non-empty regex string")
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"pattern={pattern!r} is not a valid regex: {exc}") from None
    return pattern


def unique_chunks(text: str, pattern: str, specials=()):
    """Pre-tokenize ``text`` and count each distinct chunk: (ids, offsets, counts) arrays.

    Special-token strings are cut out first so that no merge learns them.
    """
    pieces = regex.split("|".join(map(regex.escape, specials)), text) if specials else [text]
    text = "".join(pieces)                     # the ordinary text; chunks never cross a cut:
    cuts = np.cumsum([len(p.encode("utf-8")) for p in pieces])
    spans = np.concatenate([split(p, pattern) + start for p, start in zip(pieces, [0, *cuts[:-1]])])
    return count_chunks(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), spans.reshape(-1, 2))


@kernel("tokenizer.count_chunks")
def count_chunks(data: np.ndarray, spans: np.ndarray):
    """Distinct chunks ``data[s:e]`` in order of first occurrence, with their counts.

    Returns ids (N,) int32 (the chunks' bytes, concatenated), offsets (n + 1,)
    int64 and counts (n,) int64 — the input of ``bpe_train``.
    """
    counter: Counter = Counter()               # dicts keep first-occurrence order
    raw = data.tobytes()
    counter.update(raw[s:e] for s, e in spans.tolist())
    offsets = np.zeros(len(counter) + 1, dtype=np.int64)                 # (n + 1,)
    offsets[1:] = np.cumsum([len(c) for c in counter])
    ids = np.frombuffer(b"".join(counter), dtype=np.uint8).astype(np.int32)  # (N,)
    counts = np.fromiter(counter.values(), dtype=np.int64, count=len(counter))  # (n,)
    return ids, offsets, counts


def _train_with_progress(ids, offsets, counts, num_merges, progress):
    """Run ``bpe_train``; with ``progress`` a tqdm bar follows the merges from this thread."""
    done = np.zeros(1, dtype=np.int64)
    if not progress or num_merges == 0:
        return bpe_train(ids, offsets, counts, num_merges, done)
    from tqdm.auto import tqdm
    result = {}

    def work():
        try:
            result["merges"] = bpe_train(ids, offsets, counts, num_merges, done)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    with tqdm(total=num_merges, desc="BPE merges", unit="merge") as bar:
        while worker.is_alive():
            worker.join(0.1)
            bar.update(int(done[0]) - bar.n)
        bar.update(int(done[0]) - bar.n)
    if "error" in result:
        raise result["error"]
    return result["merges"]


def _as_text(text, name: str) -> str:
    """str passes; bytes must be valid UTF-8; lone surrogates become U+FFFD (as tiktoken)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is bytes that are not valid UTF-8: {exc.reason} at byte "
                             f"{exc.start}") from None
    if not isinstance(text, str):
        raise ValueError(f"{name} must be str (or UTF-8 bytes), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).ravel().tolist()
    return [int(i) for i in ids]


def render_token(b: bytes) -> str:
    """Token bytes as readable text: UTF-8 where valid, control chars and bad bytes escaped."""
    text = b.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for
    themselves, the others are shifted to code points 256+ (so ``" "`` -> ``"Ġ"``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _hf_tokenizer_json(pattern, vocab, merges, special) -> dict:
    """A ``tokenizers`` tokenizer.json: Split(our regex) + ByteLevel, BPE model, ByteLevel decoder."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in special.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": to_oniguruma(pattern)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def to_oniguruma(pattern: str) -> str:
    """``pattern`` as HF ``tokenizers`` (Oniguruma) reads it with the same meaning.

    In Python's ``regex`` (and tiktoken's) ``X{1,3}+`` is *possessive*; Oniguruma
    reads it as ``(?:X{1,3})+``, so gpt4's ``\\p{N}{1,3}+`` would take "1111" as one
    piece there. Dropping the ``+`` gives the same matches in our patterns, where
    such a counted repeat ends its alternative (nothing after it could backtrack in).
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _read_hf_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist (from_hf needs vocab.json + merges.txt)")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in vocab.items()):
        raise ValueError(f"{path}: must be a JSON object {{token string: id >= 0}}")
    return vocab


def _read_hf_merges(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist (from_hf needs vocab.json + merges.txt)")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if (n == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}:{n}: expected two tokens separated by one space, got {line[:60]!r}")
        pairs.append((n, tuple(parts)))
    return pairs


def _hf_pattern(path: Path) -> str | None:
    """The Split regex of a tokenizer.json's pre-tokenizer, if any."""
    if not path.is_file():
        return None
    try:
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from None
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            found = p["pattern"]["Regex"]
            known = [q for q in PATTERNS.values() if to_oniguruma(q) == found]
            return known[0] if known else found
    return None


def _parse(lines: list[str], where: str, cls):
    """Parse the ``save`` format; every error names the line."""
    pos = [0]

    def take(prefix: str) -> str:
        n = pos[0]
        if n >= len(lines):
            raise ValueError(f"{where}:{n + 1}: file ends early, expected '{prefix} ...'")
        line = lines[n]
        if not line.startswith(prefix):
            raise ValueError(f"{where}:{n + 1}: expected a line starting with {prefix!r}, got {line[:60]!r}")
        pos[0] += 1
        return line[len(prefix):]

    def ints(text: str, count: int, what: str) -> list[int]:
        parts = text.split()
        if len(parts) != count or not all(p.isdigit() for p in parts):
            raise ValueError(f"{where}:{pos[0]}: expected {count} non-negative ints ({what}), got {text[:60]!r}")
        return [int(p) for p in parts]

    take(FORMAT_HEADER)
    try:
        pattern = json.loads(take("pattern "))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}:{pos[0]}: pattern is not a JSON string ({exc})") from None
    byte_text = take("bytes ")
    byte_ids = None if byte_text == "identity" else ints(byte_text, 256, "byte ids")
    special = {}
    for _ in range(ints(take("special "), 1, "special count")[0]):
        line = take("")
        text, _, i = line.rpartition(" ")
        try:
            special[json.loads(text)] = ints(i, 1, "special id")[0]
        except json.JSONDecodeError:
            raise ValueError(f"{where}:{pos[0]}: expected '\"<token>\" <id>', got {line[:60]!r}") from None
    merges, merge_ids = [], []
    first_merge_line = pos[0] + 2
    for _ in range(ints(take("merges "), 1, "merge count")[0]):
        a, b, n = ints(take(""), 3, "left right new")
        merges.append((a, b))
        merge_ids.append(n)
    if pos[0] != len(lines):
        raise ValueError(f"{where}:{pos[0] + 1}: unexpected extra line {lines[pos[0]][:60]!r}")
    try:
        return cls(merges, pattern, special, byte_ids=byte_ids, merge_ids=merge_ids)
    except ValueError as exc:
        bad = regex.match(r"merge (\d+) ", str(exc))
        line = f":{first_merge_line + int(bad.group(1))}" if bad else ""
        raise ValueError(f"{where}{line}: inconsistent tokenizer: {exc}") from None


# --- the tour row ----------------------------------------------------------------
@technique("tokenizer", order=1)
def tokenizer_row(ctx: TourContext) -> Row:
    """The tour's BPE tokenizer vs the byte-level baseline (vocab 256, no merges):
    encode throughput (MB/s, median of 3 on the active backend) and compression
    (bytes per token) on the corpus; the model is the baseline's, unchanged."""
    from . import backend
    text = ctx.text[:200_000] if ctx.quick else ctx.text[:2_000_000]
    nbytes = len(text.encode("utf-8"))

    def measure(tok):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            n = len(tok.encode(text, disallowed_special=()))
            times.append(time.perf_counter() - t0)
        return nbytes / float(np.median(times)) / 1e6, nbytes / n
    bpe_mb_s, bpe_bpt = measure(ctx.tokenizer)
    byte_mb_s, byte_bpt = measure(BPETokenizer([], ctx.tokenizer.pattern))
    model = ctx.model
    return Row("tokenizer", model.num_params(), model.nbytes(), None, None, None,
               f"BPE V={ctx.tokenizer.vocab_size}: {bpe_bpt:.2f} bytes/token vs {byte_bpt:.2f} "
               f"byte-level ({bpe_bpt / byte_bpt:.2f}x shorter sequences); encode {bpe_mb_s:.1f} MB/s "
               f"vs {byte_mb_s:.1f} MB/s ({backend.current()})",
               {"bpe_vocab": ctx.tokenizer.vocab_size, "bpe_bytes_per_token": bpe_bpt,
                "byte_bytes_per_token": byte_bpt, "bpe_encode_mb_s": bpe_mb_s,
                "byte_encode_mb_s": byte_mb_s, "measured_bytes": nbytes,
                "backend": backend.current()})
