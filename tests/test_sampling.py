"""minillm.sampling: greedy, temperature, top-k, top-p, seeded generation, bad arguments."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import GPT, GPTConfig, sampling
from minillm.sampling import check_sampling_args, filter_logits, sample_next

seeds = st.integers(0, 2**32 - 1)
SAMPLING = settings(deadline=None, max_examples=25)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tiny_model(seed=0, V=19, T=16):
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=8), seed=seed)


# --- the filters -------------------------------------------------------------------
@given(seed=seeds, V=st.integers(1, 20), data=st.data())
@SAMPLING
def test_top_k_keeps_exactly_the_k_largest(seed, V, data):
    k = data.draw(st.integers(1, V + 3), label="k")
    logits = np.random.default_rng(seed).standard_normal((3, V)) * 3    # continuous: no ties
    kept = np.isfinite(filter_logits(logits, top_k=k))
    largest = np.argsort(-logits, axis=-1)[:, :min(k, V)]
    expected = np.zeros_like(kept)
    np.put_along_axis(expected, largest, True, axis=-1)
    assert np.array_equal(kept, expected)


@given(seed=seeds, V=st.integers(1, 20), k=st.integers(1, 6),
       temperature=st.sampled_from([0.3, 1.0, 5.0]))
@SAMPLING
def test_top_k_never_samples_outside_the_k_most_likely(seed, V, k, temperature):
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(V) * 2
    ids = sample_next(np.tile(row, (200, 1)), temperature, top_k=k, rng=rng)    # (200,)
    allowed = set(np.argsort(-row)[:k].tolist())
    assert set(ids.tolist()) <= allowed


@given(z=st.integers(2, 30).flatmap(lambda V: st.lists(
    st.floats(-5, 5, allow_nan=False), min_size=V, max_size=V).map(np.array)), data=st.data())
@SAMPLING
def test_top_k_with_ties_keeps_every_id_tied_with_the_kth(z, data):
    k = data.draw(st.integers(1, len(z)), label="k")
    kth = np.sort(z)[-k]
    ids = sample_next(np.tile(z, (200, 1)), 1.0, top_k=k, rng=np.random.default_rng(0))
    assert (z[ids] >= kth).all()


@given(seed=seeds, V=st.integers(1, 20), p=st.floats(0.01, 1.0), scale=st.sampled_from([0.5, 2.0, 8.0]))
@SAMPLING
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(seed, V, p, scale):
    logits = np.random.default_rng(seed).standard_normal((2, V)) * scale
    kept = np.isfinite(filter_logits(logits, top_p=p))
    for row, keep in zip(logits, kept):
        order = np.argsort(-row)
        mass = np.cumsum(softmax(row)[order])                                   # (V,)
        n = int(keep.sum())
        assert keep[order[:n]].all(), "the kept ids are the most likely ones"
        if p < 1.0:
            assert mass[n - 1] >= p - 1e-12, "the kept set reaches p"
            assert n == 1 or mass[n - 2] < p + 1e-12, "no smaller set reaches p"
        else:
            assert n == V


def test_top_p_worked_example():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    for p, n in [(0.3, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        kept = np.isfinite(filter_logits(logits, top_p=p))[0]
        assert kept.tolist() == [i < n for i in range(4)], (p, kept)


def test_filters_do_not_change_their_input():
    logits = np.arange(6.0)[None]
    before = logits.copy()
    filter_logits(logits, top_k=2, top_p=0.5)
    assert np.array_equal(logits, before)


# --- sampling ------------------------------------------------------------------------
@given(seed=seeds, B=st.integers(1, 4), V=st.integers(1, 30))
@settings(deadline=None, max_examples=20)
def test_greedy_is_argmax(seed, B, V):
    logits = np.random.default_rng(seed).standard_normal((B, V))
    ids = sample_next(logits, temperature=0, top_k=3, top_p=0.5)
    assert np.array_equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.0, None, 0.7),
    (0.8, 4, 0.9)])
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    """Inverse-CDF sampling draws id i with probability softmax(filter(logits / t))_i."""
    rng = np.random.default_rng(0)
    row = rng.standard_normal(6) * 1.5
    probs = softmax(filter_logits(row[None] / temperature, top_k, top_p))[0]
    n = 40_000
    ids = sample_next(np.tile(row, (n, 1)), temperature, top_k, top_p, rng=rng)
    freq = np.bincount(ids, minlength=6) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-12), (freq, probs)


def test_sample_next_accepts_float32_logits_and_returns_ints(rng):
    ids = sample_next(rng.standard_normal((3, 7)).astype(np.float32), 1.0, rng=rng)
    assert ids.shape == (3,) and ids.dtype.kind == "i" and ids.min() >= 0 and ids.max() < 7


def test_seeded_row_rngs_reproduce():
    z = np.random.default_rng(0).standard_normal((4, 50))
    a = sample_next(z, 1.0, rng=sampling.row_rngs(3, 4))
    assert np.array_equal(a, sample_next(z, 1.0, rng=sampling.row_rngs(3, 4)))


def test_row_rngs_make_rows_independent_of_the_batch():
    z = np.random.default_rng(1).standard_normal((3, 40))
    batch = sample_next(z, 1.0, rng=sampling.row_rngs(9, 3))
    for b in range(3):
        alone = sample_next(z[b:b + 1], 1.0, rng=sampling.row_rngs([[9, b]], 1))
        assert alone[0] == batch[b]


# --- generate (no cache) ---------------------------------------------------------------
def test_generate_greedy_equals_an_argmax_loop():
    model = tiny_model()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, max_new_tokens=6, temperature=0, use_cache=False)
    ref = prompt.copy()
    for _ in range(6):
        nxt = model.forward(ref)[:, -1].argmax(-1)
        ref = np.concatenate([ref, nxt[:, None]], axis=1)
    assert np.array_equal(out, ref)


def test_generate_shape_prefix_and_range():
    model = tiny_model()
    prompt = np.array([[3, 1], [0, 18]])
    out = model.generate(prompt, max_new_tokens=7, temperature=1.0, top_k=5, seed=3, use_cache=False)
    assert out.shape == (2, 9)
    assert np.array_equal(out[:, :2], prompt)
    assert out.min() >= 0 and out.max() < 19
    assert np.array_equal(model.generate(prompt, max_new_tokens=0, use_cache=False), prompt)


def test_generate_is_deterministic_per_seed():
    model = tiny_model(V=64, T=32)
    prompt = np.array([[1, 2, 3]])
    kw = dict(max_new_tokens=25, temperature=1.5, use_cache=False)
    a = model.generate(prompt, seed=5, **kw)
    assert np.array_equal(a, model.generate(prompt, seed=5, **kw))
    assert not np.array_equal(a, model.generate(prompt, seed=6, **kw))


def test_generate_stops_at_eos():
    model = tiny_model()
    prompt = np.array([[1, 2, 3]])
    first = int(model.generate(prompt, max_new_tokens=1, temperature=0, use_cache=False)[0, -1])
    out = model.generate(prompt, max_new_tokens=8, temperature=0, use_cache=False, eos_id=first)
    assert out.tolist() == [[1, 2, 3, first]]


def test_generate_fills_finished_rows_with_eos():
    model = tiny_model(V=64, T=32)
    prompt = np.array([[1, 2, 3], [7, 8, 9]])
    out = model.generate(prompt, max_new_tokens=12, temperature=2.0, seed=1, use_cache=False, eos_id=5)
    for row in out[:, 3:]:
        hits = np.flatnonzero(row == 5)
        if hits.size:
            assert np.all(row[hits[0]:] == 5)


# --- bad arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.3}, "top_p"),
    ({"top_p": "all"}, "top_p"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
])
def test_bad_sampling_arguments_name_themselves(kwargs, name):
    args = {"temperature": 1.0, "top_k": None, "top_p": None, "max_new_tokens": 3} | kwargs
    with pytest.raises(ValueError, match=name):
        check_sampling_args(**args)
    with pytest.raises(ValueError, match=name):
        tiny_model().generate(np.array([[1]]), use_cache=False, **args)


@pytest.mark.parametrize("seed", [[1, 2], -1, 1.5, "x", True])
def test_bad_seeds_name_themselves(seed):
    with pytest.raises(ValueError, match="seed"):
        sampling.row_rngs(seed, 3)
    with pytest.raises(ValueError, match="seed"):
        tiny_model().generate(np.zeros((3, 1), int), max_new_tokens=1, seed=seed, use_cache=False)


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1.0}, {"top_p": 1e-9}, {"temperature": 0}])
def test_edge_values_are_accepted(kwargs):
    args = {"temperature": 1.0, "top_k": None, "top_p": None} | kwargs
    check_sampling_args(**args)
    out = tiny_model().generate(np.array([[1]]), max_new_tokens=2, use_cache=False, **args)
    assert out.shape == (1, 3)


def test_generate_beyond_block_size_is_refused():
    model = tiny_model(T=8)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(np.zeros((1, 5), int), max_new_tokens=4, use_cache=False)
    with pytest.raises(ValueError, match="idx"):
        model.generate(np.array([[1, 99]]), max_new_tokens=1, use_cache=False)


# --- with the KV cache (minillm.kv_cache; skipped until it exists) ----------------------------
@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": 1.0, "seed": 4},
                                    {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 2}])
def test_cached_generation_equals_uncached(kwargs):
    pytest.importorskip("minillm.kv_cache")
    model = tiny_model(V=31, T=24)
    prompt = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    a = model.generate(prompt, max_new_tokens=10, use_cache=True, **kwargs)
    b = model.generate(prompt, max_new_tokens=10, use_cache=False, **kwargs)
    assert np.array_equal(a, b)
