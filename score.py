"""
score.py: how well a model predicts given text, the one computation behind train.py's val bits per
byte, eval.py's perplexity, multiple choice and LAMBADA, and serve.py's prompt scoring and echo.

Padded batches. Sequences of different lengths become one (N, T) batch by right padding: the model is
causal, so a position never reads the padding after it, and every real position's output is the one
it has alone (up to rounding). finetune.py's batches are built the same way.

Log-probabilities of targets. Each scored position's hidden state goes through the head and a float32
log-softmax over the whole vocabulary (model.log_probs), and the target's entry is read off. That is
an (N, V) float32 matrix, 400 MB for 2,048 positions of GPT-2's 50,257 tokens, so positions go through
it CHUNK at a time and only one chunk's matrix exists at once. Each position's softmax is its own, so
the chunk size changes no score beyond a matmul's last-bit rounding (a test checks chunks that split a
sequence against one full softmax).

Bits per byte. Nats per token depend on the tokenizer: a bigger vocabulary has fewer, harder tokens.
Dividing the total nats by ln 2 and by the UTF-8 bytes the scored tokens spell (a special token spells
none: Tokenizer.token_byte_lengths) gives bits per byte of text, which compare across tokenizers.
"""
import math

import numpy as np
import torch

# positions per log-softmax: (512, V) float32 is 103 MB at GPT-2's vocabulary (twice that at the peak,
# logits and log-probabilities), small beside a model and serve.py's KV cache on any device, and big
# enough that the head's matmul is no faster in bigger chunks (4,096 timed the same on a CPU)
CHUNK = 512


def pad_right(seqs, value=0):
    """Token sequences (lists or arrays) of different lengths -> (N, T) int64, T the longest, each row
    followed by `value` up to T (causal: the padding is read by no earlier position)."""
    x = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return x


def log_prob_chunks(model, h, targets, chunk=CHUNK):
    """h (N, C) hidden states, targets (N,) the id each position predicts. Yields, for the positions
    a..a+n-1 of each chunk: (a, their log-probabilities (n, V) float32, the targets' among them (n,))."""
    for a in range(0, len(h), chunk):
        lp = model.log_probs(h[a:a + chunk])  # (n, V)
        yield a, lp, lp.gather(1, targets[a:a + chunk, None])[:, 0]


def target_log_probs(model, h, targets, chunk=CHUNK):
    """h (N, C), targets (N,) -> (log-probability of each target (N,) float32, is it the argmax? (N,) bool)."""
    logp, greedy = [], []
    for a, lp, chosen in log_prob_chunks(model, h, targets, chunk):
        logp.append(chosen)
        greedy.append(lp.argmax(-1) == targets[a:a + len(lp)])
    return torch.cat(logp), torch.cat(greedy)


def bits_per_byte(nats, nbytes):
    """The total nats of some tokens and the UTF-8 bytes they spell -> bits per byte."""
    return nats / math.log(2) / nbytes
