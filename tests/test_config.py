"""GPTConfig: validation of every field, presets, JSON round trip."""
import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import GPTConfig
from minillm.config import PRESETS

SIZE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("value", [0, -3, 2.0, "8", True, None])
def test_size_field_rejects_non_positive_or_non_int(field, value):
    kwargs = {field: value}
    if field == "n_head":
        kwargs["n_embd"] = 8     # so only n_head itself can be wrong
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_numpy_int_fields_are_accepted_and_become_python_int():
    cfg = GPTConfig(vocab_size=np.int64(17), n_embd=np.int32(8), n_head=2)
    assert cfg.vocab_size == 17 and type(cfg.vocab_size) is int
    assert type(cfg.n_embd) is int


@given(n_head=st.integers(1, 8), n_embd=st.integers(1, 64))
@settings(deadline=None, max_examples=30)
def test_n_embd_must_be_divisible_by_n_head(n_head, n_embd):
    if n_embd % n_head:
        with pytest.raises(ValueError, match=rf"n_embd={n_embd}.*n_head={n_head}"):
            GPTConfig(n_head=n_head, n_embd=n_embd)
    else:
        cfg = GPTConfig(n_head=n_head, n_embd=n_embd)
        assert cfg.head_size * cfg.n_head == cfg.n_embd


@pytest.mark.parametrize("dtype", ["float8", "int32", "half", np.float32, None])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        GPTConfig(dtype=dtype)


@pytest.mark.parametrize("eps", [0, -1e-5, 1.0, "1e-5", None])
def test_bad_ln_eps(eps):
    with pytest.raises(ValueError, match="ln_eps"):
        GPTConfig(ln_eps=eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_np_dtype(dtype):
    assert GPTConfig(dtype=dtype).np_dtype == np.dtype(dtype)


def test_frozen():
    cfg = GPTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3


def test_presets_match_their_documentation():
    small = GPTConfig.preset("small")
    assert (small.vocab_size, small.block_size, small.n_layer, small.n_head, small.n_embd) \
        == (4096, 256, 6, 8, 256)
    tiny = GPTConfig.preset("tiny")
    assert (tiny.vocab_size, tiny.block_size, tiny.n_layer, tiny.n_head, tiny.n_embd) \
        == (256, 64, 2, 4, 64)
    for name in PRESETS:
        assert name in GPTConfig.preset.__doc__


def test_preset_overrides_are_validated():
    assert GPTConfig.preset("tiny", dtype="float64").dtype == "float64"
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig.preset("tiny", n_head=3)


def test_unknown_preset_names_it_and_lists_known():
    with pytest.raises(ValueError, match="huge") as info:
        GPTConfig.preset("huge")
    assert "tiny" in str(info.value) and "small" in str(info.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_counts_the_model(name):
    from minillm.model import param_shapes
    cfg = GPTConfig.preset(name)
    assert cfg.num_params() == sum(int(np.prod(s)) for s in param_shapes(cfg).values())


@given(vocab_size=st.integers(1, 50), block_size=st.integers(1, 20), n_layer=st.integers(1, 3),
       n_head=st.integers(1, 4), head=st.integers(1, 4), dtype=st.sampled_from(["float32", "float64"]))
@settings(deadline=None, max_examples=20)
def test_dict_and_json_round_trip(vocab_size, block_size, n_layer, n_head, head, dtype):
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                    n_head=n_head, n_embd=n_head * head, dtype=dtype)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_from_dict_rejects_unknown_fields_by_name():
    d = GPTConfig().to_dict() | {"n_ctx": 1024}
    with pytest.raises(ValueError, match="n_ctx"):
        GPTConfig.from_dict(d)


def test_from_dict_rejects_non_dict():
    with pytest.raises(ValueError, match="config"):
        GPTConfig.from_dict([("n_layer", 2)])


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.from_dict(GPTConfig().to_dict() | {"n_layer": 0})


def test_numpy_float_ln_eps_becomes_python_float():
    """A NumPy float64 eps would silently promote float32 activations to float64."""
    cfg = GPTConfig(ln_eps=np.float64(1e-5))
    assert type(cfg.ln_eps) is float and cfg.ln_eps == 1e-5
