"""minillm.tokenizer: byte-level BPE reference, its numba twins, formats and bad input.

Peers (tiktoken, tokenizers, transformers) are in test_tokenizer_peers.py.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import backend
from minillm import tokenizer as T
from minillm.data import load_corpus

BACKENDS = ["numpy"] + (["numba"] if backend.available()["numba"][0] else [])
FAST = dict(deadline=None, max_examples=25)

# Text that exercises every branch of the gpt2/gpt4 regexes: contractions in any
# case (and the long s, which (?i) folds to s), runs of spaces/digits, \r\n,
# tabs, punctuation, emoji, CJK, combining marks, non-breaking space.
TRICKY = list("aAsSdDmMtTlLvVeErR'’ \t\r\n\x0b\x0c\u00a0\u3000123456789,.!?-_()[]{}\"") + [
    "ſ", "é", "e\u0301", "ß", "Ω", "ж", "中", "文", "字", "😀", "👍🏽", "\u200d", "١", "²", "Ⅻ", "\U0001d400"]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=40).map("".join)
any_text = st.one_of(tricky_text, st.text(max_size=40))


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()[:60_000]


@pytest.fixture(scope="module")
def tok(corpus):
    """A small tokenizer trained on a corpus slice plus some unicode (reference backend)."""
    text = corpus + " naïve café 中文字 😀😀 don't WE'LL ſ 1234567 \r\n\r\n  x" * 20
    with backend.use("numpy"):
        return mm.BPETokenizer.train(text, 400, special_tokens=["<|endoftext|>"])


# --- worked examples ------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_aaabdaaabac_golden(name):
    """The classic example (Wikipedia's BPE): aa -> Z, ab -> Y, ZY -> X."""
    with backend.use(name):
        t = mm.BPETokenizer.train("aaabdaaabac", 256 + 3)
        assert t.merges == [(97, 97), (97, 98), (256, 257)]
        assert t.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
        assert t.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"


@pytest.mark.parametrize("name", BACKENDS)
def test_ties_go_to_the_lowest_pair(name):
    # chunks "ab", " cd": pairs (a,b), (' ',c), (c,d) all occur once -> (32, 99) first
    with backend.use(name):
        t = mm.BPETokenizer.train("ab cd", 256 + 3)
    assert t.merges == [(32, 99), (97, 98), (256, 100)]


@pytest.mark.parametrize("name", BACKENDS)
def test_overlapping_pairs_merge_left_to_right(name):
    with backend.use(name):
        t = mm.BPETokenizer.train("aaaaa", 256 + 2)
        # a a a a a -> aa aa a (not a aa aa); then (aa,aa) and (aa,a) tie -> (256, 97)
        assert t.merges == [(97, 97), (256, 97)]
        assert t.encode("aaaaa") == [256, 257]
        assert t.encode("aaaa") == [256, 256]
        assert t.encode("aaa") == [257]


def test_vocab_256_is_pure_bytes():
    t = mm.BPETokenizer.train("hello world", 256)
    assert t.merges == [] and t.vocab_size == 256
    s = "héllo 😀"
    assert t.encode(s) == list(s.encode("utf-8"))


def test_split_gpt2_and_gpt4_examples():
    text = "Hello's  world\r\n 12345 don'T ?!x"
    chunks = lambda p: [text.encode()[s:e].decode() for s, e in T.split(text, T.PATTERNS[p]).tolist()]
    assert chunks("gpt2") == ["Hello", "'s", " ", " world", "\r\n", " 12345", " don", "'", "T", " ?!", "x"]
    assert chunks("gpt4") == ["Hello", "'s", " ", " world", "\r\n", " ", "123", "45", " don", "'T", " ?!", "x"]


# --- reference == numba twin ------------------------------------------------------
needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend unavailable")


def test_twin_constants_match():
    from backends import numba_bpe
    assert numba_bpe.GPT2_PATTERN == T.GPT2_PATTERN and numba_bpe.GPT4_PATTERN == T.GPT4_PATTERN


@needs_numba
@settings(**FAST)
@given(text=any_text, pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_split_twin_equals_reference(text, pattern):
    p = T.PATTERNS[pattern]
    ref = backend.reference("tokenizer.split")(text, p)
    got = backend.twin("numba", "tokenizer.split")(text, p)
    np.testing.assert_array_equal(got, ref)


@needs_numba
def test_split_twin_custom_pattern_uses_regex():
    got = backend.twin("numba", "tokenizer.split")("ab12 cd", r"\d+|[a-z]+")
    np.testing.assert_array_equal(got, [[0, 2], [2, 4], [5, 7]])


@needs_numba
@settings(**FAST)
@given(text=st.lists(st.sampled_from(["ab", "aa", "a", "b", " ", "ba", "aaa", "é", "😀", "\n"]),
                     min_size=1, max_size=60).map("".join),
       extra=st.integers(0, 40), pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_train_and_encode_twins_equal_reference(text, extra, pattern):
    ids, offsets, counts = T.unique_chunks(text, T.PATTERNS[pattern])
    ref_counts = backend.reference("tokenizer.count_chunks")
    got = backend.twin("numba", "tokenizer.count_chunks")
    spans = T.split(text, T.PATTERNS[pattern])
    data = np.frombuffer(text.encode(), np.uint8)
    for a, b in zip(got(data, spans), ref_counts(data, spans)):
        np.testing.assert_array_equal(a, b)
    args = (ids, offsets, counts, extra, np.zeros(1, np.int64))
    merges = backend.reference("tokenizer.bpe_train")(*args)
    np.testing.assert_array_equal(backend.twin("numba", "tokenizer.bpe_train")(*args), merges)
    t = mm.BPETokenizer(merges, pattern)
    enc = (data, spans, t._byte_ids, t._merges, t._merge_ids)
    np.testing.assert_array_equal(backend.twin("numba", "tokenizer.bpe_encode")(*enc),
                                  backend.reference("tokenizer.bpe_encode")(*enc))


@needs_numba
def test_corpus_slice_same_merges_and_ids(corpus, tok):
    text = corpus + " naïve café 中文字 😀😀 don't WE'LL ſ 1234567 \r\n\r\n  x" * 20
    with backend.use("numba"):
        fast = mm.BPETokenizer.train(text, 400, special_tokens=["<|endoftext|>"])
        assert fast.merges == tok.merges
        ids = fast.encode(corpus)
    assert ids == tok.encode(corpus)


@needs_numba
@settings(**FAST)
@given(text=any_text)
def test_encode_twin_equals_reference_on_unicode(tok, text):
    ref = tok.encode_ordinary(text)
    with backend.use("numba"):
        assert tok.encode_ordinary(text) == ref


# --- round trips and specials -----------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@settings(**FAST)
@given(text=any_text)
def test_decode_encode_roundtrip(tok, name, text):
    with backend.use(name):
        ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_decode_replaces_bad_utf8_and_rejects_unknown_ids(tok):
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"          # half of a 3-byte character
    assert tok.decode_bytes([0xE4, 0xB8]) == b"\xe4\xb8"
    with pytest.raises(ValueError, match="id 400 is not in the vocabulary"):
        tok.decode([1, 400])
    with pytest.raises(ValueError, match="id -1"):
        tok.decode([-1])


def test_special_tokens_follow_tiktoken_rules(tok):
    eot = tok.special_tokens["<|endoftext|>"]
    assert eot == 399 and tok.vocab_size == 400
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match="not allowed"):
        tok.encode(text)
    assert tok.encode(text, allowed_special="all") == tok.encode("a") + [eot] + tok.encode("b")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == tok.encode(text, allowed_special="all")
    as_text = tok.encode(text, disallowed_special=())
    assert eot not in as_text and tok.decode(as_text) == text
    assert tok.decode([eot]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("x", allowed_special="<|endoftext|>")


def test_special_tokens_are_not_learned():
    text = "<|endoftext|>" * 50 + "ab ab"
    t = mm.BPETokenizer.train(text, 256 + 3, special_tokens={"<|endoftext|>": 258})
    assert t.merges == [(97, 98), (32, 256)] or len(t.merges) <= 2
    assert all(t.vocab[256 + i] in (b"ab", b" ab") for i in range(len(t.merges)))


@pytest.mark.parametrize("name", BACKENDS)
def test_encode_batch_equals_encode(tok, corpus, name):
    texts = [corpus[i:i + 3000] for i in range(0, 30_000, 3000)] + ["", "<|endoftext|>x"]
    with backend.use(name):
        want = [tok.encode(t, disallowed_special=()) for t in texts]
        assert tok.encode_batch(texts, num_threads=2, disallowed_special=()) == want
        assert tok.encode_batch(texts, num_threads=1, disallowed_special=()) == want
    with pytest.raises(ValueError, match="num_threads"):
        tok.encode_batch(texts, num_threads=0)


def test_train_progress_bar(capsys):
    mm.BPETokenizer.train("hello hello world " * 20, 262, progress=True)
    assert "BPE merges" in capsys.readouterr().err


# --- bad input ------------------------------------------------------------------
def test_bad_training_arguments():
    with pytest.raises(ValueError, match="vocab_size=255"):
        mm.BPETokenizer.train("abc", 255)
    with pytest.raises(ValueError, match=r"vocab_size=256 .*1 special"):
        mm.BPETokenizer.train("abc", 256, special_tokens=["<|x|>"])
    with pytest.raises(ValueError, match="vocab_size=300.0"):
        mm.BPETokenizer.train("abc", 300.0)
    with pytest.raises(ValueError, match="non-empty str"):
        mm.BPETokenizer.train("", 300)
    with pytest.raises(ValueError, match="pattern="):
        mm.BPETokenizer.train("abc", 300, pattern="(unclosed")


@pytest.mark.parametrize("name", BACKENDS)
def test_unreachable_vocab_warns_and_stops(name):
    with backend.use(name), pytest.warns(UserWarning, match="not reachable.*after 2 merges"):
        t = mm.BPETokenizer.train("abc", 1000, special_tokens=["<|e|>"])
    assert t.merges == [(97, 98), (256, 99)]
    assert t.vocab_size == 259 and t.special_tokens == {"<|e|>": 258}


def test_encode_input_checks(tok):
    assert tok.encode("héllo".encode("utf-8")) == tok.encode("héllo")
    with pytest.raises(ValueError, match="not valid UTF-8.*byte 1"):
        tok.encode(b"a\xff")
    with pytest.raises(ValueError, match="must be str"):
        tok.encode(123)
    # a lone surrogate cannot be UTF-8: it becomes U+FFFD, as tiktoken does
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_constructor_rejects_inconsistent_merges():
    with pytest.raises(ValueError, match="merge 0 = \\(97, 300\\)"):
        mm.BPETokenizer([(97, 300)])
    with pytest.raises(ValueError, match="special token .* has id 97"):
        mm.BPETokenizer([], special_tokens={"<|x|>": 97})


# --- save / load ---------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", r"\w+|\s+|[^\w\s]+"])
def test_save_load_roundtrip(tmp_path, corpus, pattern):
    t = mm.BPETokenizer.train(corpus[:20_000], 300, pattern=pattern, special_tokens=["<|endoftext|>"])
    path = tmp_path / "tok.bpe"
    t.save(path)
    back = mm.BPETokenizer.load(path)
    assert (back.merges, back.pattern, back.special_tokens) == (t.merges, t.pattern, t.special_tokens)
    assert back.encode(corpus[:5000]) == t.encode(corpus[:5000])
    listing = (tmp_path / "tok.bpe.vocab").read_text(encoding="utf-8").splitlines()
    assert len(listing) == 1 + t.vocab_size and listing[-1].endswith("special")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.bpe", "tok.bpe.vocab"]  # no temp files


def _saved_lines(tmp_path):
    t = mm.BPETokenizer.train("hello hello world", 260, special_tokens=["<|e|>"])
    path = tmp_path / "t.bpe"
    t.save(path)
    return path, path.read_text().splitlines()


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ["gpt-bpe 9"] + ls[1:], r":1: expected a line starting with 'minillm-bpe 1'"),
    (lambda ls: ls[:1] + ["pattern [oops"] + ls[2:], r":2: pattern is not a JSON string"),
    (lambda ls: ls[:2] + ["bytes 1 2 3"] + ls[3:], r":3: expected 256 non-negative ints"),
    (lambda ls: ls[:-1], r":\d+: file ends early"),
    (lambda ls: ls[:-1] + ["104 x 259"], r":\d+: expected 3 non-negative ints"),
    (lambda ls: ls + ["extra"], r":\d+: unexpected extra line"),
    (lambda ls: ls[:-1] + ["104 999 259"], r"t.bpe:9: inconsistent tokenizer: merge 2 = \(104, 999\)"),
])
def test_load_rejects_malformed_files(tmp_path, edit, message):
    path, lines = _saved_lines(tmp_path)
    path.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(ValueError, match=message):
        mm.BPETokenizer.load(path)


