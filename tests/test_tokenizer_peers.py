"""Parity with the peers: tiktoken and Hugging Face tokenizers/transformers give our ids.

Nothing is downloaded: we train on the embedded corpus, export, and load the
exported files into each peer.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import backend
from minillm.data import load_corpus

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.peers
BACKEND = "numba" if backend.available()["numba"][0] else "numpy"
UNICODE = " naïve café 中文字 😀😀 👍🏽 don't WE'LL ſ 1234567 \r\n\r\n  x\t\ty e\u0301 Ωмир" * 20

TRICKY = list("aAsSdDmMtTlLvVeErR'’ \t\r\n\x0b\x0c\u00a0\u3000123456789,.!?-_()\"") + [
    "ſ", "é", "e\u0301", "ß", "中", "文", "😀", "👍🏽", "\u200d", "١", "²", "Ⅻ", "<|endoftext|>"]
text_st = st.one_of(st.lists(st.sampled_from(TRICKY), max_size=40).map("".join),
                    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")),
                            max_size=40))


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trio(request, tmp_path_factory):
    """(ours, tiktoken.Encoding, tokenizers.Tokenizer) trained on the whole corpus (+ unicode)."""
    text = load_corpus() + UNICODE
    with backend.use(BACKEND):
        ours = mm.BPETokenizer.train(text, 2048, pattern=request.param, special_tokens=["<|endoftext|>"])
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    ours.save_hf(out)
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    return ours, ours.to_tiktoken(), hf, out


def test_corpus_ids_identical(trio):
    ours, tk, hf, _ = trio
    text = load_corpus()
    with backend.use(BACKEND):
        ids = ours.encode(text)
    assert tk.encode_ordinary(text) == ids
    assert hf.encode(text).ids == ids


@settings(deadline=None, max_examples=60)
@given(text=text_st)
def test_unicode_ids_identical(trio, text):
    ours, tk, hf, _ = trio
    with backend.use(BACKEND):
        ids = ours.encode(text, allowed_special="all")
    assert tk.encode(text, allowed_special="all") == ids
    assert hf.encode(text).ids == ids                   # added tokens are always special in HF
    assert ours.decode(ids) == text == tk.decode(ids)


def test_vocab_json_merges_txt_load_in_tokenizers_and_transformers(trio):
    """Only the two classic files (GPT-2's regex is built into ByteLevel): the gpt2 pattern."""
    ours, _, _, out = trio
    if ours.pattern != mm.tokenizer.GPT2_PATTERN:
        pytest.skip("vocab.json + merges.txt alone imply GPT-2's pre-tokenizer")
    bl = tokenizers.ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"),
                                          add_prefix_space=False)
    text = load_corpus()[:200_000] + UNICODE
    ids = ours.encode(text)
    assert bl.encode(text).ids == ids
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    assert fast(text)["input_ids"] == ids
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto(text)["input_ids"] == ids


def test_tiktoken_export_special_rules(trio):
    ours, tk, _, _ = trio
    text = "x<|endoftext|>y"
    assert tk.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all")
    assert tk.encode(text, disallowed_special=()) == ours.encode(text, disallowed_special=())
    with pytest.raises(ValueError):
        tk.encode(text)
    with pytest.raises(ValueError):
        ours.encode(text)
    assert tk.n_vocab == ours.vocab_size


@pytest.mark.parametrize("text", ["1111", "11111", "a1234567b", "x 2024-12-01 99999"])
def test_digit_runs_split_in_threes_in_all_three(trio, text):
    """gpt4's possessive ``\\p{N}{1,3}+`` must not become Oniguruma's ``(?:\\p{N}{1,3})+``
    in tokenizer.json (HF would then keep "1111" as one piece)."""
    ours, tk, hf, out = trio
    ids = ours.encode(text)
    assert tk.encode_ordinary(text) == ids
    assert hf.encode(text).ids == ids
    assert mm.BPETokenizer.from_hf(out).pattern == ours.pattern
