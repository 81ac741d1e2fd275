"""Checkpoints: safetensors + JSON, written atomically, checked when read.

A minillm checkpoint is a directory:

    model.safetensors     the parameters, GPT-2 names, the config's dtype
    config.json           {"format": "minillm", "config": GPTConfig fields, ...}
    <group>.safetensors   optional extra tensors (e.g. "optimizer": AdamW moments)
    meta.json             optional JSON state (e.g. the trainer's step and RNG)

Safety rules: nothing is ever unpickled (safetensors holds raw little-endian
arrays plus a JSON header); a save is built in a temporary sibling directory
and swapped in with renames, so an interrupted save leaves the previous
checkpoint intact; loading checks names, shapes and dtypes against the config
and refuses anything else with a ``ValueError`` that says what is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .files import atomic_dir, atomic_write_bytes, atomic_write_text
from .backend import to_numpy
from .config import GPTConfig

FORMAT = "minillm"
MODEL_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "config.json", "meta.json"


# --- low-level: one safetensors file ------------------------------------------
def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` to ``path`` (safetensors, C-contiguous copies), atomically.

    bfloat16 arrays (``ml_dtypes``) are stored with safetensors' own "BF16" tag:
    the library's NumPy API lacks the dtype, so they go in as their uint16 bits
    and the header's tag is set to "BF16" (the bytes are the same).
    """
    from safetensors.numpy import save as st_save
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    bf16 = {k for k, a in arrays.items() if a.dtype.name == "bfloat16"}
    arrays = {k: a.view(np.uint16) if k in bf16 else a for k, a in arrays.items()}
    data = st_save(arrays, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, _retag(data, bf16, "BF16") if bf16 else data)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; any malformed or non-safetensors file -> ValueError.

    "BF16" tensors come back as ``ml_dtypes.bfloat16`` arrays.
    """
    from safetensors.numpy import load as st_load
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{str(path)!r} is truncated ({len(raw)} bytes): not a safetensors file")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > len(raw) - 8:
        raise ValueError(f"{str(path)!r} is truncated or not safetensors: header says "
                         f"{header_len} bytes, file has {len(raw) - 8}")
    try:
        header = json.loads(raw[8:8 + header_len])
        bf16 = {k for k, v in header.items() if isinstance(v, dict) and v.get("dtype") == "BF16"}
        tensors = st_load(_retag(raw, bf16, "U16") if bf16 else raw)
    except Exception as exc:  # SafetensorError, JSON errors and friends: corrupt data
        raise ValueError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None
    if bf16:
        from .config import np_dtype
        tensors.update({k: tensors[k].view(np_dtype("bfloat16")) for k in bf16})
    return tensors


def _retag(data: bytes, names: set, dtype: str) -> bytes:
    """The safetensors bytes ``data`` with the dtype tag of tensors ``names`` set to ``dtype``
    (same element size: only the JSON header changes, so the data offsets still hold)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for name in names:
        header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                            # keep the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` as indented JSON with sorted keys, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return obj


# --- model checkpoints ------------------------------------------------------------
def save(path, model, extra: dict[str, dict] | None = None, meta: dict | None = None,
         files: dict | None = None) -> None:
    """Save ``model`` (and optional tensor groups / JSON meta) to directory ``path``.

    ``files`` maps a file name to ``write(file_path)``, called inside the
    temporary directory so that the file (e.g. ``tokenizer.model``) is swapped
    in atomically with the rest.
    """
    extra, files = extra or {}, files or {}
    for name in files:
        if Path(name).name != name or name in (MODEL_FILE, CONFIG_FILE, META_FILE):
            raise ValueError(f"files name {name!r} must be a plain file name other than "
                             f"{MODEL_FILE}, {CONFIG_FILE}, {META_FILE}")
    for group in extra:
        if not group.isidentifier() or group == "model":
            raise ValueError(f"extra group name {group!r} must be an identifier other than 'model'")

    def write(tmp: Path):
        write_tensors(tmp / MODEL_FILE, model.params, {"format": FORMAT})
        write_json(tmp / CONFIG_FILE, {"format": FORMAT, "config": model.config.to_dict()})
        for group, tensors in extra.items():
            write_tensors(tmp / f"{group}.safetensors", tensors)
        if meta is not None:
            write_json(tmp / META_FILE, meta)
        for name, write_file in files.items():
            write_file(tmp / name)

    atomic_dir(path, write)


def load_config(path) -> GPTConfig:
    """The GPTConfig stored in ``path/config.json``."""
    obj = read_json(Path(path) / CONFIG_FILE)
    if obj.get("format") != FORMAT or "config" not in obj:
        raise ValueError(f"{str(Path(path) / CONFIG_FILE)!r} is not a minillm config "
                         f"(format={obj.get('format')!r}); for a Hugging Face GPT-2 "
                         f"directory use GPT.from_hf")
    return GPTConfig.from_dict(obj["config"])


def load(path):
    """Load a ``GPT`` from directory ``path``; shapes and dtypes must match its config."""
    from .model import GPT, check_params
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path={str(path)!r} is not a directory")
    config = load_config(path)
    params = read_tensors(path / MODEL_FILE)
    try:
        check_params(params, config)
    except ValueError as exc:
        raise ValueError(f"{str(path / MODEL_FILE)!r} does not match its config.json: {exc}") from None
    return GPT(config, params=params)


def load_extra(path, group: str) -> dict[str, np.ndarray] | None:
    """The tensor group ``group`` saved beside the model, or None if absent."""
    f = Path(path) / f"{group}.safetensors"
    return read_tensors(f) if f.exists() else None


