"""minillm.checkpoint: round trips, atomic saves, and every bad file refused."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import minillm as mm
from minillm import checkpoint
from minillm.optim import AdamW

CFG = mm.GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8)


def same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def trained_state(seed=0):
    """A model and an optimizer that took one step (non-zero moments)."""
    model = mm.GPT(CFG, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CFG.vocab_size, (2, 8))
    _, grads = model.loss_and_grads(idx, np.roll(idx, -1, axis=1))
    opt = AdamW(model.params)
    opt.step(model.params, grads, 1e-2)
    return model, opt


# --- round trips --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip(tmp_path, dtype):
    model = mm.GPT(dataclasses.replace(CFG, dtype=dtype), seed=1)
    model.save(tmp_path / "ck")
    loaded = mm.GPT.load(tmp_path / "ck")
    assert loaded.config == model.config
    assert same_params(loaded.params, model.params)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_round_trip_with_optimizer_meta_and_files(tmp_path):
    model, opt = trained_state()
    meta = {"step": 1, "history": [{"loss": 0.1 + 0.2}]}
    model.save(tmp_path, extra={"optimizer": opt.state_dict()}, meta=meta,
               files={"notes.txt": lambda p: Path(p).write_text("hi")})
    assert same_params(mm.GPT.load(tmp_path).params, model.params)
    state = checkpoint.load_extra(tmp_path, "optimizer")
    assert same_params(state, opt.state_dict())
    fresh = AdamW(model.params)
    fresh.load_state_dict(state)
    assert fresh.t == 1 and same_params(fresh.m, opt.m) and same_params(fresh.v, opt.v)
    assert checkpoint.load_meta(tmp_path) == meta          # floats survive JSON exactly
    assert (tmp_path / "notes.txt").read_text() == "hi"
    assert checkpoint.load_extra(tmp_path, "absent") is None


def test_save_replaces_and_leaves_no_temporaries(tmp_path):
    mm.GPT(CFG, seed=0).save(tmp_path / "ck", meta={"v": 1})
    second = mm.GPT(CFG, seed=1)
    second.save(tmp_path / "ck")                          # no meta this time
    assert same_params(mm.GPT.load(tmp_path / "ck").params, second.params)
    assert checkpoint.load_meta(tmp_path / "ck") is None  # the old meta.json went with the old dir
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "model.safetensors", "meta.json"])
def test_save_refuses_bad_file_names(tmp_path, bad):
    with pytest.raises(ValueError, match="files name"):
        mm.GPT(CFG).save(tmp_path, files={bad: lambda p: None})


def test_save_refuses_bad_group_names(tmp_path):
    with pytest.raises(ValueError, match="group"):
        mm.GPT(CFG).save(tmp_path, extra={"model": {}})


# --- interrupted saves -------------------------------------------------------------------
@pytest.mark.parametrize("fail_on", ["write_tensors", "write_json", "file"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    first, opt = trained_state(seed=0)
    first.save(tmp_path / "ck", extra={"optimizer": opt.state_dict()}, meta={"step": 1})
    calls = {"n": 0}

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise OSError("disk full (simulated)")

    files = None
    if fail_on == "file":
        files = {"tokenizer.model": boom}
    else:
        real = getattr(checkpoint, fail_on)

        def fail_second(*args, **kwargs):          # let one write through, fail the next
            if calls["n"] == 0:
                calls["n"] += 1
                return real(*args, **kwargs)
            return boom()
        monkeypatch.setattr(checkpoint, fail_on, fail_second)
    second, opt2 = trained_state(seed=1)
    with pytest.raises(OSError, match="simulated"):
        second.save(tmp_path / "ck", extra={"optimizer": opt2.state_dict()}, meta={"step": 2},
                    files=files)
    monkeypatch.undo()
    assert calls["n"] >= 1
    assert same_params(mm.GPT.load(tmp_path / "ck").params, first.params)
    assert same_params(checkpoint.load_extra(tmp_path / "ck", "optimizer"), opt.state_dict())
    assert checkpoint.load_meta(tmp_path / "ck") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # the temporary dir is gone


# --- refused files ---------------------------------------------------------------------------
class _Touch:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_payload_refused(tmp_path):
    mm.GPT(CFG).save(tmp_path / "ck")
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"wte.weight": _Touch(marker)})
    (tmp_path / "ck" / "model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="safetensors"):
        mm.GPT.load(tmp_path / "ck")
    (tmp_path / "ck" / "optimizer.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="safetensors"):
        checkpoint.load_extra(tmp_path / "ck", "optimizer")
    assert not marker.exists()


def test_numpy_pickle_file_refused(tmp_path):
    """An .npy of Python objects (needs pickle) under the checkpoint's name."""
    mm.GPT(CFG).save(tmp_path / "ck")
    with open(tmp_path / "ck" / "model.safetensors", "wb") as f:
        np.save(f, np.array([_Touch(tmp_path / "UNPICKLED")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        mm.GPT.load(tmp_path / "ck")
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file_refused(tmp_path, keep):
    mm.GPT(CFG).save(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(ValueError, match="truncated|not a valid safetensors"):
        mm.GPT.load(tmp_path / "ck")


def test_corrupted_header_refused(tmp_path):
    mm.GPT(CFG).save(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"#garbage"                                # the JSON header is no longer JSON
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="safetensors"):
        mm.GPT.load(tmp_path / "ck")


def test_corrupted_config_refused(tmp_path):
    mm.GPT(CFG).save(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        mm.GPT.load(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"n_embd": 8}))
    with pytest.raises(ValueError, match="not a minillm config"):
        mm.GPT.load(tmp_path / "ck")


def test_checkpoint_from_another_config_refused(tmp_path):
    """Weights of a wider model under a narrower model's config.json."""
    mm.GPT(dataclasses.replace(CFG, n_embd=16), seed=0).save(tmp_path / "wide")
    mm.GPT(CFG, seed=0).save(tmp_path / "narrow")
    (tmp_path / "wide" / "model.safetensors").replace(tmp_path / "narrow" / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        mm.GPT.load(tmp_path / "narrow")


def test_wrong_dtype_refused(tmp_path):
    mm.GPT(CFG, seed=0).save(tmp_path / "ck")
    p64 = {k: v.astype(np.float64) for k, v in mm.GPT(CFG, seed=0).params.items()}
    checkpoint.write_tensors(tmp_path / "ck" / "model.safetensors", p64)
    with pytest.raises(ValueError, match="dtype"):
        mm.GPT.load(tmp_path / "ck")


def test_missing_and_extra_tensors_refused(tmp_path):
    model = mm.GPT(CFG, seed=0)
    model.save(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    fewer = {k: v for k, v in model.params.items() if k != "ln_f.bias"}
    checkpoint.write_tensors(f, fewer)
    with pytest.raises(ValueError, match="ln_f.bias"):
        mm.GPT.load(tmp_path / "ck")
    checkpoint.write_tensors(f, model.params | {"lm_head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="lm_head.weight"):
        mm.GPT.load(tmp_path / "ck")


def test_missing_checkpoint_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        mm.GPT.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        mm.GPT.load(tmp_path / "empty")
