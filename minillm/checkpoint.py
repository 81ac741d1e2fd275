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
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .config import GPTConfig

FORMAT = "minillm"
MODEL_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "config.json", "meta.json"


# --- low-level: one safetensors file ------------------------------------------
def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` to ``path`` (safetensors, C-contiguous copies)."""
    from safetensors.numpy import save as st_save
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    data = st_save(arrays, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; any malformed or non-safetensors file -> ValueError."""
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
        return st_load(raw)
    except Exception as exc:  # SafetensorError and friends: corrupt data
        raise ValueError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


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


# --- atomic directory swap -----------------------------------------------------
def atomic_dir(path, write) -> None:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``path`` with renames.

    If anything fails before the swap, ``path`` is untouched. The old directory
    is renamed aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# --- model checkpoints ------------------------------------------------------------
def save(path, model, extra: dict[str, dict] | None = None, meta: dict | None = None) -> None:
    """Save ``model`` (and optional tensor groups / JSON meta) to directory ``path``."""
    extra = extra or {}
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
