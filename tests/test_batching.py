"""Adaptive batch sizing and continuous batching (minillm/batching.py)."""
from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import batching, generation, kv_cache
from minillm.train import TrainConfig, train
from tests import standin

TINY = mm.GPTConfig.preset("tiny")
SMALL = mm.GPTConfig.preset("small")
FAST = settings(max_examples=8, deadline=None)


# --- budgets --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, n", [("512MiB", 512 * 2**20), ("1GiB", 2**30), ("2GB", 2 * 10**9),
                                     ("1.5 KiB", 1536), ("1000", 1000), (4096, 4096)])
def test_parse_bytes(text, n):
    assert batching.parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["1 GB?", "-1GiB", "0MiB", "GiB", "1 parsec", "", None, True, -5, 1.5])
def test_parse_bytes_rejects_malformed(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        batching.parse_bytes(bad)


# --- the memory model -----------------------------------------------------------------------
configs = st.builds(lambda L, H, D, V, T: mm.GPTConfig(vocab_size=V, block_size=T, n_layer=L,
                                                       n_head=H, n_embd=H * D),
                    st.integers(1, 2), st.integers(1, 3), st.integers(2, 6), st.integers(5, 40),
                    st.integers(4, 12))


@FAST
@given(configs, st.integers(1, 3), st.data())
def test_stored_term_equals_what_forward_train_keeps(config, B, data):
    T = data.draw(st.integers(1, config.block_size))
    model = mm.GPT(config, seed=0)
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (B, T))
    _, cache = model.forward_train(idx)
    assert batching.stored_activation_bytes(cache, model.params) == batching.stored_bytes(config, B, T)


@FAST
@given(configs, st.integers(1, 40), st.data())
def test_memory_model_is_monotone_and_sums(config, B, data):
    T = data.draw(st.integers(1, config.block_size - 1))
    for mode in ("train", "decode"):
        m = batching.memory_model(config, B, T, mode)
        assert m["total"] == sum(v for k, v in m.items() if k != "total")
        assert m["weights"] == config.num_params() * 4
        assert batching.memory_model(config, B + 1, T, mode)["total"] > m["total"]
        assert batching.memory_model(config, B, T + 1, mode)["total"] > m["total"]
    m = batching.memory_model(config, B, T)
    assert m["grads"] == m["weights"] and m["optimizer"] == 2 * m["weights"]
    assert batching.memory_model(config, B, T, accumulating=True)["grads"] == 2 * m["weights"]


def test_decode_model_kv_term_is_the_cache():
    from minillm.kv_cache import KVCache
    for B, T in ((1, 64), (5, 256)):
        assert batching.memory_model(SMALL, B, T, "decode")["kv_cache"] == KVCache(SMALL, B, T).nbytes


