"""The report: rows in, table, ratios and plots out (the tour itself: test_tour.py)."""
from __future__ import annotations

from minillm import report
from minillm.tour import Row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_table_formats_missing_values_and_ratios():
    base = Row("baseline", 100, 400, 10.0, 50.0, 20.0)
    other = Row("half", 50, 200, None, 100.0, 10.0, notes="a | b")
    assert report.ratios(other, base) == {"params": 0.5, "weight_bytes": 0.5, "val_ppl": None,
                                          "train_tok_s": 2.0, "decode_tok_s": 0.5}
    lines = report.format_table([base, other]).splitlines()
    assert len(lines) == 4
    assert "| half | 50 (0.50x) |" in lines[3] and "| - |" in lines[3] and "a \\| b" in lines[3]