def load_meta(path) -> dict | None:
    """The JSON ``meta`` saved beside the model, or None if absent."""
    f = Path(path) / META_FILE
    return read_json(f) if f.exists() else None


# --- Hugging Face GPT-2 (GPT2LMHeadModel) directories -------------------------------
# Same math, same Conv1D (in, out) layout and same names as ours, with a
# "transformer." prefix; torch and transformers are never imported here.
HF_PREFIX = "transformer."
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")     # causal-mask buffers of old checkpoints
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")    # both are GELU's tanh form, as ours


def hf_config(obj: dict) -> GPTConfig:
    """A GPTConfig from a GPT2Config JSON object; anything GPT-2 math here cannot do -> ValueError."""
    def bad(field, rule):
        return ValueError(f"HF config {field}={obj.get(field)!r}: {rule}; minillm runs plain GPT-2 only")
    if obj.get("format") == FORMAT:
        raise ValueError("config.json is a minillm checkpoint's, not Hugging Face's: use GPT.load")
    if obj.get("model_type") != "gpt2":
        raise bad("model_type", "must be 'gpt2'")
    arch = obj.get("architectures") or ["GPT2LMHeadModel"]
    if not set(arch) & {"GPT2LMHeadModel", "GPT2Model"}:
        raise bad("architectures", "must name GPT2LMHeadModel")
    if obj.get("activation_function", "gelu_new") not in HF_ACTIVATIONS:
        raise bad("activation_function", f"must be one of {HF_ACTIVATIONS} (tanh GELU)")
    for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if bool(obj.get(field, want)) != want:
            raise bad(field, f"must be {want}")
    n_embd = obj.get("n_embd", 768)
    if obj.get("n_inner") not in (None, 4 * n_embd):
        raise bad("n_inner", f"must be null or 4 * n_embd = {4 * n_embd}")
    return GPTConfig(vocab_size=obj.get("vocab_size", 50257), block_size=obj.get("n_positions", 1024),
                     n_layer=obj.get("n_layer", 12), n_head=obj.get("n_head", 12), n_embd=n_embd,
                     dtype="float32", ln_eps=float(obj.get("layer_norm_epsilon", 1e-5)))


def _read_st_any(path: Path) -> dict[str, np.ndarray]:
    """Like ``read_tensors``, with bfloat16 weights widened to float32 (an HF checkpoint's
    bf16 weights become the float32 model's)."""
    tensors = read_tensors(path)          # (buffers of any dtype pass; load_hf drops them by name)
    return {k: a.astype(np.float32) if a.dtype.name == "bfloat16" else a for k, a in tensors.items()}


def _hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (one model.safetensors or an index of shards)."""
    single, index = path / MODEL_FILE, path / (MODEL_FILE + ".index.json")
    if single.is_file():
        return _read_st_any(single)
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return {k: v for s in shards for k, v in _read_st_any(path / s).items()}
    has_bin = (path / "pytorch_model.bin").exists()
    raise ValueError(f"HF directory {str(path)!r} has no {MODEL_FILE}"
                     + (" (only pytorch_model.bin, a pickle minillm never loads: re-save it with "
                        "save_pretrained(dir, safe_serialization=True))" if has_bin else ""))


def load_hf(path, dtype: str = "float32"):
    """A ``GPT`` from a Hugging Face GPT2LMHeadModel directory (config.json + model.safetensors).

    Accepts names with or without the "transformer." prefix, drops the
    attention-mask buffers of old checkpoints, and accepts an "lm_head.weight"
    only if it equals the tied "wte.weight". float16 / bfloat16 weights are
    widened to ``dtype`` (float32 by default): every op here then runs in float32.
    """
    from .model import GPT, check_params
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"HF path={str(path)!r} is not a directory")
    config = hf_config(read_json(path / CONFIG_FILE))
    config = GPTConfig.from_dict({**config.to_dict(), "dtype": dtype})
    tensors = _hf_tensors(path)
    params = {}
    for name, a in tensors.items():
        name = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        if not name.endswith(HF_BUFFERS):
            params[name] = a
    head = params.pop("lm_head.weight", None)
    if head is not None and (head.shape != params.get("wte.weight", head).shape
                             or not np.array_equal(head, params.get("wte.weight", head))):
        raise ValueError(f"{str(path)!r}: lm_head.weight differs from wte.weight; minillm "
                         f"needs the tied head of GPT-2 (tie_word_embeddings=true)")
    params = {k: np.ascontiguousarray(v, dtype=config.np_dtype) for k, v in params.items()}
    try:
        check_params(params, config)
    except ValueError as exc:
        raise ValueError(f"{str(path / MODEL_FILE)!r} does not match its config.json: {exc}") from None
    return GPT(config, params=params)


def hf_config_json(config: GPTConfig) -> dict:
    """The GPT2Config fields that describe ``config`` (what transformers reads)."""
    eos = 50256 if config.vocab_size > 50256 else None
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "activation_function": "gelu_new", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "layer_norm_epsilon": config.ln_eps, "tie_word_embeddings": True,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "bos_token_id": eos, "eos_token_id": eos,
            "dtype": config.dtype, "torch_dtype": config.dtype}


def save_hf(path, model) -> None:
    """Write ``model`` as a directory ``GPT2LMHeadModel.from_pretrained`` loads (atomically)."""
    tensors = {HF_PREFIX + k: v for k, v in model.params.items()}

    def write(tmp: Path):
        write_tensors(tmp / MODEL_FILE, tensors, {"format": "pt"})
        write_json(tmp / CONFIG_FILE, hf_config_json(model.config))

    atomic_dir(path, write)
