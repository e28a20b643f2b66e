"""Sampling semantics checked against transformers' logits processors (generation/logits_process.py), on torch."""

import numpy as np
import pytest

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.sampling import (
    Sampler,
    SamplingConfig,
    apply_repetition_penalty,
    filter_logits,
    logits_to_probs,
    make_sampler,
    sample,
)

torch = pytest.importorskip("torch")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_scores(logits, temperature=1.0, top_k=0, top_p=1.0, previous_ids=None, penalty=1.0):
    """Processed scores the way generate() builds its list: penalty, then temperature, top-k, top-p."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    ids = torch.zeros((len(logits), 0), dtype=torch.long) if previous_ids is None else torch.as_tensor(previous_ids)
    return procs(ids, torch.tensor(logits, dtype=torch.float32)).numpy()


def hf_probs(*args, **kwargs):
    return torch.softmax(torch.tensor(hf_scores(*args, **kwargs)), dim=-1).numpy()


SETTINGS = [  # (temperature, top_k, top_p)
    (0.7, 20, 0.8), (1.0, 0, 1.0), (1.0, 5, 1.0), (0.5, 0, 0.9), (1.3, 50, 0.95), (0.7, 1, 0.8),
    (2.0, 0, 0.3), (0.9, 1000, 0.999), (0.7, 20, 1e-6),
]  # fmt: skip


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filters_match_transformers_on_random_logits(temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)  # (B, V)
    ours = filter_logits(logits, temperature, top_k, top_p)
    ref = hf_scores(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(ours, ref)  # same float32 division, same survivors
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs, hf_probs(logits, temperature, top_k, top_p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 7, 1.0), (0.7, 20, 1.0), (1.0, 1, 1.0), (0.7, 3, 0.9)])
def test_top_k_keeps_every_tie(temperature, top_k, top_p):
    rng = np.random.default_rng(2)
    logits = rng.integers(-4, 4, size=(8, 60)).astype(np.float32)  # many ties
    if top_p == 1.0:
        ours = filter_logits(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(ours, hf_scores(logits, temperature, top_k, top_p))
    kept = np.isfinite(filter_logits(logits, 1.0, top_k)).sum(axis=1)
    assert (kept >= top_k).all() and (kept > top_k).any()  # ties with the k-th value survive


def test_top_p_ties():
    """Off the boundary, ties give exactly transformers' result; a tie group straddling the cut is kept whole
    here, while transformers drops an arbitrary part of it (torch.sort is not stable)."""
    rng = np.random.default_rng(3)
    same = straddle = 0
    for _trial in range(200):
        logits = rng.integers(-3, 3, size=(1, 24)).astype(np.float32)
        top_p = float(rng.uniform(0.05, 0.97))
        ours = np.isfinite(filter_logits(logits, 0.8, 0, top_p))[0]
        ref = np.isfinite(hf_scores(logits, 0.8, 0, top_p))[0]
        assert (ours >= ref).all()  # never drops a token transformers keeps
        extra = ours & ~ref
        if extra.any():
            straddle += 1
            boundary = logits[0][ours].min()
            assert (logits[0][extra] == boundary).all() and (logits[0][ref] == boundary).any()
        else:
            same += 1
    assert same > 50 and straddle > 5


def test_top_p_keeps_at_least_one_token():
    logits = np.array([[0.0, 0.0, 10.0, 1.0]], dtype=np.float32)
    assert np.isfinite(filter_logits(logits, 1.0, 0, 1e-9)).sum() == 1
    np.testing.assert_array_equal(filter_logits(logits, 1.0, 0, 1e-9), hf_scores(logits, 1.0, 0, 1e-9))


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 500)) * 4).astype(np.float32)
    previous = rng.integers(0, 500, size=(3, 40))
    previous[:, :5] = previous[:, 5:10]  # repeats count once
    ours = apply_repetition_penalty(logits, previous, penalty)
    np.testing.assert_array_equal(ours, hf_scores(logits, previous_ids=previous, penalty=penalty))
    assert ours is not logits and not np.shares_memory(ours, logits)


def test_repetition_penalty_inputs():
    logits = np.array([[2.0, -2.0, 1.0, 0.0]], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 7, -1], 2.0)  # one row's history as a flat list; 7 and -1 ignored
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, 0.0]])
    np.testing.assert_array_equal(out, hf_scores(logits, previous_ids=[[0, 1, 1, 7]], penalty=2.0))
    ragged = apply_repetition_penalty(np.tile(logits, (2, 1)), [[0], [1, 2]], 2.0)
    np.testing.assert_array_equal(ragged, [[1.0, -2.0, 1.0, 0.0], [2.0, -4.0, 0.5, 0.0]])
    with pytest.raises(UserError, match="rows"):
        apply_repetition_penalty(np.tile(logits, (2, 1)), [[0]], 2.0)


def test_full_pipeline_matches_transformers():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((2, 300)) * 3).astype(np.float32)
    previous = rng.integers(0, 300, size=(2, 25))
    ours = logits_to_probs(apply_repetition_penalty(logits, previous, 1.2), 0.7, 20, 0.8)
    ref = hf_probs(logits, 0.7, 20, 0.8, previous_ids=previous, penalty=1.2)
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_greedy_is_argmax():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((5, 100)).astype(np.float32)
    logits[0, [3, 9]] = 50.0  # tie: the first index wins, as torch.argmax / np.argmax
    expected = logits.argmax(axis=1)
    assert expected[0] == 3
    greedy = [SamplingConfig(no_sample=True), SamplingConfig(temperature=0.0)]
    greedy.append(SamplingConfig(no_sample=True, temperature=5.0))
    for config in greedy:
        ids = sample(logits, config, np.random.default_rng(0))
        assert ids.dtype == np.int64 and ids.shape == (5,)
        np.testing.assert_array_equal(ids, expected)
    penalised = sample(logits, SamplingConfig(no_sample=True, repetition_penalty=100.0), None, previous_ids=[[3]] * 5)
    assert penalised[0] == 9  # the penalty applies in greedy mode too, as in generate()
    np.testing.assert_array_equal(filter_logits(logits, 0.0).argmax(axis=1), expected)
    assert (np.isfinite(filter_logits(logits, 0.0)).sum(axis=1) == 1).all()


def test_same_seed_same_tokens_different_seed_different():
    rng = np.random.default_rng(7)
    steps = [rng.standard_normal((2, 1000)).astype(np.float32) for _ in range(50)]

    def run(seed):
        sampler = Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return np.stack([sampler(x) for x in steps])

    np.testing.assert_array_equal(run(123), run(123))
    assert not np.array_equal(run(123), run(124))
    sampler = Sampler(SamplingConfig(seed=5))
    first = [sampler(x) for x in steps[:5]]
    sampler.reset()
    np.testing.assert_array_equal(first, [sampler(x) for x in steps[:5]])


def test_empirical_frequencies_match_filtered_distribution():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((1, 40)).astype(np.float32) * 2
    config = SamplingConfig(temperature=0.9, top_k=12, top_p=0.9, seed=0)
    probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)[0].astype(np.float64)
    n = 200_000
    ids = Sampler(config)(np.repeat(logits, n, axis=0))  # (n,) one draw per row
    counts = np.bincount(ids, minlength=40)
    assert counts[probs == 0].sum() == 0  # filtered tokens never appear
    kept = probs > 0
    expected = n * probs[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    dof = kept.sum() - 1
    assert 2 <= dof <= 11
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)  # far beyond the 99.9th percentile


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_validate_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        SamplingConfig(**kwargs).validate()
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        Sampler(SamplingConfig(**kwargs))


def test_defaults_validate():
    config = SamplingConfig()
    assert config.validate() is config
    knobs = (config.temperature, config.top_k, config.top_p, config.no_sample, config.repetition_penalty)
    assert knobs == (0.7, 20, 0.8, False, 1.0)
    assert not config.greedy and SamplingConfig(temperature=0.0).greedy


def test_make_sampler():
    logits = np.zeros((3, 10), dtype=np.float32)
    assert isinstance(make_sampler(), Sampler)
    assert make_sampler(SamplingConfig(no_sample=True))(logits).tolist() == [0, 0, 0]
    sampler = Sampler()
    assert make_sampler(sampler) is sampler

    def last_token(logits, previous_ids):
        return [logits.shape[1] - 1] * logits.shape[0]

    custom = make_sampler(last_token)
    out = custom(logits, None)
    assert out.dtype == np.int64 and out.tolist() == [9, 9, 9]
    with pytest.raises(UserError, match="custom sampler"):
        make_sampler(lambda logits, prev: [1])(logits, None)
    with pytest.raises(UserError, match="SamplingConfig"):
        make_sampler(42)


def test_logits_shape_error():
    with pytest.raises(UserError, match="logits\\[:, -1\\]"):
        sample(np.zeros((1, 4, 10)), SamplingConfig(), np.random.default_rng(0))