@pytest.mark.parametrize("B, T", [(2, 64), (1, 128)])
def test_memory_model_matches_tracemalloc_peak(B, T):
    """The predicted step (activations + grads) against the peak NumPy really allocated."""
    model = mm.GPT(SMALL, seed=0)
    idx = np.random.default_rng(0).integers(0, SMALL.vocab_size, (B, T))
    tracemalloc.start()
    try:
        model.loss_and_grads(idx, idx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    m = batching.memory_model(SMALL, B, T)
    assert abs(m["activations"] + m["grads"] - peak) / peak < 0.10, (m, peak)


def test_memory_model_rejects_other_kinds_and_bad_sizes():
    with pytest.raises(ValueError, match="attention"):
        batching.memory_model(dataclasses.replace(TINY, attention="window", window=4), 1, 8)
    with pytest.raises(ValueError, match="seq_len"):
        batching.memory_model(TINY, 1, TINY.block_size + 1)
    with pytest.raises(ValueError, match="batch_size"):
        batching.memory_model(TINY, 0, 8)


# --- the finder ---------------------------------------------------------------------------
@FAST
@given(st.integers(1, 256), st.floats(1.0, 300.0), st.sampled_from(["train", "decode"]))
def test_finder_returns_the_largest_batch_under_the_budget(T, factor, mode):
    one = batching.memory_model(SMALL, 1, T, mode)["total"]
    budget = int(one * factor)
    B = batching.find_batch_size(SMALL, T, budget, mode=mode)
    assert batching.memory_model(SMALL, B, T, mode)["total"] <= budget
    assert B == 4096 or batching.memory_model(SMALL, B + 1, T, mode)["total"] > budget
    assert batching.find_batch_size(SMALL, T, budget, max_batch=3, mode=mode) == min(B, 3)


def test_finder_says_what_batch_one_needs():
    need = batching.memory_model(SMALL, 1, 256)["total"]
    with pytest.raises(ValueError, match=f"batch 1 needs at seq_len=256: {need} bytes"):
        batching.find_batch_size(SMALL, 256, need - 1)
    with pytest.raises(ValueError, match="budget_bytes"):
        batching.find_batch_size(SMALL, 256, "1 GB?")


def test_plan_batch_accumulates_when_the_step_does_not_fit():
    one = batching.memory_model(SMALL, 4, 128, accumulating=True)["total"]
    B, micro = batching.plan_batch(SMALL, 128, one, batch_size=64)
    assert B == 64 and 4 <= micro < 64
    assert batching.plan_batch(SMALL, 128, "64GiB", batch_size=64) == (64, None)
    auto, none = batching.plan_batch(SMALL, 128, "1GiB")
    assert none is None and auto == batching.find_batch_size(SMALL, 128, "1GiB", 1024)


# --- training: accumulation and out-of-memory backoff -------------------------------------------
def _data(n=4000, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, n)


def _run(tcfg, hooks=(), model_patch=None):
    model = mm.GPT(TINY, seed=0)
    if model_patch:
        model_patch(model)
    return train(model, _data(), None, tcfg, progress=False, hooks=hooks)


def test_oom_backoff_halves_and_keeps_every_step():
    tcfg = TrainConfig(steps=3, batch_size=8, seq_len=16, eval_interval=0)
    plain = _run(tcfg)

    def fail_above_2(model):                        # a MemoryError for any micro-batch over 2 rows
        inner = model.loss_and_grads
        model.loss_and_grads = lambda x, y: (_ for _ in ()).throw(MemoryError("injected")) \
            if x.shape[0] > 2 else inner(x, y)
    hook = batching.OOMBackoff(8)
    res = _run(tcfg, [hook], fail_above_2)
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert [h["micro_batch_size"] for h in res.history] == [2, 2, 2]
    assert [h["oom_backoffs"] for h in res.history] == [2, 0, 0] and hook.backoffs == 2
    np.testing.assert_allclose(res.losses, plain.losses, rtol=1e-5)
    for k, p in plain.model.params.items():
        np.testing.assert_allclose(res.model.params[k], p, rtol=1e-4, atol=1e-6, err_msg=k)


def test_oom_at_micro_batch_one_is_a_clear_error():
    def always(model):
        model.loss_and_grads = lambda x, y: (_ for _ in ()).throw(MemoryError("injected"))
    with pytest.raises(MemoryError, match="micro-batch 1"):
        _run(TrainConfig(steps=1, batch_size=4, seq_len=16, eval_interval=0),
             [batching.OOMBackoff(4)], always)


def test_accumulation_equals_the_big_batch():
    big = _run(TrainConfig(steps=3, batch_size=8, seq_len=16, eval_interval=0))
    acc = _run(TrainConfig(steps=3, batch_size=8, seq_len=16, eval_interval=0, micro_batch_size=3))
    np.testing.assert_allclose(acc.losses, big.losses, rtol=1e-5)


# --- length buckets -------------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(1, 300), min_size=1, max_size=200), st.integers(1, 16))
@example([1, 2, 1], 2)       # the short batch goes first here: [2], [1, 1] pads nothing
@example([10, 9, 9, 1], 3)   # ... and last here: [10, 9, 9], [1]
def test_buckets_cover_every_sequence_once_and_waste_less(lengths, B):
    lengths = np.array(lengths)
    buckets = batching.bucket_batches(lengths, B)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    assert all(len(b) <= B for b in buckets)
    # sorting (longest first) minimises the padded slots of any split into batches of B
    assert batching.padding_waste(buckets, lengths) <= \
        batching.padding_waste(batching.random_batches(lengths, B), lengths) + 1e-12


# --- serving: continuous batching ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return mm.GPT(TINY, seed=3)


workloads = st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 6)),
                     min_size=1, max_size=9)