def test_load_missing_or_binary_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        mm.BPETokenizer.load(tmp_path / "nope.bpe")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        mm.BPETokenizer.load(tmp_path / "bin")


# --- Hugging Face files (no peers needed: we read what we write) ------------------------
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_save_hf_from_hf_roundtrip(tmp_path, tok, corpus, pattern):
    t = mm.BPETokenizer(tok.merges, pattern, tok.special_tokens)
    t.save_hf(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Ġ"] == 32 and vocab["<|endoftext|>"] == 399 and len(vocab) == 400
    back = mm.BPETokenizer.from_hf(tmp_path)
    assert (back.merges, back.pattern, back.special_tokens) == (t.merges, t.pattern, t.special_tokens)
    assert back.encode(corpus[:5000]) == t.encode(corpus[:5000])


def test_from_hf_gpt2_style_permuted_byte_ids(tmp_path):
    """GPT-2's vocab.json numbers the bytes in byte-to-unicode order, not byte order."""
    b2u = T.bytes_to_unicode()
    order = sorted(range(256), key=lambda b: (b2u[b] != chr(b), b))   # printable bytes first
    vocab = {b2u[b]: i for i, b in enumerate(order)}
    merges = ["h e", "l l", "he ll", "Ġ w"]
    for k, m in enumerate(merges):
        vocab[m.replace(" ", "")] = 256 + k
    vocab["<|endoftext|>"] = 260
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    t = mm.BPETokenizer.from_hf(tmp_path)
    assert t.encode("hello w") == [258, vocab["o"], 259]
    assert t.encode("!") == [0]                         # '!' is GPT-2's id 0
    assert t.special_tokens == {"<|endoftext|>": 260}
    assert t.decode(t.encode("hello wörld<|endoftext|>", allowed_special="all")) == "hello wörld<|endoftext|>"
    # and our own format keeps the permutation
    t.save(tmp_path / "t.bpe")
    assert mm.BPETokenizer.load(tmp_path / "t.bpe").encode("hello w!") == t.encode("hello w!")


def test_from_hf_malformed(tmp_path):
    with pytest.raises(ValueError, match="vocab.json.*does not exist"):
        mm.BPETokenizer.from_hf(tmp_path)
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="JSON object"):
        mm.BPETokenizer.from_hf(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({u: i for i, u in enumerate(T.bytes_to_unicode().values())}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"merges.txt:2: token 'ab' is not in vocab.json"):
        mm.BPETokenizer.from_hf(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na  b\n")
    with pytest.raises(ValueError, match=r"merges.txt:2: expected two tokens"):
        mm.BPETokenizer.from_hf(tmp_path)


# --- CLI -----------------------------------------------------------------------------
def test_cli_train_encode_decode_info(tmp_path, capsys, monkeypatch):
    from minillm.cli import main
    src = tmp_path / "in.txt"
    src.write_text("In the beginning God created the heaven and the earth. " * 30)
    model = tmp_path / "t.bpe"
    assert main(["tokenizer", "train", "--vocab-size", "280", "--no-progress",
                 "--special", "<|endoftext|>", "-o", str(model), str(src)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "-t", str(model), str(src)]) == 0
    ids = capsys.readouterr().out.split()
    assert ids == [str(i) for i in mm.BPETokenizer.load(model).encode(src.read_text())]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(" ".join(ids))
    assert main(["tokenizer", "decode", "-t", str(model), str(ids_file)]) == 0
    assert capsys.readouterr().out == src.read_text()
    assert main(["tokenizer", "info", "-t", str(model), "--text", str(src)]) == 0
    assert "bytes/token" in capsys.readouterr().out
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("x<|endoftext|>"))
    assert main(["tokenizer", "encode", "-t", str(model)]) == 2
    assert "not allowed" in capsys.readouterr().err
    ids_file.write_text("1 2 x")
    assert main(["tokenizer", "decode", "-t", str(model), str(ids_file)]) == 2
    assert "ids >= 0" in capsys.readouterr().err


# --- tour row -------------------------------------------------------------------------
def test_tour_row(tok, corpus):
    from types import SimpleNamespace

    from minillm import tour
    model = mm.GPT(mm.GPTConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0)
    ctx = SimpleNamespace(text=corpus, tokenizer=tok, model=model, quick=True)
    row = tour.TECHNIQUES["tokenizer"](ctx)
    assert row.technique == "tokenizer" and row.params == model.num_params()
    assert row.extra["byte_bytes_per_token"] == 1.0            # ASCII corpus: one byte per id
    n = len(tok.encode(corpus, disallowed_special=()))
    assert row.extra["bpe_bytes_per_token"] == pytest.approx(len(corpus.encode()) / n)
    assert row.extra["bpe_encode_mb_s"] > 0
