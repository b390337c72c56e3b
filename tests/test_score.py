"""score.py: padded batches, log-probabilities of targets in chunks, and bits per byte, the scoring that
train.py's evaluation, eval.py and serve.py share. Each is checked against the computation it stands for:
each sequence alone, one full softmax over every position, and a model whose every guess costs a known
number of bits."""
import math

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from score import CHUNK, bits_per_byte, log_prob_chunks, pad_right, target_log_probs

PRESETS = ("gpt1", "gpt2", "modern")  # learned positions, post- and pre-norm, RoPE
SEQS = [[5, 9, 2, 7, 7, 1, 3], [4, 8], [6, 1, 1, 0, 2]]  # scored positions 0-5, 6 and 7-10


def tiny(name="gpt2", **kw):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, dropout=0.0)
    return GPT(GPTConfig.preset(name, **{**args, **kw})).eval()


def test_pad_right_pads_after_each_sequence_with_the_value():
    x = pad_right([[1, 2, 3], np.array([4], dtype=np.uint16), []], value=9)
    assert x.dtype == torch.long and x.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_right_padded_row_reads_as_its_sequence_alone(preset):
    model = tiny(preset)
    with torch.no_grad():
        batch = model.hidden_states(pad_right(SEQS))  # (3, 7, C)
        for i, s in enumerate(SEQS):
            alone = model.hidden_states(torch.tensor([s]))[0]
            torch.testing.assert_close(batch[i, :len(s)], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[1, 1], batch[2, 1])  # rows differ: the comparison could fail


def scored(model):
    """The hidden states of SEQS' scored positions, flattened as eval.py flattens them, their targets,
    and the reference: each sequence alone through forward, one full log-softmax, the targets read off."""
    with torch.no_grad():
        h = model.hidden_states(pad_right([s[:-1] for s in SEQS]))
        hs = torch.cat([h[i, :len(s) - 1] for i, s in enumerate(SEQS)])  # (11, C)
        targets = torch.tensor([t for s in SEQS for t in s[1:]])
        full = torch.cat([model(torch.tensor([s[:-1]]))[0][0].log_softmax(-1) for s in SEQS])  # (11, V)
    return hs, targets, full


# chunk sizes whose boundaries split the first sequence (3, 4) or the third (3, 4, 9), fall only between
# sequences (6, 7), after every position (1), or nowhere (11: exactly the positions; CHUNK: the default)
@pytest.mark.parametrize("chunk", [1, 3, 4, 6, 7, 9, 11, CHUNK])
def test_chunked_log_probs_equal_one_full_softmax(chunk):
    model = tiny()
    hs, targets, full = scored(model)
    with torch.no_grad():
        logp, greedy = target_log_probs(model, hs, targets, chunk)
        starts = [a for a, _, _ in log_prob_chunks(model, hs, targets, chunk)]
    want = full.gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(greedy, full.argmax(-1) == targets)
    assert starts == list(range(0, len(hs), chunk))
    assert logp.dtype == torch.float32 and len(set(logp.tolist())) == len(logp) and bool((logp < 0).all())


def test_greedy_marks_the_targets_the_model_would_pick():
    model = tiny()
    hs, targets, full = scored(model)
    best = full.argmax(-1)
    mixed = torch.where(torch.arange(len(targets)) % 2 == 0, best, targets)  # every other target the best
    with torch.no_grad():
        _, greedy = target_log_probs(model, hs, mixed, chunk=3)
    assert torch.equal(greedy, (torch.arange(len(targets)) % 2 == 0) | (targets == best))
    assert bool(greedy.any()) and not bool(greedy.all())


# a model that knows nothing (all logits equal) pays log2(V) bits for every token; a token of b bytes
# makes that log2(V) / b bits per byte: 256 byte tokens, 8 bits per byte, as raw bytes cost
@pytest.mark.parametrize("vocab_size, bytes_per_token, want", [(256, 1, 8.0), (256, 2, 4.0), (4096, 3, 4.0)])
def test_bits_per_byte_of_a_uniform_guess(vocab_size, bytes_per_token, want):
    model = tiny(vocab_size=vocab_size, tie_weights=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform guess
        hs, targets, _ = scored(model)
        logp, _ = target_log_probs(model, hs, targets, chunk=4)
    nats = -float(logp.sum())
    assert nats == pytest.approx(len(targets) * math.log(vocab_size), rel=1e-6)
    assert bits_per_byte(nats, bytes_per_token * len(targets)) == pytest.approx(want, rel=1e-6)
