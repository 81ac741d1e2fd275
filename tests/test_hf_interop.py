"""Hugging Face GPT-2 directories: GPT.from_hf / model.save_hf.

Without torch: round trips, the name variants real checkpoints use (with or
without "transformer.", mask buffers, a tied lm_head.weight), float16 and
bfloat16 weights, and a clear ValueError for every config or tensor set GPT-2
math here cannot run. With transformers (peers): a tiny random GPT2LMHeadModel
built in the test loads here with the same logits and greedy generations, and
a directory written by save_hf loads in transformers with the same logits.
"""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import GPT, GPTConfig, checkpoint
from minillm.checkpoint import read_tensors, write_tensors
from tests.helpers import assert_close


def tiny(seed=0, **kw) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=8), **kw})
    return GPT(cfg, seed=seed)


def edit(path, tensors=None, config=None):
    """Rewrite an HF directory's tensors and/or config.json in place (for bad-input tests)."""
    if tensors is not None:
        write_tensors(path / "model.safetensors", tensors, {"format": "pt"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def test_save_hf_then_from_hf_round_trips_exactly(tmp_path):
    model = tiny(1, ln_eps=1e-6)
    model.save_hf(tmp_path / "hf")
    back = GPT.from_hf(tmp_path / "hf")
    assert back.config == model.config
    for k, v in model.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    saved = read_tensors(tmp_path / "hf" / "model.safetensors")
    assert set(saved) == {"transformer." + k for k in model.params}
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_positions"], cfg["n_embd"], cfg["layer_norm_epsilon"]) == (16, 8, 1e-6)


def test_names_without_prefix_buffers_and_tied_head_are_accepted(tmp_path):
    model = tiny(2)
    model.save_hf(tmp_path)
    p = dict(model.params)
    p["lm_head.weight"] = p["wte.weight"].copy()                 # stored tied head
    for i in range(model.config.n_layer):                         # old GPT-2 mask buffers
        p[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        p[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    edit(tmp_path, tensors=p)
    back = GPT.from_hf(tmp_path)
    assert_close("wte", back.params["wte.weight"], model.params["wte.weight"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_are_widened_to_float32(tmp_path, dtype):
    model = tiny(3)
    model.save_hf(tmp_path)
    f32 = {"transformer." + k: v for k, v in model.params.items()}
    if dtype == "float16":
        write_tensors(tmp_path / "model.safetensors", {k: v.astype(np.float16) for k, v in f32.items()})
        expect = {k: v.astype(np.float16).astype(np.float32) for k, v in f32.items()}
    else:   # NumPy has no bfloat16: write the safetensors bytes by hand (top 16 bits)
        header, blobs, off = {}, [], 0
        for k, v in f32.items():
            b16 = (np.ascontiguousarray(v).view(np.uint32) >> 16).astype("<u2").tobytes()
            header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b16)]}
            blobs.append(b16)
            off += len(b16)
        h = json.dumps(header).encode()
        (tmp_path / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
        expect = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in f32.items()}
    back = GPT.from_hf(tmp_path)
    for k, v in back.params.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, expect["transformer." + k])


BAD_CONFIGS = [
    ({"activation_function": "relu"}, "activation_function"),
    ({"activation_function": "gelu"}, "activation_function"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_inner": 20}, "n_inner"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"n_head": 3}, "divisible"),
]


@pytest.mark.parametrize("change, match", BAD_CONFIGS)
def test_configs_gpt2_cannot_express_are_refused(tmp_path, change, match):
    tiny().save_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(tmp_path, config={**cfg, **change})
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(tmp_path)


def test_missing_extra_mismatched_tensors_and_untied_head_are_refused(tmp_path):
    model = tiny(4)
    model.save_hf(tmp_path)
    good = {"transformer." + k: v for k, v in model.params.items()}
    cases = [
        ({k: v for k, v in good.items() if "h.1.mlp.c_fc.bias" not in k}, "missing"),
        ({**good, "transformer.h.0.attn.extra": np.zeros(3, np.float32)}, "unexpected"),
        ({**good, "transformer.wpe.weight": np.zeros((15, 8), np.float32)}, "shape"),
        ({**good, "lm_head.weight": good["transformer.wte.weight"] + 1}, "lm_head"),
    ]
    for tensors, match in cases:
        edit(tmp_path, tensors=tensors)
        with pytest.raises(ValueError, match=match):
            GPT.from_hf(tmp_path)


def test_directory_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        GPT.from_hf(tmp_path / "nope")
    tiny().save_hf(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        GPT.from_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        GPT.from_hf(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    model = tiny(5)
    model.save_hf(tmp_path)
    names = sorted(model.params)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        write_tensors(tmp_path / shard, {"transformer." + k: model.params[k] for k in part})
        weight_map.update({"transformer." + k: shard for k in part})
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    back = GPT.from_hf(tmp_path)
    for k in names:
        np.testing.assert_array_equal(back.params[k], model.params[k])


def test_minillm_checkpoint_is_not_mistaken_for_hf(tmp_path):
    tiny().save(tmp_path)
    with pytest.raises(ValueError, match="GPT.load"):
        GPT.from_hf(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        checkpoint.hf_config({"n_embd": 8})


# --- peers: transformers itself ----------------------------------------------------------
@pytest.mark.peers
@given(n_head=st.integers(1, 3), head=st.integers(2, 6), n_layer=st.integers(1, 3),
       V=st.integers(5, 80), T=st.integers(2, 12), seed=st.integers(0, 1000))
@settings(deadline=None, max_examples=5)
def test_transformers_model_loads_with_same_logits_and_greedy_ids(tmp_path_factory, n_head, head,
                                                                   n_layer, V, T, seed):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T + 16, n_embd=n_head * head,
                                  n_layer=n_layer, n_head=n_head, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                        # non-trivial LayerNorms and biases
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, safe_serialization=True)
    model = GPT.from_hf(path)
    idx = np.random.default_rng(seed).integers(0, V, (2, T))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    assert_close("logits", model.forward(idx), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    ids = hf.generate(torch.from_numpy(idx), max_new_tokens=16, do_sample=False,
                      attention_mask=torch.ones_like(torch.from_numpy(idx))).numpy()
    np.testing.assert_array_equal(model.generate(idx, 16, temperature=0), ids)


@pytest.mark.peers
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny(6, vocab_size=60, n_embd=12, n_head=3)
    model.save_hf(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(0).integers(0, 60, (3, 10))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    assert_close("logits", model.forward(idx), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()   # tied


@pytest.mark.peers
def test_transformers_bfloat16_save_loads_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg).eval().to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = GPT.from_hf(tmp_path)
    assert model.params["wte.weight"].dtype == np.float32
    np.testing.assert_array_equal(model.params["wte.weight"],
                                  hf.transformer.wte.weight.detach().float().numpy())
