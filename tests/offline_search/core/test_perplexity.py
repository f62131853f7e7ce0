import math

import pytest
import torch

from offline_search.core.perplexity import perplexity, unigram_perplexity, window_nll, windows


def test_windows_drop_the_tail_and_honour_the_limit():
    tokens = torch.arange(10)
    assert windows(tokens, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(tokens, 3, limit=2).shape == (2, 3)
    with pytest.raises(ValueError, match=r"10 tokens make no window of 11"):
        windows(tokens, 11)
    with pytest.raises(ValueError, match=r"seq_len=1 must be >= 2"):
        windows(tokens, 1)


def test_uniform_logits_give_the_vocabulary_size():
    vocab = 7
    batch = torch.randint(0, vocab, (2, 5))
    nll = window_nll(torch.zeros(2, 5, vocab), batch)
    assert torch.allclose(nll, torch.full((2,), 4 * math.log(vocab)))
    ppl = perplexity(lambda b: window_nll(torch.zeros(*b.shape, vocab), b), [batch, batch[:1]])
    assert ppl == pytest.approx(vocab)


def test_a_sure_model_has_perplexity_one():
    batch = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token with certainty
    assert perplexity(lambda b: window_nll(logits, b), [batch]) == pytest.approx(1.0)


def test_unigram_perplexity_by_hand():
    # counts + 1 over vocab 2: token 0 seen 3 times -> p = 4/5; token 1 never -> p = 1/5
    train = torch.tensor([0, 0, 0])
    test = torch.tensor([0, 1])
    assert unigram_perplexity(train, test, 2) == pytest.approx(1 / math.sqrt(0.8 * 0.2))  # 2.5
