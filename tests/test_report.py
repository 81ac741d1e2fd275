"""The report: rows in, table, ratios and plots out (the tour itself: test_tour.py)."""
from __future__ import annotations

from minillm import baseline, report
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


def test_plots_are_png_and_error_rows_plot_without_bars():
    base = Row("baseline", 100, 400, 10.0, 50.0, 20.0)
    broken = Row("broken", None, None, None, None, None, notes="error: boom", extra={"error": True})
    assert report.plot_ratios([base, Row("half", 50, 200, 12.0, None, 40.0), broken])[:8] == PNG_MAGIC
    history = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 6)]
    assert report.plot_loss(history, [{"step": 5, "val_loss": 4.8}])[:8] == PNG_MAGIC
    assert report.plot_loss(history, [])[:8] == PNG_MAGIC


def test_write_report_writes_four_files_and_no_temporaries(tmp_path):
    from types import SimpleNamespace

    from minillm import tour
    settings = baseline.tour_settings(quick=True).to_dict()
    base = SimpleNamespace(history=[{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}],
                           evals=[{"step": 2, "val_loss": 4.5}], cached=False, entry=None,
                           info={"settings": settings, "timings": {"train_s": 1.0},
                                 "backend": "numpy"})
    rows = [Row("baseline", 100, 400, 10.0, 50.0, 20.0, extra={"decode_tokens": 8}),
            Row("half", 50, 200, None, 100.0, 10.0, notes="a | b", extra={"x": 0.5})]
    env = {"machine": "m", "processor": "p", "python": "3", "numpy": "2", "minillm": "0",
           "backend": "numpy (ok)", "train_backend": "numpy"}
    sample = {"prompt": "In", "text": "In the beginning", "settings": "greedy"}
    report.write_report(tmp_path, rows, ["baseline", "half"], base, sample, env, {"half": 0.1},
                        2.0, "minillm tour --quick")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "ratios.png",
                                                          "report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "| half | 50 (0.50x) |" in md and "x=0.5" in md and "`minillm tour --quick`" in md
    import json
    record = json.loads((tmp_path / "report.json").read_text())
    assert [r["source"] for r in record["rows"]] == ["baseline", "half"]
    assert record["rows"][1]["ratios"]["train_tok_s"] == 2.0
