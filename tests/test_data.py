"""minillm.data: the embedded corpus, the split and the batches."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import data


class ByteTokenizer:
    """Stand-in tokenizer for these tests: UTF-8 bytes are the ids."""

    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))


# --- corpus -----------------------------------------------------------------------
def test_corpus_is_the_pinned_file():
    raw = data.CORPUS_PATH.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == data.CORPUS_SHA256
    assert data.corpus_sha256() == data.CORPUS_SHA256
    assert 1_000_000 <= len(raw) <= 5_000_000          # the issue asks for 1-5 MB
    assert (data.CORPUS_PATH.parent / "PROVENANCE.md").is_file()


def test_load_corpus_reads_the_text():
    text = data.load_corpus()
    assert text.lstrip().startswith("Genesis 1")
    assert text.rstrip().endswith("Amen.")
    assert "In the beginning God created the heaven and the earth." in text
    assert len(text) == len(data.CORPUS_PATH.read_bytes())  # plain ASCII


def test_load_corpus_other_path(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("héllo\n", encoding="utf-8")
    assert data.load_corpus(f) == "héllo\n"


def test_missing_corpus_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        data.load_corpus(missing)


def test_non_utf8_corpus_refused(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_corpus(f)


def test_encode_corpus_int32():
    ids = data.encode_corpus(ByteTokenizer(), "abc é")
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == list("abc é".encode())


def test_encode_corpus_checks_ids_against_vocab():
    class Bad(ByteTokenizer):
        vocab_size = 100

    with pytest.raises(ValueError, match="vocab_size=100"):
        data.encode_corpus(Bad(), "zzz")          # 'z' = 122 >= 100


# --- split ------------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(n=st.integers(2, 500), frac=st.floats(0.01, 0.99))
def test_split_is_contiguous_and_complete(n, frac):
    ids = np.arange(n, dtype=np.int32)
    n_val = round(n * frac)
    if n_val < 1 or n_val >= n:
        with pytest.raises(ValueError, match="val_fraction"):
            data.split(ids, frac)
        return
    tr, va = data.split(ids, frac)
    assert np.array_equal(np.concatenate([tr, va]), ids)
    assert len(va) == n_val


@pytest.mark.parametrize("frac", [0, 1, -0.1, 1.5, "0.1", True])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(np.arange(100), frac)


def test_split_rejects_non_integer_ids():
    with pytest.raises(ValueError, match="ids must be a 1-D integer"):
        data.split(np.zeros(10, dtype=np.float32))


# --- batches ----------------------------------------------------------------------
@settings(deadline=None, max_examples=40)
@given(n=st.integers(2, 300), B=st.integers(1, 6), T=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_batch_shapes_and_shift(n, B, T, seed):
    d = np.random.default_rng(seed).integers(0, 1000, size=n).astype(np.int64)
    rng = np.random.default_rng(seed)
    if T >= n:
        with pytest.raises(ValueError, match="seq_len"):
            data.get_batch(d, B, T, rng)
        return
    x, y = data.get_batch(d, B, T, rng)
    assert x.shape == y.shape == (B, T)
    assert x.dtype == y.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])            # y is x shifted by one
    # every row is a window of the data: find its start and compare
    for row_x, row_y in zip(x, y):
        window = np.concatenate([row_x, row_y[-1:]])
        starts = [s for s in range(n - T) if np.array_equal(d[s:s + T + 1], window)]
        assert starts, "row is not a window of consecutive data ids"


def test_batch_reaches_the_last_window():
    d = np.arange(6, dtype=np.int32)
    rng = np.random.default_rng(0)
    x, y = data.get_batch(d, 200, 5, rng)                 # only one window fits
    assert (x == d[:5]).all() and (y == d[1:]).all()


def test_batch_is_reproducible_from_seed():
    d = np.arange(1000, dtype=np.int32)
    a = data.get_batch(d, 4, 16, np.random.default_rng(7))
    b = data.get_batch(d, 4, 16, np.random.default_rng(7))
    c = data.get_batch(d, 4, 16, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 100}, "seq_len=100 must be < len"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"rng": 0}, "rng"),
])
def test_batch_bad_args(kwargs, match):
    args = {"data": np.arange(100), "batch_size": 2, "seq_len": 8,
            "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        data.get_batch(**args)