def _serve(model, work, max_batch, policy="continuous", temperature=0.0):
    """Submit ``work`` [(prompt length, new tokens, arrival step)] -> (server, handles, prompts)."""
    rng = np.random.default_rng(len(work))
    prompts = [rng.integers(0, model.config.vocab_size, p) for p, _, _ in work]
    server = batching.Server(model, max_batch=max_batch, policy=policy)
    handles, step = {}, 0
    while len(handles) < len(work) or server.step():
        for i, (_, n, arrive) in enumerate(work):
            if i not in handles and arrive <= step:
                handles[i] = server.submit(prompts[i], n, temperature=temperature, seed=i)
        step += 1
    return server, handles, prompts


@FAST
@given(workloads, st.integers(1, 4), st.sampled_from(["continuous", "static"]))
def test_continuous_equals_each_prompt_alone(tiny_model, work, max_batch, policy):
    server, handles, prompts = _serve(tiny_model, work, max_batch, policy)
    for i, (_, n, _) in enumerate(work):
        alone = generation.generate(tiny_model, prompts[i][None], n, temperature=0.0)[0]
        np.testing.assert_array_equal(server.result(handles[i]), alone)
    assert all(r is None for r in server.rows) and (server.cache.lengths == 0).all()
    assert all(len(t) == max_batch for t in server.timeline)         # (one request id per row)


@pytest.mark.parametrize("kind", [dict(attention="linear"), dict(attention="window", window=8)])
def test_other_attention_kinds_schedule_through_the_same_api(kind):
    """Rows of other decode states (a ring buffer, a recurrent state) join and leave too."""
    model = mm.GPT(mm.GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32, **kind),
                   seed=2)
    work = [(7, 12, 0), (19, 5, 0), (1, 20, 1), (12, 9, 2), (3, 3, 2)]
    server, handles, prompts = _serve(model, work, 2)
    for i, (_, n, _) in enumerate(work):
        alone = generation.generate(model, prompts[i][None], n, temperature=0.0)[0]
        np.testing.assert_array_equal(server.result(handles[i]), alone)


def test_sampled_requests_equal_alone_with_their_seed(tiny_model):
    work = [(5, 12, 0), (17, 4, 0), (2, 20, 1), (9, 9, 3)]
    server, handles, prompts = _serve(tiny_model, work, 2, temperature=0.9)
    for i, (_, n, _) in enumerate(work):
        alone = generation.generate(tiny_model, prompts[i][None], n, temperature=0.9, seed=i)[0]
        np.testing.assert_array_equal(server.result(handles[i]), alone)


def test_continuous_fills_rows_that_static_leaves_idle(tiny_model):
    work = [(4, 30, 0), (4, 2, 0), (4, 2, 0), (4, 2, 0)]
    steps = {p: len(_serve(tiny_model, work, 2, p)[0].timeline) for p in ("continuous", "static")}
    assert steps["continuous"] < steps["static"]


