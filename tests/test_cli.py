"""The ``minillm train`` and ``minillm generate`` commands, end to end on tiny settings."""
from __future__ import annotations

import pytest

import minillm as mm
from minillm import checkpoint
from minillm.cli import main
from minillm.tokenizer import BPETokenizer

TINY = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("run") / "ck"
    rc = main(["train", *TINY, "--corpus", str(corpus_file), "--vocab-size", "300",
               "--steps", "4", "--eval-interval", "2", "--out", str(out)])
    assert rc == 0
    return out


def test_train_writes_a_complete_checkpoint(trained, capsys):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "meta.json",
            "tokenizer.model"} <= names
    model, tok = mm.GPT.load(trained), BPETokenizer.load(trained / "tokenizer.model")
    assert tok.vocab_size == model.config.vocab_size == 300
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (1, 32, 32)
    meta = checkpoint.load_meta(trained)
    assert meta["step"] == 4 and [e["step"] for e in meta["evals"]] == [2, 4]


def generate(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_generate_continues_the_prompt(trained, capsys):
    args = ["--model", str(trained), "--prompt", "And God said", "--max-new-tokens", "8"]
    a = generate(capsys, *args, "--seed", "1")
    assert a.startswith("And God said") and len(a.rstrip("\n")) > len("And God said")
    assert generate(capsys, *args, "--seed", "1") == a                      # seeded
    assert generate(capsys, *args, "--seed", "1", "--no-cache") == a        # cache changes nothing
    greedy = generate(capsys, *args, "--temperature", "0")
    assert generate(capsys, *args, "--temperature", "0", "--top-k", "3", "--seed", "9") == greedy


def test_generate_from_hf_directory(trained, tmp_path, capsys):
    """--hf reads a Hugging Face GPT-2 directory: the same model and tokenizer give the same text."""
    hf = tmp_path / "hf"
    mm.GPT.load(trained).save_hf(hf)
    BPETokenizer.load(trained / "tokenizer.model").save_hf(hf)
    args = ["--prompt", "And God said", "--max-new-tokens", "8", "--temperature", "0"]
    assert generate(capsys, "--hf", str(hf), *args) == generate(capsys, "--model", str(trained), *args)


def test_generate_default_length_fits_block_size(trained, capsys):
    """The default (100 new ids) is cut to what fits block_size=32; asking for 100 is an error."""
    prompt = ["--model", str(trained), "--prompt", "In the"]
    assert generate(capsys, *prompt).startswith("In the")
    err = run_error(capsys, ["generate", *prompt, "--max-new-tokens", "100"])
    assert "minillm generate: error:" in err and "block_size=32" in err


def test_resume_continues_the_run(tmp_path, corpus_file, capsys):
    out = tmp_path / "ck"
    base = ["train", *TINY, "--corpus", str(corpus_file), "--vocab-size", "256", "--out", str(out)]
    assert main([*base, "--steps", "3", "--lr", "0.01"]) == 0
    first = checkpoint.load_meta(out)["history"]
    assert main(["train", "--corpus", str(corpus_file), "--out", str(out), "--resume",
                 "--steps", "5", "--no-progress"]) == 0                     # lr etc. from the checkpoint
    meta = checkpoint.load_meta(out)
    assert meta["step"] == 5 and meta["history"][:3] == first
    assert meta["train_config"]["lr"] == 0.01 and meta["train_config"]["batch_size"] == 2


# --- bad input ---------------------------------------------------------------------------
def run_error(capsys, argv) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:      # argparse's own errors
        rc = exc.code
    assert rc == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "3"], "minillm train: error: the following arguments are required: --out"),
    (["train", "--out", "x", "--steps", "many"], "minillm train: error: argument --steps: invalid int"),
    (["generate"], "minillm generate: error: one of the arguments --model --hf is required"),
    (["generate", "--model", "a", "--hf", "b"], "not allowed with argument"),
])
def test_argparse_errors(capsys, argv, message):
    assert message in run_error(capsys, argv)


def test_value_errors_are_reported(tmp_path, corpus_file, trained, capsys):
    out = str(tmp_path / "ck")
    err = run_error(capsys, ["train", "--out", out, "--steps", "0", "--corpus", str(corpus_file)])
    assert "minillm train: error: steps=0 must be an int >= 1" in err
    err = run_error(capsys, ["train", "--out", out, "--corpus", str(tmp_path / "missing.txt")])
    assert "minillm train: error: corpus path=" in err and "missing.txt" in err
    err = run_error(capsys, ["train", "--out", out, "--resume", "--corpus", str(corpus_file)])
    assert "minillm train: error: --resume" in err
    err = run_error(capsys, ["generate", "--model", str(tmp_path / "nothing")])
    assert "minillm generate: error:" in err and "nothing" in err
    err = run_error(capsys, ["generate", "--model", str(trained), "--temperature", "-1"])
    assert "minillm generate: error: temperature=-1.0" in err
    err = run_error(capsys, ["generate", "--model", str(trained), "--prompt", ""])
    assert "minillm generate: error: --prompt=''" in err


@pytest.mark.parametrize("command", ["train", "generate"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"minillm {command} --" in out
