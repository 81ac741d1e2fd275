"""Sampling properties: top-k stays in the k most likely, the top-p set is the smallest
whose mass reaches p, greedy is argmax, seeds reproduce, rows draw independently."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import sampling


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


logit_rows = st.integers(2, 30).flatmap(lambda V: st.lists(
    st.floats(-5, 5, allow_nan=False), min_size=V, max_size=V).map(np.array))


@given(z=logit_rows, data=st.data(), seed=st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=30)
def test_top_k_never_samples_outside_the_k_most_likely(z, data, seed):
    k = data.draw(st.integers(1, len(z)))
    kth = np.sort(z)[-k]                         # ties at the k-th value are all allowed
    ids = sampling.sample_next(np.tile(z, (200, 1)), 1.0, top_k=k,
                               rng=np.random.default_rng(seed))
    assert (z[ids] >= kth).all()


@given(z=logit_rows, p=st.floats(0.01, 1.0))
@settings(deadline=None, max_examples=40)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(z, p):
    kept = np.isfinite(sampling.filter_logits(z[None], top_p=p)[0])
    probs = _softmax(z)
    assert probs[kept].sum() >= p - 1e-12                    # reaches p
    assert probs[kept].min() >= probs[~kept].max(initial=0)  # the most likely ids
    smaller = probs[kept].sum() - probs[kept].min()          # drop the least likely kept id
    assert kept.sum() == 1 or smaller < p + 1e-12            # ... and it no longer reaches p


def test_greedy_is_argmax_and_seeds_reproduce():
    z = np.random.default_rng(0).standard_normal((4, 50))
    np.testing.assert_array_equal(sampling.sample_next(z, 0.0), z.argmax(-1))
    a = sampling.sample_next(z, 1.0, rng=sampling.row_rngs(3, 4))
    b = sampling.sample_next(z, 1.0, rng=sampling.row_rngs(3, 4))
    np.testing.assert_array_equal(a, b)


def test_row_rngs_make_rows_independent_of_the_batch():
    z = np.random.default_rng(1).standard_normal((3, 40))
    batch = sampling.sample_next(z, 1.0, rng=sampling.row_rngs(9, 3))
    for b in range(3):
        alone = sampling.sample_next(z[b:b + 1], 1.0, rng=sampling.row_rngs([[9, b]], 1))
        assert alone[0] == batch[b]


def test_sampling_follows_the_distribution():
    z = np.log(np.array([0.5, 0.3, 0.2]))
    ids = sampling.sample_next(np.tile(z, (20000, 1)), 1.0, rng=np.random.default_rng(0))
    freq = np.bincount(ids, minlength=3) / len(ids)
    # 20000 draws: the standard error of each frequency is <= 0.0036
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.02)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.5), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_args(kw, match):
    args = dict(temperature=1.0, top_k=None, top_p=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sampling.check_sampling_args(**args)


@pytest.mark.parametrize("seed", [[1, 2], -1, 1.5, "x"])
def test_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        sampling.row_rngs(seed, 3)
