import math

from keraslm import history


def test_perplexity_stays_within_what_tensorboard_can_log():
    assert history.perplexity(1.0) == math.e
    assert history.perplexity(1e13) == math.inf  # a diverging relu RNN's validation loss
    row = history.epoch_row(1, 2.0, 1e13, 0.1, 100.0, 3.0)
    assert row["val_perplexity"] == math.inf and row["bpc"] == 2.0 / math.log(2)
