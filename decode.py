"""
decode.py: generation. generate_stream and generate are the sampling loop over the model's KV cache
(sample.py, eval.py); sampling_problem, filter_logits and sample_next are the sampling rules every sampler
shares (serve.py, speculative.py). Decoder is the one-token decode step compiled once per shape, for
generate_stream and serve.py, and a speculative round's steps of a few tokens (speculative.py).

Why compile. Eager, a decode step of a small model is mostly dispatch: a hundred small operators, each
launched from Python, for a few kilobytes of arithmetic. torch.compile fuses them into a few C++ loops
(inductor, on a CPU) or Triton kernels, and on CUDA mode="reduce-overhead" records the whole step as a
CUDA graph, replayed with one launch. That pays only if it compiles once: a plain KVCache grows a column
per step, a new shape each time, so compiling it needs dynamic shapes and recompiles inside the
generation being timed.

The static step. model.py's KVCache(static=True) has one shape for a whole generation: a fixed
capacity, written by index at each row's own position, attention over all of it with every row masked
past its own length, and the lengths kept on the model's device and never read back to the host (a
read would wait for the GPU, and a CUDA graph cannot contain one). It is model.hidden_states itself,
the one forward, on such a cache; the checks it cannot make without those reads are made here, from
the lengths the caller knows on the host.

Shapes. A graph is compiled for each shape a step sees: the cache's capacity, rounded up to a power of
two (at most block_size) so prompts of different lengths share one, and the step's rows, rounded up to
a power of two (at most the cache's rows): serve.py's engine pads its batch with idle rows (token 0 at
position 0; their output is dropped). Prefill stays eager: it runs once per prompt, at a length that
changes every time, and compiling it did not pay. A Decoder keeps one cache per shape and reuses it, so
a CUDA graph finds its tensors at the addresses it recorded.

Cost. Compiling takes 15-40 s per shape on this 2-core CPU on a first start, paid before generation by
warm_up (the caller says how long); inductor keeps what it compiled in its FX graph cache
(/tmp/torchinductor_$USER), so a later process takes 3-5 s. The steps gain most where dispatch is most
of a step, small models: 3.4x at the quick start's size, batch 1; at GPT-2 124M on a CPU they are a
few percent slower (bench/README.md says why).
"""
import time

import torch

from model import KVCache


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                    decoder=None):
    """Continue idx (B, T) with model (a GPT), yielding each new (B, 1) token; sampling as sample_next. A row
    that emits eos_token keeps emitting it; the stream stops once every row has. Call model.eval() first. The
    model sees the last block_size tokens; past that every step re-runs the cropped window (dropping the
    oldest token changes every hidden state after it), so greedy output equals recomputing. decoder: a
    Decoder, to run the decode steps compiled."""
    if problem := sampling_problem(temperature, top_k, top_p):
        raise ValueError(problem[1])
    bs, B, n = model.config.block_size, idx.size(0), min(model.config.block_size, idx.size(1) + max_new_tokens)
    cache = decoder.cache(B, n) if decoder else KVCache(model.config.n_layer, B, n)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        if i == 0 or idx.size(1) > bs:  # prefill: the prompt, or the window that slid on
            cache.pos.zero_()
            x, start = idx[:, -bs:], 0
        else:  # decode: one token at position cache.pos, attending to everything cached
            x, start = idx[:, -1:], idx.size(1) - 1
        h = decoder(x, cache, start) if decoder else model.hidden_states(x, cache)
        nxt = sample_next(model.head(h[:, -1:])[:, -1], temperature, top_k, top_p)  # (B, 1)
        if eos_token is not None:
            nxt = torch.where(done[:, None], eos_token, nxt)
            done |= nxt[:, 0] == eos_token
        idx = torch.cat((idx, nxt), dim=1)
        yield nxt
        if eos_token is not None and bool(done.all()):
            return


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None, decoder=None):
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (fewer only if eos_token stops
    every row). See generate_stream."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token, decoder))
    return torch.cat([idx, *new], dim=1)