@pytest.mark.parametrize("kind", [dict(), dict(attention="linear"), dict(attention="window", window=8)])
def test_packed_prefill_fills_each_row_as_its_own_prefill(kind):
    """Prompts laid end to end in one pass leave each row (state and length) and its
    logits as ``kv_cache.prefill`` of that prompt alone; the rows not named are untouched."""
    model = mm.GPT(mm.GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32, **kind),
                   seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 61, n) for n in (7, 1, 19, 4)]
    rows = [3, 0, 2, 4]
    cache = kv_cache.KVCache.for_model(model, 6, 40)
    before = [tuple(a[[1, 5]].copy() for a in state) for state in cache.layers]
    logits = batching.prefill_packed(model, cache, rows, prompts)
    for r, p, lg in zip(rows, prompts, logits):
        alone = kv_cache.KVCache.for_model(model, 1, 40)
        want = kv_cache.prefill(model, alone, p[None])
        np.testing.assert_allclose(lg, want[0], rtol=1e-5, atol=1e-5)
        assert cache.lengths[r] == len(p)
        for state, ref in zip(cache.layers, alone.layers):
            for a, b in zip(state, ref):
                np.testing.assert_allclose(a[r], b[0], rtol=1e-5, atol=1e-5)
    assert cache.lengths[[1, 5]].tolist() == [0, 0]
    for state, old in zip(cache.layers, before):
        for a, b in zip(state, old):
            np.testing.assert_array_equal(a[[1, 5]], b)


def test_continuous_decodes_only_running_rows_and_static_its_batch(tiny_model):
    """Continuous: each step runs as many rows as requests are running (a request
    moves into a freed row when no newcomer takes it); static runs its whole batch."""
    work = [(6, 3, 0), (9, 14, 0), (3, 2, 0), (12, 10, 0), (5, 6, 0)]
    for policy in ("continuous", "static"):
        server, handles, prompts = _serve(tiny_model, work, 4, policy)
        for i, (_, n, _) in enumerate(work):
            alone = generation.generate(tiny_model, prompts[i][None], n, temperature=0.0)[0]
            np.testing.assert_array_equal(server.result(handles[i]), alone)
        busy = sum(sum(r >= 0 for r in t) for t in server.timeline)
        if policy == "continuous":
            assert server.rows_run == busy
            assert all(all(r >= 0 for r in t[:sum(r >= 0 for r in t)]) for t in server.timeline)
        else:
            assert server.rows_run > busy
        assert server.prefill_passes == 2                # the first four prompts in one pass


def test_memory_budget_caps_the_rows(tiny_model):
    need = [batching.memory_model(TINY, b, TINY.block_size, "decode")["total"] for b in (3, 4)]
    server = batching.Server(tiny_model, max_batch=16, memory_budget=need[0] + 1)
    assert server.slots == 3 and server.kv_bytes == batching.memory_model(
        TINY, 3, TINY.block_size, "decode")["kv_cache"]
    with pytest.raises(ValueError, match="batch 1 needs"):
        batching.Server(tiny_model, memory_budget=1000)


@pytest.mark.parametrize("prompt, n, match", [([], 4, "prompt_ids"), (list(range(60)), 5, "context"),
                                              ([1, 2], 0, "max_new_tokens"),
                                              ([1, 999], 3, "prompt_ids")])
def test_submit_rejects_bad_requests(tiny_model, prompt, n, match):
    server = batching.Server(tiny_model, max_batch=2)
    with pytest.raises(ValueError, match=match):
        server.submit(prompt, n)


def test_cancel_frees_the_row(tiny_model):
    server = batching.Server(tiny_model, max_batch=1)
    a, b = server.submit([1, 2, 3], 40), server.submit([4, 5], 3)
    server.step()
    server.cancel(a)
    server.run_until_done()
    assert server.stats(a)["finish_reason"] == "cancelled" and server.stats(b)["new_tokens"] == 3


def test_scheduler_runs_on_the_device_standin():
    cfg = mm.GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cpu = mm.GPT(cfg, seed=1)
    dev = mm.GPT(cfg, seed=1).to("standin")
    assert isinstance(dev.params["wte.weight"], standin.DeviceArray)
    work = [(3, 8, 0), (11, 5, 0), (1, 12, 2), (6, 7, 4)]
    server, handles, prompts = _serve(dev, work, 2)
    assert isinstance(server.cache.layers[0][0], standin.DeviceArray)
    for i, (_, n, _) in enumerate(work):
        alone = generation.generate(cpu, prompts[i][None], n, temperature=0.0)[0]
        np.testing.assert_array_equal(server.result(handles[i]), alone)


