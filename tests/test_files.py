"""Atomic writes: the old file or directory survives an interrupted write, and no
temporary is left behind."""
from __future__ import annotations

import os

import pytest

from minillm import files


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_text_round_trip_is_utf8_with_newlines_as_given(tmp_path):
    text = "In the beginning\r\nκαὶ ὁ λόγος\n\u2028end"
    files.atomic_write_text(tmp_path / "a.txt", text)
    assert (tmp_path / "a.txt").read_bytes() == text.encode("utf-8")
    files.atomic_write_text(tmp_path / "a.txt", "second")                 # replaces
    assert (tmp_path / "a.txt").read_text() == "second"
    assert leftovers(tmp_path) == []


def test_bytes_round_trip(tmp_path):
    data = bytes(range(256)) * 3
    files.atomic_write_bytes(tmp_path / "b.bin", data)
    assert (tmp_path / "b.bin").read_bytes() == data
    files.atomic_write_bytes(tmp_path / "b.bin", bytearray(b"xy"))
    assert (tmp_path / "b.bin").read_bytes() == b"xy"


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_interrupted_file_write_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "keep.txt"
    files.atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, fail_in, boom)
    with pytest.raises(OSError, match="simulated"):
        files.atomic_write_text(path, "new " * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_wrong_types_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="data must be bytes"):
        files.atomic_write_bytes(tmp_path / "x", "text")
    with pytest.raises(ValueError, match="text must be a str"):
        files.atomic_write_text(tmp_path / "x", b"bytes")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "ck"                                     # parents are created

    def write(n):
        def fill(tmp):
            (tmp / "a.txt").write_text(f"v{n}")
            if n == 1:
                (tmp / "only_in_first").write_text("x")
        return fill
    files.atomic_dir(target, write(1))
    files.atomic_dir(target, write(2))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]         # the old dir is gone whole
    assert (target / "a.txt").read_text() == "v2"
    assert leftovers(target.parent) == []


def test_interrupted_atomic_dir_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ck"
    files.atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("old"))

    def half_then_fail(tmp):
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("killed mid-write (simulated)")
    with pytest.raises(RuntimeError, match="simulated"):
        files.atomic_dir(target, half_then_fail)
    assert (target / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="simulated"):               # nothing there before
        files.atomic_dir(tmp_path / "new", half_then_fail)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