def sampling_problem(temperature, top_k, top_p):
    """(the first setting sample_next cannot take, one line with every valid range), or None if all can be."""
    for name, good in (("temperature", isinstance(temperature, (int, float)) and temperature >= 0),  # NaN fails
                       ("top_k", top_k is None or isinstance(top_k, int) and top_k >= 1),
                       ("top_p", top_p is None or isinstance(top_p, (int, float)) and 0 < top_p <= 1)):
        if not good:
            return name, (f"need temperature >= 0, top_k None or an int >= 1, and top_p None or in (0, 1]; got "
                          f"temperature={temperature}, top_k={top_k}, top_p={top_p}")


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """sample_next's settings applied to (B, V) logits -> (greedy, logits, order), what it draws from.
    greedy (B, 1): the rows that take the argmax. logits (B, n) float32: divided by the temperature, -inf
    outside top_k and top_p; order (B, n): their token ids, or None when n = V in vocabulary order.
    logits and order are None when every row is greedy. speculative.py turns them into probabilities."""
    B, V = logits.shape
    col = lambda x, off: torch.as_tensor(off if x is None else x, dtype=torch.float32,  # noqa: E731
                                         device=logits.device).expand(B, 1)  # (B, 1)
    temperature, top_k, top_p = col(temperature, 1.0), col(top_k, V), col(top_p, 1.0)
    greedy = (temperature == 0) | (top_k == 1)  # (B, 1)
    if bool(greedy.all()):
        return greedy, None, None
    logits = logits.float() / torch.where(greedy, 1.0, temperature)
    k, order = int(top_k.max()), None  # order None: the tokens stay in vocabulary order
    if k < V:  # the k best of each row, in descending order: much cheaper than sorting all V
        logits, order = logits.topk(k, dim=-1)
    elif bool((top_p < 1).any()):
        logits, order = logits.sort(dim=-1, descending=True)
    if order is not None:
        logits = logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= top_k, float("-inf"))
        # nucleus (Holtzman et al. 2019): in descending order, drop a token once the mass before it
        # already reaches top_p, which always keeps the most likely token
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return greedy, logits, order


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generators=None):
    """(B, V) next-token logits -> (B, 1) ids. Each setting is one value, or (B, 1) per-row values
    (serve.py batches requests): temperature 0 or top_k 1 is greedy; top_k keeps the k likeliest
    tokens (None: all), top_p the fewest whose probability reaches it (None or 1: all). generators:
    one torch.Generator per row, so a row's seed alone decides its tokens; None: torch's global RNG."""
    B = logits.size(0)
    best = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    greedy, logits, order = filter_logits(logits, temperature, top_k, top_p)
    if logits is None:
        return best
    # inverse-CDF sampling: one uniform draw per row, from the row's own generator where it has one
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V or k)
    u = torch.rand(B, 1, device=logits.device) if generators is None else \
        torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])[:, None]
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.size(-1) - 1)  # (B, 1)
    return torch.where(greedy, best, pick if order is None else order.gather(1, pick))


def bucket(n, most):
    """The smallest power of two >= n, at most `most`: a shape that serves every size up to it."""
    return min(most, 1 << (n - 1).bit_length())