# --- the HTTP endpoint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def http():
    from minillm.tokenizer import BPETokenizer
    tok = BPETokenizer.train("In the beginning God created the heaven and the earth. " * 8, 262,
                             progress=False)
    model = mm.GPT(mm.GPTConfig.preset("tiny", vocab_size=262, block_size=512), seed=0)
    server = batching.Server(model, max_batch=2)
    httpd = batching.make_http_server(server, tok, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], server, tok, model
    httpd.shutdown()
    server.stop()


def _post(port, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=data)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def test_http_completion_equals_generate(http):
    port, _, tok, model = http
    status, ctype, body = _post(port, {"prompt": "And God said", "max_tokens": 12, "temperature": 0})
    assert status == 200 and ctype == "application/json"
    out = json.loads(body)
    ids = np.array([tok.encode("And God said")])
    alone = generation.generate(model, ids, 12, temperature=0.0)[0, ids.shape[1]:]
    assert out["choices"][0]["text"] == tok.decode(alone.tolist())
    assert out["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": 12,
                            "total_tokens": ids.shape[1] + 12}
    assert out["choices"][0]["finish_reason"] == "length"


def test_http_stream_sends_events_then_done(http):
    port, _, tok, _ = http
    status, ctype, body = _post(port, {"prompt": "In the", "max_tokens": 6, "temperature": 0,
                                       "stream": True})
    assert status == 200 and ctype == "text/event-stream"
    lines = [ln for ln in body.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = json.loads(_post(port, {"prompt": "In the", "max_tokens": 6, "temperature": 0})[2])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


@pytest.mark.parametrize("body, match", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
    ({"prompt": "In", "max_tokens": 4, "temprature": 0}, "unknown fields"),
    ({"prompt": "", "max_tokens": 4}, "prompt"), ({"prompt": 7}, "prompt"),
    ({"prompt": "In the " * 300}, "context"), ({"prompt": "In", "max_tokens": 600}, "max_tokens"),
    ({"prompt": "In", "temperature": -1}, "temperature"), ({"prompt": "In", "stream": "yes"}, "stream")])
def test_http_bad_requests_are_json_400s_and_the_server_keeps_serving(http, body, match):
    port = http[0]
    status, ctype, text = _post(port, body)
    assert status == 400 and ctype == "application/json"
    err = json.loads(text)["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"
    assert _post(port, {"prompt": "In", "max_tokens": 2})[0] == 200


def test_http_client_that_disconnects_frees_its_row(http):
    port, server, _, _ = http
    body = json.dumps({"prompt": "In", "max_tokens": 500, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:                          # streaming has begun
            got += sock.recv(4096)
    h = max(server.requests)
    deadline = time.time() + 30
    while not server.requests[h].done and time.time() < deadline:
        time.sleep(0.01)
    assert server.stats(h)["finish_reason"] == "cancelled" and server.stats(h)["new_tokens"] < 500
    assert server.requests[h].slot is None
    assert _post(port, {"prompt": "In", "max_tokens": 2})[0] == 200


# --- the CLI --------------------------------------------------------------------------------
def test_cli_train_auto_fits_the_budget(tmp_path, capsys):
    from minillm.cli import main
    args = ["train", "--preset", "tiny", "--steps", "1", "--seq-len", "16", "--eval-batches", "1",
            "--max-chars", "3000", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args + ["--batch-size", "auto", "--memory-budget", "16MiB"]) == 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    B = meta["train_config"]["batch_size"]
    assert B == batching.find_batch_size(TINY, 16, 16 * 2**20, 1024) and B > 8
    assert meta["history"][0]["micro_batch_size"] == B
    assert main(args + ["--batch-size", "auto"]) == 2
    assert "needs --memory-budget" in capsys.readouterr().err
    assert main(args + ["--batch-size", "auto", "--memory-budget", "1 GB?"]) == 2
    assert "--memory-budget='1 GB?'" in capsys.readouterr().err
    assert main(args + ["--batch-size", "auto", "--memory-budget", "10KiB"]) == 2
    assert "batch 1 needs" in capsys.readouterr().err
