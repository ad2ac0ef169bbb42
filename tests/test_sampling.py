import numpy as np
import pytest

from keraslm.errors import UsageError
from keraslm.sampling import GreedySampler, Sampler, TopKSampler, TopPSampler, generate, make_sampler
from keraslm.vocab import Vocabulary

VOCAB = Vocabulary("char", list("abcdefghij"))


def one_hot_logits(ids, size=10, high=10.0):
    logits = np.zeros((len(ids), size))
    logits[np.arange(len(ids)), ids] = high
    return logits


def test_greedy_picks_the_argmax_of_each_row():
    assert GreedySampler()(one_hot_logits([3, 7]), None).tolist() == [3, 7]


def test_temperature_zero_is_greedy():
    assert isinstance(make_sampler(temperature=0), GreedySampler)


def test_top_k_only_draws_among_the_k_best():
    logits = np.log(np.array([[0.05, 0.4, 0.3, 0.25]]))
    sampler = TopKSampler(2)
    draws = {int(sampler(logits, np.random.default_rng(s))[0]) for s in range(200)}
    assert draws == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.05, 0.5, 0.3, 0.15]]))
    draws = {int(TopPSampler(0.7)(logits, np.random.default_rng(s))[0]) for s in range(200)}
    assert draws == {1, 2}  # 0.5 < 0.7 ≤ 0.5 + 0.3
    assert TopPSampler(0.01)(logits, np.random.default_rng(0)).tolist() == [1]


def test_top_k_and_top_p_combine_top_k_first():
    # Once refused; now the rule of keraslm.sampling: the nucleus of the top k, renormalised.
    # The top 3 renormalised are 4/9, 3/9, 2/9: 0.75 needs two of them (alone it would need three).
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    sampler = make_sampler(temperature=1.0, top_k=3, top_p=0.75)
    draws = {int(sampler(logits, np.random.default_rng(s))[0]) for s in range(200)}
    assert draws == {0, 1}
    np.testing.assert_allclose(sampler.probabilities(logits), [[4 / 7, 3 / 7, 0, 0]])


def test_sampling_follows_the_distribution_and_the_seed():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rng = np.random.default_rng(0)
    counts = np.bincount([Sampler()(logits, rng)[0] for _ in range(5000)], minlength=3) / 5000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)
    a = [Sampler(0.8)(logits, np.random.default_rng(42))[0] for _ in range(5)]
    b = [Sampler(0.8)(logits, np.random.default_rng(42))[0] for _ in range(5)]
    assert a == b


def test_generate_carries_the_state_and_produces_the_expected_string():
    # A step that predicts "the previous token + state", so the output depends on the state.
    def step(tokens, state):
        nxt = (tokens[:, -1] + 1 + state) % 10
        return one_hot_logits(nxt)[:, None, :], state + 0

    prompt = VOCAB.encode("ab")[None, :]
    out = generate(step, prompt, np.zeros(1, int), 5, GreedySampler(), None)
    assert VOCAB.decode(out[0]) == "cdefg"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_k": -1},
        {"top_p": 0},
        {"top_p": 1.5},
    ],
)
def test_invalid_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError) as raised:
        make_sampler(**kwargs)
    name = next(iter(kwargs))  # named as the argument; the command line words it as the flag
    assert raised.value.name == name and str(raised.value).startswith(f"{name} must be ")