class Decoder:
    """Runs model.hidden_states on a static KVCache: compiled for a step of T tokens per row for each T in
    lengths (a decode step: 1; a speculative round's draft reads 1 or 2, its target k + 1), eager for any
    other T (a prefill). Call model.eval() first; warm_up and the steps run under the same autocast."""

    def __init__(self, model, device_type, lengths=(1,)):
        if getattr(model, "quantization", {}).get("mode") == "int8":  # int4's kernel compiles; int8's does not
            raise ValueError("torch.compile cannot trace quantize.py's int8 Linear (torch.ao's packed kernel); "
                             "decode int8 weights without --compile=True, or compile float32 or int4 weights")
        self.model, self.lengths, self.caches = model, tuple(lengths), {}
        self.compiled = set()  # (rows, T, id(cache)) of every step compiled so far
        self.inference = None  # whether those steps ran inside torch.inference_mode (a graph holds to one)
        self.device, self.cuda = model.transformer.wte.weight.device, device_type == "cuda"
        # inductor's C++ wrapper calls the kernels from C++, not Python: faster steps on a CPU, slower compiles
        # (bench/README.md). On CUDA the step is one CUDA graph, which leaves no wrapper to speed up.
        options = dict(mode="reduce-overhead") if self.cuda else dict(options={"cpp_wrapper": True})
        self.step = torch.compile(model.hidden_states, fullgraph=True, dynamic=False, **options)
        # one graph per shape, and per model: more than dynamo's default of 8 for one function in a process
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def cache(self, batch, length):
        """The static KVCache of `batch` rows and at least `length` positions (a power of two, at most
        block_size), emptied. One per shape, kept: a CUDA graph reads and writes it where it recorded it."""
        shape = (batch, bucket(length, self.model.config.block_size))
        if shape not in self.caches:
            self.caches[shape] = KVCache(self.model.config.n_layer, *shape, static=True, device=self.device)
        self.caches[shape].pos.zero_()
        return self.caches[shape]

    def __call__(self, idx, cache, start):
        """idx (B, T): new tokens for the first B rows of a static cache whose longest row holds `start`
        tokens (known on the host) -> their (B, T, C) hidden states. A step (T in lengths) runs compiled,
        on the rows padded to a power of two with idle rows at position 0."""
        self.model._check_input(idx, start, cache)
        B, T = idx.shape
        if T not in self.lengths or cache.k is None:  # a prefill: eager; the first allocates the cache
            return self.model.hidden_states(idx, cache)
        inside = torch.is_inference_mode_enabled()  # its tensors lack autograd's keys, which the graphs guard on
        if self.inference is not None and inside != self.inference:
            raise RuntimeError(f"this Decoder compiled its steps {'inside' if self.inference else 'outside'} "
                               f"torch.inference_mode(); call it the same way (torch.no_grad() is outside), or "
                               f"make a new Decoder")
        self.inference = inside
        rows = bucket(B, len(cache.pos))
        cache.pos[B:rows] = 0
        # a fresh (rows, T) tensor: idx[:, -1:] of a growing sequence has a new stride at every step, which
        # the graph would take for a new shape; the idle rows get token 0
        x = idx.new_zeros(rows, T)
        x[:B] = idx
        shape = (rows, T, id(cache))
        if shape not in self.compiled:  # a CUDA graph updates these in place, at the addresses it recorded
            for t in [cache.pos, *cache.k, *cache.v]:
                torch._dynamo.mark_static_address(t)
        if self.cuda:  # the last step's outputs are used up: the graph may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        # once compiled, a shape is never compiled again: a recompile would be a bug costing seconds a token
        with torch.compiler.set_stance("fail_on_recompile" if shape in self.compiled else "default"):
            h = self.step(x, cache)
        self.compiled.add(shape)
        return h[:B]

    @torch.no_grad()
    def warm_up(self, cache, batches=None):
        """Compile the steps now, before any generation, for the first b rows of cache for each b in
        batches (default: all its rows) and each length. Leaves the cache empty; returns the seconds it took."""
        t0 = time.time()
        for b, T in ((b, T) for b in batches or [len(cache.pos)] for T in self.lengths):
            cache.pos.zero_()
            self(torch.zeros(b, 1, dtype=torch.long, device=self.device), cache, 0)  # eager: allocates the cache
            idx = torch.zeros(b, T, dtype=torch.long, device=self.device)
            for _ in range(2):  # CUDA graphs record at the second call; each step at position 1 (capacity > T)
                cache.pos.fill_(1)
                self(idx, cache, 1)
        cache.pos.zero_()
        return time.time() - t0
