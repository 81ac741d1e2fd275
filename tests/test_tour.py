"""The tour: quick end-to-end runs in tmp dirs, the baseline cache, the technique
registry and its order, budgets, ``ctx.cached_model``, bad args.

Every tour here is ``quick=True`` (a tiny model, a few steps, a 100k-character
slice of the corpus), so each run takes seconds.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import minillm as mm
from minillm import baseline, cli, report, tour
from minillm.tour import Row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quick_tour(tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    kwargs.setdefault("progress", False)
    return tour.run_tour(out_dir=tmp_path / "out", quick=True, **kwargs)


def read_json(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "report.json").read_text())


def test_quick_tour_writes_report_with_every_registered_technique(tmp_path, capsys):
    rows = quick_tour(tmp_path)
    out = tmp_path / "out"
    for name in ("report.md", "report.json", "loss.png", "ratios.png"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "ratios.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"

    base = rows[0]
    assert base.technique == "baseline"
    cfg = baseline.tour_settings(quick=True).model
    assert base.params == cfg.num_params()
    assert base.weight_bytes == cfg.num_params() * 4                     # float32
    assert math.isfinite(base.val_ppl) and base.val_ppl > 1
    assert base.train_tok_s > 0 and base.decode_tok_s > 0

    record = read_json(tmp_path)
    assert record["rows"][0]["ratios"] == {k: 1.0 for k, _ in report.COLUMNS}
    sources = [r["source"] for r in record["rows"]]
    assert set(tour.TECHNIQUES) <= set(sources)
    errors = [(r["source"], r["notes"]) for r in record["rows"] if r["extra"].get("error")]
    assert not errors, f"registered techniques failed in the quick tour: {errors}"

    md = (out / "report.md").read_text()
    table = capsys.readouterr().out
    for row in rows:
        assert f"| {row.technique} |" in md and f"| {row.technique} |" in table
    assert "| baseline | " + f"{base.params:,} (1.00x)" in md
    assert "## Sample" in md and "backend" in md.lower()


def test_second_run_reuses_the_cache_without_training(tmp_path, monkeypatch):
    first = quick_tour(tmp_path, techniques=[])
    assert first[0].extra["cached"] is False
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    weights = entries[0] / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    import minillm.train

    def no_training(*args, **kwargs):
        raise AssertionError("the cached baseline was trained again")
    monkeypatch.setattr(minillm.train, "train", no_training)
    second = quick_tour(tmp_path, techniques=[])
    assert second[0].extra["cached"] is True
    assert weights.stat().st_mtime_ns == stamp
    assert second[0].val_ppl == first[0].val_ppl                          # same weights, same windows
    assert read_json(tmp_path)["cached"] is True


def test_other_settings_get_their_own_cache_entry(tmp_path):
    quick_tour(tmp_path, techniques=[])
    rows = quick_tour(tmp_path, techniques=[], steps=3)
    assert rows[0].extra["cached"] is False and rows[0].extra["train_steps"] == 3
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_unusable_cache_entry_is_trained_again(tmp_path):
    quick_tour(tmp_path, techniques=[])
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "ids.npy").write_bytes(b"not an npy file")
    rows = quick_tour(tmp_path, techniques=[])
    assert rows[0].extra["cached"] is False
    assert np.load(entry / "ids.npy", allow_pickle=False).ndim == 1       # rewritten


def test_no_cache_touches_no_cache_dir(tmp_path):
    rows = quick_tour(tmp_path, techniques=[], use_cache=False)
    assert rows[0].extra["cached"] is False
    assert not (tmp_path / "cache").exists()


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "c"))
    assert baseline.default_cache_dir() == tmp_path / "c" / "tour"


def test_registered_technique_joins_and_failing_one_shows_its_error(tmp_path, monkeypatch):
    def doubled(ctx):
        b = ctx.baseline
        return Row("doubled", 2 * b.params, 2 * b.weight_bytes, ctx.val_ppl(), None,
                   b.decode_tok_s, notes="test row", extra={"bytes_per_token": 3.5})

    def broken(ctx):
        raise RuntimeError("boom in the row function")

    monkeypatch.setitem(tour.TECHNIQUES, "test_doubled", doubled)
    monkeypatch.setitem(tour.TECHNIQUES, "test_broken", broken)
    rows = quick_tour(tmp_path, techniques="test_doubled,test_broken")
    assert [r.technique for r in rows] == ["baseline", "doubled", "test_broken"]
    record = read_json(tmp_path)
    d, e = record["rows"][1], record["rows"][2]
    assert d["ratios"]["params"] == 2.0 and d["ratios"]["weight_bytes"] == 2.0
    assert d["ratios"]["val_ppl"] == 1.0 and d["ratios"]["train_tok_s"] is None
    assert "RuntimeError: boom in the row function" in e["notes"]
    assert all(e[k] is None for k, _ in report.COLUMNS) and e["extra"]["error"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "boom in the row function" in md and "bytes_per_token=3.5" in md


def test_row_function_must_return_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(tour.TECHNIQUES, "test_bad_return", lambda ctx: {"params": 1})
    rows = quick_tour(tmp_path, techniques=["test_bad_return"])
    assert "TypeError" in rows[1].notes and rows[1].params is None


def test_technique_decorator_registers_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(tour, "TECHNIQUES", {})
    monkeypatch.setattr(tour, "ORDER", {})

    @tour.technique("one")
    def one(ctx):
        return []
    assert tour.TECHNIQUES == {"one": one}
    assert tour.technique("one")(one) is one                            # same function: fine
    with pytest.raises(ValueError, match="registered twice"):
        tour.technique("one")(lambda ctx: None)
    with pytest.raises(ValueError, match="technique name"):
        tour.technique("  ")


@pytest.mark.parametrize("kwargs, match", [
    (dict(techniques=["no_such_technique"]), "not registered"),
    (dict(steps=0), "steps=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(quick="yes"), "quick="),
    (dict(out_dir=3), "out_dir=3"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, match):
    kwargs = {"out_dir": tmp_path / "out", "cache_dir": tmp_path / "c", "quick": True,
              "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        tour.run_tour(**kwargs)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tour.run_tour(out_dir=tmp_path / "f", quick=True, progress=False)


def test_cli_tour_quick_and_bad_args(tmp_path, capsys):
    argv = ["tour", "--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
            "--techniques", "none", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| baseline |" in printed
    assert "minillm tour" in (tmp_path / "out" / "report.md").read_text()
    assert cli.main(argv[:-3] + ["--techniques", "nope"]) == 2
    assert "not registered" in capsys.readouterr().err
    assert cli.main(["tour", "--quick", "--steps", "-1", "--out", str(tmp_path / "o2")]) == 2
    assert "steps=-1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tour", "--help"])
    assert "--cache-dir" in capsys.readouterr().out


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("MINILLM_BACKEND", raising=False)
    assert tour.pick_backend("numpy", quick=False) == "numpy"
    from minillm import backend
    assert tour.pick_backend(None, quick=True) == backend.current()
    numba_ok = backend.available()["numba"][0]
    assert tour.pick_backend(None, quick=False) == ("numba" if numba_ok else "numpy")
    monkeypatch.setenv("MINILLM_BACKEND", "numpy")
    assert tour.pick_backend(None, quick=False) == "numpy"


# --- collecting rows: every module imported, a fixed order ---------------------------
def test_collect_registers_the_rows_of_technique_modules_in_table_order():
    assert tour.collect() == {}, "a minillm module failed to import"
    names = tour.ordered_names()
    assert names[:2] == ["tokenizer", "kv_cache"]                      # chapters 01, 02
    from minillm import kv_cache, tokenizer
    assert tour.TECHNIQUES["tokenizer"] is tokenizer.tokenizer_row
    assert tour.TECHNIQUES["kv_cache"] is kv_cache.kv_cache_row


def test_order_does_not_depend_on_registration_order(monkeypatch):
    def row(ctx):
        return []
    orders = {}
    for names in (["b", "late", "a", "first"], ["first", "a", "late", "b"]):
        monkeypatch.setattr(tour, "TECHNIQUES", {})
        monkeypatch.setattr(tour, "ORDER", {})
        for name in names:
            tour.technique(name, **({"order": 1} if name == "first" else
                                    {"order": 500} if name == "late" else {}))(row)
        orders[tuple(names)] = tour.ordered_names()
    assert list(orders.values()) == [["first", "a", "b", "late"]] * 2
    with pytest.raises(ValueError, match="order="):
        tour.technique("x", order=1.5)


def test_module_that_fails_to_import_becomes_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setattr(tour, "collect", lambda: {"broken": ImportError("no module named nope")})
    monkeypatch.setattr(tour, "TECHNIQUES", {})
    rows = quick_tour(tmp_path)
    assert [r.technique for r in rows] == ["baseline", "broken"]
    assert "cannot import minillm.broken: ImportError: no module named nope" in rows[1].notes
    assert rows[1].extra["error"] is True and rows[1].params is None
    with pytest.raises(ValueError, match="broken failed to import"):
        quick_tour(tmp_path, techniques=["from_broken"])


# --- time budgets ----------------------------------------------------------------------
def test_row_budget_is_a_share_of_what_is_left_with_a_floor():
    assert tour.row_budget_s(False, 70.0, 4) == pytest.approx((tour.TOUR_BUDGET_S - 70.0) / 4)
    assert tour.row_budget_s(False, 1e4, 2) == tour.MIN_ROW_BUDGET_S
    assert tour.row_budget_s(True, 0.0, 1) == tour.QUICK_TOUR_BUDGET_S
    assert tour.row_budget_s(True, 0.0, 3) < tour.row_budget_s(False, 0.0, 3)


def test_each_row_is_told_its_budget(tmp_path, monkeypatch):
    seen = []

    def record(ctx):
        seen.append(ctx.budget_s)
        return Row("budget", 1, 1, None, None, None)
    monkeypatch.setitem(tour.TECHNIQUES, "test_budget_a", record)
    monkeypatch.setitem(tour.TECHNIQUES, "test_budget_b", record)
    quick_tour(tmp_path, techniques=["test_budget_a", "test_budget_b"])
    assert len(seen) == 2
    assert all(tour.QUICK_MIN_ROW_BUDGET_S <= b <= tour.QUICK_TOUR_BUDGET_S for b in seen)


# --- ctx.cached_model: a technique's trained model, cached like the baseline -------------
CFG = mm.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


class Builder:
    """A tiny stand-in for a training run: records its calls, returns a seeded GPT."""

    def __init__(self):
        self.budgets = []

    def __call__(self, budget_s: float):
        self.budgets.append(budget_s)
        return mm.GPT(CFG, seed=len(self.budgets))


def context(tmp_path, cache_dir="default", budget_s=2.5, log=None):
    ids = np.arange(100, dtype=np.int32) % CFG.vocab_size
    return tour.TourContext(model=mm.GPT(CFG, seed=0), tokenizer=None, train_ids=ids, val_ids=ids,
                            text="", baseline=None, out_dir=tmp_path, quick=True, seed=0,
                            budget_s=budget_s, log=log or (lambda m: None),
                            cache_dir=tmp_path / "techniques" if cache_dir == "default" else cache_dir)


def test_cached_model_is_built_once_then_reused(tmp_path):
    ctx, build = context(tmp_path), Builder()
    first = ctx.cached_model("toy", {"steps": 3}, build)
    assert build.budgets == [2.5]                                     # ctx.budget_s passed through
    (entry,) = (tmp_path / "techniques").iterdir()
    assert entry.name.startswith("toy-") and (entry / "model.safetensors").is_file()
    again = ctx.cached_model("toy", {"steps": 3}, build)
    assert build.budgets == [2.5]                                     # not built again
    for name, p in first.params.items():
        np.testing.assert_array_equal(again.params[name], p)
        np.testing.assert_array_equal(p, mm.GPT(CFG, seed=1).params[name])
    assert not [p.name for p in (tmp_path / "techniques").iterdir() if p.name.startswith(".")]


def test_cached_model_is_rebuilt_when_settings_change_and_takes_a_budget(tmp_path):
    ctx, build = context(tmp_path), Builder()
    ctx.cached_model("toy", {"steps": 3}, build)
    ctx.cached_model("toy", {"steps": 4}, build, budget_s=0.75)
    ctx.cached_model("other", {"steps": 3}, build)
    assert build.budgets == [2.5, 0.75, 2.5]
    assert len(list((tmp_path / "techniques").iterdir())) == 3
    ctx.cached_model("toy", {"steps": 4}, build)
    assert len(build.budgets) == 3


def test_unsound_cached_model_is_built_again(tmp_path):
    messages = []
    ctx, build = context(tmp_path, log=messages.append), Builder()
    ctx.cached_model("toy", {"steps": 3}, build)
    (entry,) = (tmp_path / "techniques").iterdir()
    (entry / "model.safetensors").write_bytes(b"not safetensors")
    model = ctx.cached_model("toy", {"steps": 3}, build)
    assert len(build.budgets) == 2 and model.config == CFG
    assert any("unusable" in m for m in messages)


def test_cached_model_without_cache_builds_in_a_temporary_dir(tmp_path):
    ctx, build = context(tmp_path, cache_dir=None), Builder()
    a = ctx.cached_model("toy", {"steps": 3}, build)
    b = ctx.cached_model("toy", {"steps": 3}, build)
    assert len(build.budgets) == 2 and a.config == b.config == CFG
    assert not (tmp_path / "techniques").exists()


@pytest.mark.parametrize("args, error, match", [
    (("toy", {"f": object()}, Builder()), ValueError, "settings="),
    (("toy", [1], Builder()), ValueError, "settings="),
    (("../up", {}, Builder()), ValueError, "name="),
    (("toy", {}, lambda budget_s: "not a model"), TypeError, "must return a GPT"),
])
def test_cached_model_bad_input(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        context(tmp_path).cached_model(*args)
    with pytest.raises(ValueError, match="budget_s="):
        context(tmp_path).cached_model("toy", {}, Builder(), budget_s=0)


def test_tour_keeps_technique_models_beside_the_baseline(tmp_path, monkeypatch):
    build = Builder()

    def trains(ctx):
        model = ctx.cached_model("test_trains", {"steps": 1}, build)
        return Row("test_trains", model.num_params(), model.nbytes(), None, None, None)
    monkeypatch.setitem(tour.TECHNIQUES, "test_trains", trains)
    quick_tour(tmp_path, techniques=["test_trains"])
    quick_tour(tmp_path, techniques=["test_trains"])
    assert len(build.budgets) == 1                                    # the second tour reused it
    (entry,) = (tmp_path / "cache").iterdir()
    (model_dir,) = (entry / baseline.TECHNIQUES_DIR).iterdir()
    assert model_dir.name.startswith("test_trains-") and mm.GPT.load(model_dir).config == CFG
    quick_tour(tmp_path, techniques=["test_trains"], use_cache=False)
    assert len(build.budgets) == 2
