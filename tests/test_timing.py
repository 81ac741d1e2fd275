"""minillm.timing: medians of timed calls after untimed warm-up, the device waited for
before every clock read, and the machine stated."""
from __future__ import annotations

import time

import numpy as np
import pytest

from minillm import backend, timing
from tests import standin


class FakeClock:
    """Stands in for the ``time`` module inside ``minillm.timing``: each read logs and ticks 1 s."""

    def __init__(self, log):
        self.log, self.now = log, 0.0

    def perf_counter(self):
        self.log.append("clock")
        self.now += 1.0
        return self.now


@pytest.fixture
def log(monkeypatch):
    """Events in order: "clock" reads, "call"s of fn, "sync"s of the device."""
    events = []
    monkeypatch.setattr(timing, "time", FakeClock(events))
    monkeypatch.setattr(backend, "synchronize", lambda *arrays: events.append(("sync", arrays)))
    return events


def test_median_and_min_of_known_sleeps():
    sleeps = iter([0.005, 0.045, 0.025])
    res = timing.median_time(lambda: time.sleep(next(sleeps)), repeats=3, warmup=0)
    t = res["times_s"]
    assert len(t) == 3 and t[0] < t[2] < t[1]                # the order of the sleeps
    assert res["median_s"] == t[2] and res["min_s"] == t[0]
    assert t[0] >= 0.005 and t[1] >= 0.045
    assert res["repeats"] == 3 and res["warmup"] == 0


def test_warmup_calls_are_made_but_not_timed(log):
    res = timing.median_time(lambda: log.append("call"), repeats=3, warmup=2)
    assert log.count("call") == 5
    assert log[:2] == ["call", "call"]                        # warm-up before the first clock read
    assert log[2:] == ["clock", "call", "clock"] * 3          # one timed call between two reads
    assert res["times_s"] == [1.0, 1.0, 1.0] and res["median_s"] == 1.0


@pytest.mark.parametrize("kind", ["arrays", "callable"])
def test_the_device_is_waited_for_before_every_clock_read(log, kind):
    arrays = [np.zeros(3)]
    sync = arrays if kind == "arrays" else (lambda: log.append(("sync", "callable")))
    timing.median_time(lambda: log.append("call"), repeats=4, warmup=1, sync=sync)
    reads = [i for i, e in enumerate(log) if e == "clock"]
    assert len(reads) == 8
    for i in reads:
        assert log[i - 1][0] == "sync", log[i - 1]
    if kind == "arrays":
        assert all(e[1][0] is arrays[0] for e in log if e[0] == "sync")


def test_what_fn_returns_is_waited_for_before_the_clock_stops(log):
    a, b = np.ones(2), np.zeros(2)

    def fn():
        log.append("call")
        return a, 1.5, b                      # arrays among other results
    timing.median_time(fn, repeats=2, warmup=1)
    assert log[:2] == ["call", ("sync", (a, b))]
    assert log[2:] == ["clock", "call", ("sync", (a, b)), "clock"] * 2


def test_a_registered_device_is_synchronized_for_real():
    d = standin.xp.ones(3)
    before = standin.Stream.synchronized
    res = timing.median_time(lambda: d + 1, repeats=3, warmup=1, sync=[d])
    assert standin.Stream.synchronized - before == 1 + 2 * 3   # warm-up end; start + stop per run
    assert len(res["times_s"]) == 3


@pytest.mark.parametrize("kwargs,match", [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                                          ({"repeats": 2.5}, "repeats"), ({"sync": 3}, "sync")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timing.median_time(lambda: None, **kwargs)
    with pytest.raises(ValueError, match="callable"):
        timing.median_time(3)


def test_cpu_name_from_cpuinfo_or_platform(monkeypatch):
    name = timing.cpu_name()
    assert isinstance(name, str) and name.strip()

    class Unreadable:
        def __init__(self, *_):
            pass

        def read_text(self):
            raise OSError("no /proc here")
    monkeypatch.setattr(timing, "Path", Unreadable)
    monkeypatch.setattr(timing.platform, "processor", lambda: "Fake CPU 9000")
    assert timing.cpu_name() == "Fake CPU 9000"


def test_thread_settings_report_the_variables(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    t = timing.thread_settings()
    assert set(t["env"]) == set(timing.THREAD_VARS)
    assert t["env"]["OPENBLAS_NUM_THREADS"] == "3" and t["env"]["MKL_NUM_THREADS"] is None
    assert t["cpus"] >= 1 and 1 <= t["cpus_usable"] <= t["cpus"]
    assert t["blas"] is None or all("threads" in pool for pool in t["blas"])
    line = timing.machine_line()
    assert timing.cpu_name() in line and "OPENBLAS_NUM_THREADS=3" in line
