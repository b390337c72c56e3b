"""
serve.py: serve a model over HTTP with OpenAI's API, so the clients people already own (the openai
package, LangChain, curl) talk to it unchanged. Built on FastAPI and uvicorn.

    python serve.py --model=out-quickstart                   # http://127.0.0.1:8000, playground at /
    python serve.py --model=gpt2 --quantize=int8 --port=8080 --api_key=secret
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "out-quickstart", "prompt": "def ", "max_tokens": 40, "temperature": 0}'

Endpoints. POST /v1/completions and /v1/chat/completions (stream=true sends server-sent events in
OpenAI's chunk format, ending `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus
text) and GET / (a playground page: static/playground.html). Every answer carries usage and each
choice a finish_reason: "stop" (end of text, or a stop string) or "length" (max_tokens, or cut at
shutdown). Beyond OpenAI's fields: top_k, and ignore_eos (vLLM's names). echo=true with logprobs and
max_tokens=0 returns the prompt's log-probabilities (what lm-evaluation-harness asks for).

Chat. A base model knows no chat format, so messages become a plain transcript for it to continue,
    <|endoftext|>{system message}\\n\\nUser: {message}\\nAssistant: {reply}\\nUser: {message}\\nAssistant:
and "\\nUser:" joins the stop strings, so the reply ends where the model starts the next turn.

Continuous batching. One engine thread owns the model; the HTTP handlers queue requests and read
their tokens back. Between two steps the engine admits waiting requests: their prompts are prefilled
(prompts of one length go together), each prompt's keys and values are copied into free rows of the
engine's KVCache, and each first token is sampled. Each step then decodes all active rows together:
one forward of the model over their (B, 1) newest tokens, where row b sits at its own length in the
cache (model.py's KVCache keeps one per row: it sets the row's position and masks the columns past
it). Each row has its own temperature, top_k, top_p, stop strings and torch.Generator (seeded from
the request's seed), all handed to decode.sample_next, so a request's tokens do not depend on what it
was batched with (in float32; in bf16 a matmul's rounding can depend on the batch's shape). A
finished or abandoned row leaves at the step boundary; the last row moves into its place. With
--compile=True the decode step is compiled at start for each batch size up to max_batch rounded up to a
power of two (decode.py), the batch padded to its size with idle rows.

Faults. A bad request gets a 4xx with OpenAI's error body {"error": {message, type, param, code}};
a full queue (max_queue) gets 503 with Retry-After. A client that disconnects frees its row at the
next step. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish for up
to drain_seconds, ends any left with finish_reason "length" and a proper [DONE], and exits 0.
"""
import asyncio
import codecs
import collections
import contextlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Dict, List, Literal, Optional, Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from checkpoint import OLD_MODEL_FLAGS, open_model
from configurator import UserError, configure, run
from decode import Decoder, bucket, sample_next, sampling_problem
from device import autocast, compile_problem, for_inference, pick_device
from model import KVCache
from quantize import MODES, quantize as quantize_model, weight_bytes
from score import bits_per_byte, log_prob_chunks

# ---- settings (override with a config file and/or --key=value) -----------------------------------
model = "out"              # a run directory (train.py's default out_dir) | a .pt file | 'gpt2', 'gpt2-medium',
                           # ... | a Hugging Face directory (export.py's): the same in sample, eval, export, serve
ckpt = "best"              # in a run directory: 'best' (lowest val loss) | 'last' (newest) | a file name in it
model_name = ""            # the id clients send as "model"; "" = the last part of `model` (the run's folder name)
host = "127.0.0.1"         # 0.0.0.0 listens on every interface: then set an api_key
port = 8000                # 0 = any free port (printed at start)
api_key = ""               # require "Authorization: Bearer KEY" on /v1/*; "" = $SERVE_API_KEY, or open
quantize = "none"          # 'none' | 'int8' | 'int4': Linear weights in 8 or 4 bits, CPU only (quantize.py);
                           # GPTQ's int4 needs calibration: make it with eval.py --save_quantized, serve that file
max_batch = 16             # rows decoded together in one forward: the batched KV cache's size
max_queue = 64             # sequences waiting for a row; beyond that, 503 with Retry-After
drain_seconds = 30.0       # after SIGTERM, how long requests in flight may run before they are cut
device = "auto"            # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"             # 'auto' = bf16/fp16 autocast on GPUs, float32 on CPU | 'float32' | ...
threads = 1                # torch threads: 1 leaves a core to the event loop (bench/README.md); 0 = all
compile = False            # compile the decode step at start, per batch-size bucket (decode.py): faster steps
draft = ""                 # refused: speculative decoding is sample.py --draft's (the reason is at the check)
prefill_chunk = 512        # a longer prompt is prefilled this many tokens per step, between decode steps; 0 = whole
prefix_cache = 2048        # tokens of prompt prefixes kept for requests that share them (a system prompt); 0 = off
score_prompts = True       # each prompt's bits per byte under the model, for /metrics (costs a head over the prompt)
log_requests = ""          # a .jsonl file: one line per prompt (text, completion, settings, timings, scores)
log_max_mb = 100.0         # the request log moves to <file>.1 past this size
# --------------------------------------------------------------------------------------------------

MAX_STOPS, MAX_LOGPROBS, MAX_TOP_LOGPROBS = 4, 5, 20  # OpenAI's limits (top_logprobs: chat's)
MAX_BODY = 8 * 2 ** 20  # bytes of a request body: a full context of token ids as JSON is far less
CHAT_STOP = "\nUser:"


# ---- request bodies (pydantic checks every field; a failure is a 400 naming it) --------------------

class Body(BaseModel):  # strict: "5" is not an int; a field this server does not implement is a 400
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Body):
    include_usage: bool = False


class Common(Body):  # every number is bounded here, at the edge, to what the engine's tensors hold
    model: str
    # what sampling can take at all (temperature >= 0, top_k >= 1, 0 < top_p <= 1) is decode.sampling_problem's
    # call, the check every script shares, made in Service.sampling; a temperature above 2 is OpenAI's limit
    temperature: float = Field(1.0, le=2)
    top_p: float = 1.0
    top_k: Optional[int] = Field(None, le=2 ** 31 - 1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None  # token id (as a string) -> -100..100, added to its logit
    user: Optional[str] = None  # OpenAI's end-user id, for abuse monitoring: written to the request log only
    ignore_eos: bool = False  # go on past <|endoftext|>: benchmarks want fixed lengths


class CompletionRequest(Common):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]


class ChatRequest(Common):
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class APIError(Exception):
    """An answer with a real HTTP status and OpenAI's error body, the shape the SDKs parse."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- sampling settings and text ------------------------------------------------------------

class Sampling:
    """One sequence's settings. temperature 0 (or top_k 1) is greedy; logprobs is None (none) or the
    number of alternatives to report with each token. As OpenAI defines them, a token's logit drops by
    presence_penalty once it has been generated and by frequency_penalty for each time it was;
    logit_bias {id: bias} is added to the logits."""

    def __init__(self, temperature=0.0, top_k=None, top_p=1.0, max_tokens=16, seed=None, logprobs=None,
                 stop=(), ignore_eos=False, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None):
        self.temperature, self.top_k, self.top_p, self.max_tokens = temperature, top_k, top_p, max_tokens
        self.seed, self.logprobs, self.stop, self.ignore_eos = seed, logprobs, list(stop), ignore_eos
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.logit_bias = logit_bias or {}


class TextStream:
    """A sequence's generated bytes -> text that is safe to send. UTF-8 is decoded incrementally, so a
    character split across tokens waits for its last byte; a tail that could begin a stop string is
    held back until it cannot, so no part of a stop string is sent and the text ends exactly before it.
    chars counts every character decoded so far (sent or held): the text_offset of the next token."""

    def __init__(self, stops):
        self.stops, self.held, self.chars = stops, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data, final=False):
        """Bytes in -> (text to send, whether a stop string ended it)."""
        new = self.decoder.decode(data, final=final)
        self.chars += len(new)
        text = self.held + new
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        # the longest tail of text that is a proper prefix of some stop string
        hold = 0 if final else max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - hold:]
        return text[:len(text) - hold], False


# ---- the engine: one thread, continuous batching --------------------------------------------------

class Sequence:
    """One choice of one request, from the queue to its finish, drawn with its own settings (sampling, a
    Sampling) and generator. emit(event) hands each event to the request's handler (see Engine.deliver):
    {"index", "text", "logprobs": [(id, logprob, alternatives, text_offset)], "finish_reason": None until
    the last event}, or {"index", "error"}."""

    def __init__(self, index, sampling, emit, arrival, device="cpu"):
        self.index, self.sampling, self.emit, self.arrival = index, sampling, emit, arrival
        self.generator = torch.Generator(device=device)
        if sampling.seed is None:
            self.generator.seed()  # fresh entropy: unseeded requests differ from each other
        else:
            self.generator.manual_seed(sampling.seed % 2 ** 64)
        self.text = TextStream(sampling.stop)
        self.tokens, self.finish, self.cancelled, self.last_time = [], None, False, None
        self.prompt_len = 0  # set at admission: the row then holds prompt_len + len(tokens) - 1 tokens
        self.logprob_sum, self.prompt_bpb = 0.0, None  # for the output-health metrics and the request log
        self.counts = None  # (V,) how often each token was generated: for the presence/frequency penalties
        if sampling.logit_bias:
            self.bias_ids = torch.tensor(list(sampling.logit_bias), device=device)
            self.bias_values = torch.tensor(list(sampling.logit_bias.values()), device=device)

    def penalise(self, logits):
        """OpenAI's presence and frequency penalties and logit_bias, on this row's logits (V,), in place."""
        if self.counts is not None:
            logits -= self.sampling.frequency_penalty * self.counts + self.sampling.presence_penalty * (self.counts > 0)
        if self.sampling.logit_bias:
            logits[self.bias_ids] += self.bias_values


class Group:
    """A prompt (token ids) and its n sequences: prefilled once, admitted together. prompt_logprobs:
    None, or the number of alternatives to report for each prompt token (echo). A prompt that is
    prefilled a chunk at a time (or continues a cached prefix) has a KVCache of its own meanwhile."""

    def __init__(self, ids, seqs, prompt_logprobs=None):
        self.ids, self.seqs, self.prompt_logprobs = ids, seqs, prompt_logprobs
        self.cache, self.echo, self.offsets = None, [(ids[0], None, None, 0)], None
        self.nats, self.bytes = 0.0, 0  # the prompt's surprise: -log p of its scored tokens, their bytes


class QueueFull(Exception):
    pass


class PrefixCache:
    """Keys and values of prompts already prefilled, in blocks of BLOCK tokens, so requests that share a
    beginning (a system prompt, few-shot examples) compute it once. A block is keyed by every token up
    to its end, its own and all before it, so a hit is an exact prefix, never a lookalike. The least
    recently used block goes first once `capacity` tokens are held."""
    BLOCK = 64

    def __init__(self, capacity):
        self.capacity, self.blocks = capacity // self.BLOCK, collections.OrderedDict()

    def lookup(self, ids, cache):
        """Copy the longest cached prefix of ids into row 0 of cache (whole blocks, and at least one
        token short of ids, whose last position must be computed for its logits). Returns its length."""
        n = 0
        while n + self.BLOCK < len(ids) and (key := tuple(ids[:n + self.BLOCK])) in self.blocks:
            self.blocks.move_to_end(key)
            k, v = self.blocks[key]  # (n_layer, nh, BLOCK, hd) each
            if cache.k is None:
                cache.allocate(k, v)
            for layer in range(len(k)):  # the cache keeps a tensor per layer
                cache.k[layer][0, :, n:n + self.BLOCK], cache.v[layer][0, :, n:n + self.BLOCK] = k[layer], v[layer]
            n += self.BLOCK
        cache.pos[0] = n
        return n

    def insert(self, ids, cache, row):
        """Keep the whole blocks of ids, whose keys and values are in row `row` of cache."""
        for end in range(self.BLOCK, len(ids) + 1, self.BLOCK):
            key = tuple(ids[:end])
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            k, v = ([t[row, :, end - self.BLOCK:end] for t in layers] for layers in (cache.k, cache.v))
            self.blocks[key] = torch.stack(k), torch.stack(v)  # (n_layer, nh, BLOCK, hd) each
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)


def repetition(tokens, n=4):
    """The share of a response's tokens that end an n-gram it already holds: near 1 in a degenerate loop."""
    seen, repeats = set(), 0
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        repeats += gram in seen
        seen.add(gram)
    return repeats / max(1, len(tokens) - n + 1)


class Engine:
    """Owns the model on its own thread. submit() queues groups from any thread; the loop admits them
    at step boundaries and decodes every active row together. A prompt longer than prefill_chunk tokens
    (0: no limit) is prefilled a chunk per step, between decode steps, so it never stalls the others
    for long; prefix_cache tokens of prompt prefixes are kept for reuse (0: off). decoder: a decode.Decoder,
    to run the decode steps compiled."""

    def __init__(self, model, tok, max_batch=16, max_queue=64, metrics=None, device_type="cpu",
                 ptdtype=torch.float32, prefill_chunk=0, prefix_cache=0, score_prompts=True, decoder=None):
        self.model, self.tok, self.metrics = model, tok, metrics or Metrics()
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, prefill_chunk
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache else None
        self.score_prompts, self.decoder = score_prompts, decoder
        self.token_bytes = tok.token_byte_lengths()  # for the prompts' bits per byte
        self.device, self.device_type, self.ptdtype = next(model.parameters()).device, device_type, ptdtype
        n, bs = model.config.n_layer, model.config.block_size
        self.cache = decoder.cache(max_batch, bs) if decoder else KVCache(n, max_batch, bs)  # row b: active[b]
        self.active = []                # active[b] owns row b of the cache
        self.prefilling = collections.deque()  # groups whose prompts are being prefilled a chunk at a time
        self.waiting = collections.deque()
        self.n_waiting = 0              # sequences in the waiting groups
        self.cond = threading.Condition()
        self.stopping, self.cut_at = False, None  # cut_at: when draining ends (time.monotonic())
        self.broken = None              # why the device cannot run the model any more (/health says it)
        self.recent = collections.deque()  # (time, tokens) of each step of the last 10 s
        self.metrics.tokens_per_second.set_function(self.tokens_per_second)
        self.outbox = []                # (sequence, event) of this step, handed over together
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    def deliver(self, batch):
        """Hand a step's events to their sequences: here, by calling each one's emit on this thread.
        The server replaces this with one hop to its event loop per step (Service.attach)."""
        for s, event in batch:
            s.emit(event)

    def post(self, s, event):
        self.outbox.append((s, event))

    # -- called from other threads --
    def submit(self, groups):
        n = sum(len(g.seqs) for g in groups)
        with self.cond:
            if self.n_waiting and self.n_waiting + n > self.max_queue:  # an empty queue takes any request
                raise QueueFull(self.n_waiting)
            self.waiting.extend(groups)
            self.n_waiting += n
            self.metrics.waiting.set(self.n_waiting)
            self.cond.notify()

    def cancel(self, seqs):
        """The client left: the engine drops these at its next step boundary."""
        for s in seqs:
            s.cancelled = True
        with self.cond:
            self.cond.notify()

    def drain(self, seconds):
        with self.cond:
            if self.cut_at is None:
                self.cut_at = time.monotonic() + seconds
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def tokens_per_second(self):
        """Tokens generated over the last 10 s, per second (read at each scrape: 0 when idle)."""
        now = time.monotonic()
        return sum(n for t, n in list(self.recent) if t > now - 10) / 10

    # -- the engine thread --
    def loop(self):
        if self.cache.k is None and self.guard([], self.warm_up) is None:
            self.broken = self.broken or "the KV cache could not be allocated"
        while True:
            with self.cond:
                while not self.active and not self.prefilling and not self.waiting and not self.stopping:
                    self.cond.wait(timeout=1.0)
                if self.stopping:
                    self.cut_all()
                    return self.deliver(self.outbox)
                # admit in arrival order while the next group fits in the rows left free (a group whose
                # client left while waiting is taken too, to be dropped)
                admitted = []
                free = self.max_batch - len(self.active) - sum(len(g.seqs) for g in self.prefilling)
                while self.waiting and (len(self.waiting[0].seqs) <= free or
                                        all(s.cancelled for s in self.waiting[0].seqs)):
                    g = self.waiting.popleft()
                    self.n_waiting -= len(g.seqs)
                    free -= sum(not s.cancelled for s in g.seqs)
                    admitted.append(g)
                self.metrics.waiting.set(self.n_waiting)
            self.step(admitted)
            if self.cut_at is not None and time.monotonic() > self.cut_at:
                self.cut_all()
            self.metrics.running.set(len(self.active))
            if self.outbox:
                batch, self.outbox = self.outbox, []
                self.deliver(batch)

    def step(self, admitted):
        """Prefill what was admitted (short prompts of one length together; long or prefix-cached ones
        into a cache of their own, a chunk per step), then one decoding step for every active row. An
        error fails the requests it concerns only (out of memory in a decode step: the newest row)."""
        with torch.inference_mode(), autocast(self.device_type, self.ptdtype):
            same_length = collections.defaultdict(list)  # short prompts of one length prefill together
            for g in admitted:
                if all(s.cancelled for s in g.seqs):  # left while waiting
                    for s in g.seqs:
                        self.finish(s, "abort", "")
                    continue
                T = len(g.ids)
                if self.prefixes and g.prompt_logprobs is None and T > PrefixCache.BLOCK:
                    g.cache = KVCache(self.model.config.n_layer, 1, T)
                    hit = self.prefixes.lookup(g.ids, g.cache)
                    self.metrics.prefix_queries.inc(T)
                    self.metrics.prefix_hits.inc(hit)
                    if hit == 0 and not (self.chunk and T > self.chunk):
                        g.cache = None
                if g.cache is None and self.chunk and T > self.chunk:
                    g.cache = KVCache(self.model.config.n_layer, 1, T)
                if g.cache is not None:
                    self.prefilling.append(g)
                else:
                    same_length[T].append(g)
            for groups in same_length.values():
                self.guard([s for g in groups for s in g.seqs], lambda: self.prefill(groups))
            if self.prefilling and all(s.cancelled for s in self.prefilling[0].seqs):
                for s in self.prefilling.popleft().seqs:
                    self.finish(s, "abort", "")
            if self.prefilling:
                g = self.prefilling[0]
                if self.guard(g.seqs, lambda: self.prefill_chunk(g)) is None and g in self.prefilling:
                    self.prefilling.remove(g)  # it failed
            self.leave()
            if self.active:
                seqs = list(self.active)
                try:
                    self.decode()
                except Exception as e:
                    oom = isinstance(e, torch.OutOfMemoryError)  # the newest row goes, the rest retry
                    self.fail([max(seqs, key=lambda s: s.arrival)] if oom else seqs, e)
            self.leave()

    def guard(self, seqs, work):
        """Run work(); if it raises, fail seqs (and only them) and keep serving. Returns work()'s value."""
        try:
            return work()
        except Exception as e:
            self.fail(seqs, e)

    def fail(self, seqs, e):
        print(f"engine error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        for s in seqs:
            if s.finish is None:
                s.finish = "error"
                self.metrics.finished.labels("error").inc()
                self.post(s, {"index": s.index, "error": f"{type(e).__name__}: {e}"})
        try:  # a sticky CUDA error fails everything after it: then /health must say so
            torch.ones(1, device=self.device).add_(1).cpu()
        except Exception as dead:
            self.broken = f"{type(dead).__name__}: {dead}"

    def warm_up(self):
        """Allocate the batch's KV cache now, in the dtypes the layers give, so a max_batch too large for
        the device's memory fails at start, not under the first traffic; with a decoder, compile its step
        for every batch size a step may pad to (CUDA graphs belong to a thread: the engine's records its
        own at its first steps of each size). Returns the seconds compiling took."""
        with torch.inference_mode(), autocast(self.device_type, self.ptdtype):
            one = KVCache(self.model.config.n_layer, 1, 1)
            self.model.hidden_states(torch.zeros(1, 1, dtype=torch.long, device=self.device), one)
            self.cache.copy_rows([0], one, [0])
            self.cache.pos.zero_()
            if not self.decoder:
                return 0.0
            sizes = sorted({bucket(b, self.max_batch) for b in range(1, self.max_batch + 1)})  # 1, 2, 4, ..., max_batch
            return self.decoder.warm_up(self.cache, sizes)

    def prefill(self, groups):
        """Run G prompts of one length T through the model together, (G, T), and start them."""
        cache = KVCache(self.model.config.n_layer, len(groups), len(groups[0].ids))
        h = self.model.hidden_states(torch.tensor([g.ids for g in groups], device=self.device), cache)  # (G, T, C)
        for i, g in enumerate(groups):
            self.score_prompt(g, h[i], 0)
            if self.prefixes:
                self.prefixes.insert(g.ids, cache, i)
        self.start(groups, cache, list(range(len(groups))), h[:, -1])

    def prefill_chunk(self, g):
        """The next chunk of a long (or prefix-cached) prompt, in its own cache; the whole prompt
        done, start it. Returns True (done or not) unless it raised."""
        start = int(g.cache.pos[0])
        end = min(len(g.ids), start + (self.chunk or len(g.ids)))
        h = self.model.hidden_states(torch.tensor([g.ids[start:end]], device=self.device), g.cache)  # (1, t, C)
        self.score_prompt(g, h[0], start)
        if end == len(g.ids):
            self.prefilling.popleft()
            if self.prefixes:
                self.prefixes.insert(g.ids, g.cache, 0)
            self.start([g], g.cache, [0], h[:, -1])
        return True

    def score_prompt(self, g, h, start):
        """h (t, C): the hidden states at prompt positions start.. start+t-1, each of which predicts the
        next prompt token. Adds their surprise (nats, bytes) to g, and the echo's log-probabilities."""
        if g.prompt_logprobs is not None and g.offsets is None:  # each token's text_offset, for the echo
            text, g.offsets = TextStream([]), []
            for t in g.ids:
                g.offsets.append(text.chars)
                text.push(self.tok.decode_bytes([t]))
            g.echo_chars = text.chars
        targets = g.ids[start + 1:start + 1 + len(h)]
        if not targets or not (self.score_prompts or g.prompt_logprobs is not None):
            return
        g.bytes += sum(self.token_bytes[t] for t in targets)
        for a, lp, chosen in log_prob_chunks(self.model, h[:len(targets)], torch.tensor(targets, device=h.device)):
            g.nats -= float(chosen.sum())
            if g.prompt_logprobs is not None:  # echo: each prompt token's logprob given the ones before it
                first = start + 1 + a
                g.echo += self.logprob_entries(lp, targets[a:a + len(lp)], g.prompt_logprobs,
                                               g.offsets[first:first + len(lp)])

    def start(self, groups, cache, rows, h):
        """Groups whose prompts are prefilled (row rows[i] of cache): copy each prompt's keys and values
        into free rows of the batch, one per choice, and sample each choice's first token from h (G, C)."""
        started, src, now = [], [], time.monotonic()
        for j, (g, i) in enumerate(zip(groups, rows)):
            seqs = [s for s in g.seqs if not s.cancelled]
            for s in g.seqs:
                if s.cancelled:
                    self.finish(s, "abort", "")
            bpb = bits_per_byte(g.nats, g.bytes) if g.bytes else None
            if bpb is not None and self.score_prompts:
                self.metrics.prompt_bpb.observe(bpb)
            self.metrics.prompt_tokens.inc(len(g.ids))
            for s in seqs:
                s.prompt_bpb = bpb
                self.metrics.queue_time.observe(now - s.arrival)
                if g.prompt_logprobs is not None:
                    s.text.chars = g.echo_chars  # the echoed prompt comes first: generated offsets follow it
                    self.post(s, {"index": s.index, "text": "", "logprobs": g.echo, "finish_reason": None})
            if not seqs:
                continue
            if seqs[0].sampling.max_tokens == 0:  # scoring only: nothing is generated
                for s in seqs:
                    self.finish(s, "length", "")
                continue
            for s in seqs:
                s.prompt_len = len(g.ids)
            r = len(self.active)  # the prompt's keys and values, once for each of its choices
            self.cache.copy_rows(list(range(r, r + len(seqs))), cache, [i] * len(seqs))
            self.active += seqs
            started += seqs
            src += [j] * len(seqs)
        if started:
            self.sample(started, h[src])  # (N, C): each choice from its prompt's last position

    def decode(self):
        """One step for every active row: its newest token goes in at its own position (model.py's
        KVCache keeps each row's length) and its next token comes out."""
        seqs = self.active
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # (B, 1)
        if self.decoder:  # it checks the step against the longest row's length, known here without a device read
            h = self.decoder(tokens, self.cache, max(s.prompt_len + len(s.tokens) - 1 for s in seqs))
        else:
            h = self.model.hidden_states(tokens, self.cache)                        # (B, 1, C)
        self.metrics.batch_size.observe(len(seqs))
        self.sample(seqs, h[:, -1])

    def sample(self, seqs, h):
        """The next token of each row, from its final hidden state h (B, C), with its own settings and
        generator, in four steps: draw, read the log-probabilities, count the step, hand out the tokens."""
        lp = self.model.log_probs(h)  # (B, V) float32: what is sampled (softmax ignores the shift) and reported
        nxt = self.draw(seqs, lp)                          # 1. (B,) ids; -1 for a row that failed
        chosen, entries = self.read_logprobs(seqs, lp, nxt)  # 2. for the metrics, and for the rows that asked
        now = self.count_step(len(seqs))                   # 3. throughput and the token counter
        for b, (s, t) in enumerate(zip(seqs, nxt)):        # 4. each row takes its token
            if t < 0:
                continue
            s.logprob_sum += chosen[b]
            if s.sampling.presence_penalty or s.sampling.frequency_penalty:
                if s.counts is None:
                    s.counts = torch.zeros(lp.size(-1), device=lp.device)
                s.counts[t] += 1
            self.accept(s, t, entries.get(b, []), now)

    def draw(self, seqs, lp):
        """Step 1: each row's next token, all rows in one batch. A row whose settings break the batched
        draw fails alone (its token -1): each row is then drawn by itself, and the others go on."""
        try:
            return self.draw_rows(seqs, lp)
        except Exception:
            nxt = []
            for b, s in enumerate(seqs):
                try:
                    nxt += self.draw_rows([s], lp[b:b + 1])
                except Exception as e:
                    self.fail([s], e)
                    nxt.append(-1)
            return nxt

    def draw_rows(self, seqs, lp):
        """lp (N, V) log-probabilities of N rows -> their N tokens (a list), each drawn after its own
        penalties and logit_bias, with its own temperature, top_k, top_p and generator (decode.sample_next)."""
        logits, V = lp.clone(), lp.size(-1)
        for row, s in zip(logits, seqs):
            s.penalise(row)
        col = lambda xs: torch.tensor(xs, device=lp.device)[:, None]  # noqa: E731  (N, 1)
        settings = [s.sampling for s in seqs]
        temperature = col([x.temperature for x in settings])
        top_k, top_p = col([min(x.top_k or V, V) for x in settings]), col([x.top_p for x in settings])
        return sample_next(logits, temperature, top_k, top_p, [s.generator for s in seqs])[:, 0].tolist()

    def read_logprobs(self, seqs, lp, nxt):
        """Step 2: the model's own log-probability of each row's token (B,), before penalties, temperature and
        filtering (as vLLM), and {row: logprob entries} for the rows that asked for logprobs."""
        chosen = lp.gather(1, torch.tensor(nxt, device=lp.device).clamp(min=0)[:, None])[:, 0].tolist()
        entries = {b: self.logprob_entries(lp[b:b + 1], [t], s.sampling.logprobs, [s.text.chars])
                   for b, (s, t) in enumerate(zip(seqs, nxt)) if s.sampling.logprobs is not None and t >= 0}
        return chosen, entries

    def count_step(self, n):
        """Step 3: n tokens generated now, for tokens_per_second (the last 10 s) and the metrics. Returns now."""
        now = time.monotonic()
        self.recent.append((now, n))
        while self.recent[0][0] < now - 10:
            self.recent.popleft()
        self.metrics.generation_tokens.inc(n)
        return now

    def logprob_entries(self, lp, ids, k, offsets):
        """lp (N, V) log-probabilities, ids the N tokens taken -> [(id, logprob, [(alt, logprob)], offset)]."""
        chosen = lp.gather(1, torch.tensor(ids, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
        alts = [[]] * len(ids)
        if k:
            vals, idx = lp.topk(k, dim=-1)
            alts = [list(zip(a, v)) for a, v in zip(idx.tolist(), vals.tolist())]
        return list(zip(ids, chosen, alts, offsets))

    def accept(self, s, t, logprobs, now):
        if s.cancelled:
            return
        s.tokens.append(t)
        first = s.last_time is None
        (self.metrics.ttft if first else self.metrics.itl).observe(now - (s.arrival if first else s.last_time))
        s.last_time = now
        if t == self.tok.eot_token and not s.sampling.ignore_eos:  # the model ended the document
            return self.finish(s, "stop", s.text.push(b"", final=True)[0], logprobs, "eos")
        text, stopped = s.text.push(self.tok.decode_bytes([t]))
        if not stopped and len(s.tokens) == s.sampling.max_tokens:  # the last token: flush what was held
            rest, stopped = s.text.push(b"", final=True)
            return self.finish(s, "stop" if stopped else "length", text + rest, logprobs)
        if stopped:
            return self.finish(s, "stop", text, logprobs)
        self.post(s, {"index": s.index, "text": text, "logprobs": logprobs, "finish_reason": None})

    def finish(self, s, reason, text, logprobs=(), cause=None):
        """End a sequence. cause: what ended it, for the metrics: the reason, or "eos" (a "stop" that was
        the model's own end of text, where a rising share can mean it has drifted)."""
        s.finish = reason
        self.metrics.finished.labels(cause or reason).inc()
        if reason != "abort":
            self.metrics.e2e.observe(time.monotonic() - s.arrival)
            if s.tokens:
                self.metrics.response_logprob.observe(s.logprob_sum / len(s.tokens))
                self.metrics.response_repetition.observe(repetition(s.tokens))
        self.metrics.success.labels(reason).inc()
        self.post(s, {"index": s.index, "text": text, "logprobs": list(logprobs), "finish_reason": reason})

    def leave(self):
        """Drop finished and abandoned rows. Each hole takes the last active row (its cache row copied
        up to its length), so the active rows stay 0..B-1 and a step reads a plain slice of the cache."""
        for s in self.active:
            if s.cancelled and s.finish is None:  # a non-streamed handler still waits for this event
                self.finish(s, "abort", "")
        b = 0
        while b < len(self.active):
            if self.active[b].finish is None:
                b += 1
                continue
            last = self.active.pop()
            if b < len(self.active):
                self.cache.copy_rows([b], self.cache, [len(self.active)])
                self.active[b] = last

    def cut_all(self):
        """End every sequence now, in flight, prefilling or waiting, each with its last event (the drain is over)."""
        with self.cond:
            waiting = [s for g in self.waiting for s in g.seqs]
            self.waiting.clear()
            self.n_waiting = 0
        waiting += [s for g in self.prefilling for s in g.seqs]
        self.prefilling.clear()
        for s in self.active + waiting:
            if s.finish is None:
                self.finish(s, "abort" if s.cancelled else "length", "")
        self.active = []


# ---- metrics ------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in their own registry. The server's health under vLLM's names and "vllm:"
    prefix, so dashboards made for vLLM chart it unchanged; the model's health under "model_":
    prompt_bits_per_byte (how surprising the traffic is to the model: it rises as requests drift away
    from the training data), and per response the mean log-probability of its tokens, the share of
    tokens that repeat a 4-gram (degenerate loops) and what ended it. Latencies are per sequence,
    from the request's arrival, on time.monotonic(). static/grafana_dashboard.json charts them all."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", registry=r)
        self.success = Counter("vllm:request_success", "sequences finished, by reason (abort: the client left)",
                               ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "arrival to first token", buckets=lat, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "time between a sequence's tokens", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "arrival to last token", buckets=lat, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "arrival to prefill", buckets=lat, registry=r)
        self.batch_size = Histogram("batch_size", "rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                    registry=r)
        self.running = Gauge("vllm:num_requests_running", "sequences in the decode batch", registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "sequences waiting for a batch row (queue depth)",
                             registry=r)
        self.tokens_per_second = Gauge("generation_tokens_per_second", "tokens generated per second over the "
                                       "last 10 s", registry=r)
        self.prompt_bpb = Histogram("model_prompt_bits_per_byte", "the prompt's bits per byte under the model",
                                    buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8), registry=r)
        self.response_logprob = Histogram("model_response_mean_logprob", "mean log-probability of a response's "
                                          "tokens", buckets=(-8, -6, -4, -3, -2, -1.5, -1, -0.5, -0.25, -0.1, 0),
                                          registry=r)
        self.response_repetition = Histogram("model_response_repetition", "share of a response's tokens that "
                                             "repeat a 4-gram of it", buckets=(0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1),
                                             registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "prompt tokens found in the prefix cache", registry=r)
        self.finished = Counter("model_finish", "sequences ended, by cause: eos (the model's end of text), stop "
                                "(a stop string), length, abort, error", ["cause"], registry=r)


# ---- the HTTP API -------------------------------------------------------------------------------

class Service:
    """What the endpoints do, around a running engine: checks, queueing, and OpenAI's response shapes."""

    def __init__(self, model, tok, name, engine, log=None):
        self.tok, self.name, self.engine, self.log = tok, name, engine, log
        self.block_size, self.created = model.config.block_size, int(time.time())
        # a text of more bytes than this cannot fit the context, whatever its tokens: refused untokenized
        self.max_text_bytes = self.block_size * max(len(tok.decode_bytes([t])) for t in range(tok.vocab_size))

    def encode(self, text, param):
        if len(text) > self.max_text_bytes or len(text.encode("utf-8", "replace")) > self.max_text_bytes:
            raise APIError(400, f"the {param} is {len(text):,} characters, more than this model's context of "
                           f"{self.block_size} tokens can hold; shorten it", param, "context_length_exceeded")
        return self.tok.encode(text, allowed_special="all")

    def attach(self, loop):
        """Route the engine's events through this event loop: one thread hop per step for all the
        requests (a hop per token per request costs a wake-up of the loop each)."""
        def deliver(batch):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(lambda: [s.emit(event) for s, event in batch])
        self.engine.deliver = deliver

    def sampling(self, req, prompts, max_tokens, logprobs, extra_stop=()):
        """Check what both endpoints share; the request's Sampling."""
        if req.model != self.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r} "
                           f"(GET /v1/models)", "model", "model_not_found")
        if problem := sampling_problem(req.temperature, req.top_k, req.top_p):
            raise APIError(400, problem[1], problem[0])
        n, bs = len(prompts) * req.n, self.block_size
        if n > self.engine.max_batch:
            raise APIError(400, f"n={req.n} for {len(prompts)} prompt(s) is {n} sequences; this server decodes "
                           f"at most {self.engine.max_batch} together (max_batch)", "n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or "" in stops:
            raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty; send text or token ids", "prompt")
            if not all(0 <= t < self.tok.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.tok.vocab_size})", "prompt")
            if len(ids) + max_tokens > bs:
                raise APIError(400, f"this model's context is {bs} tokens, but {len(ids) + max_tokens} were asked "
                               f"for ({len(ids)} in the prompt, {max_tokens} for the completion); lower max_tokens "
                               f"or shorten the prompt", "prompt" if len(ids) >= bs else "max_tokens",
                               "context_length_exceeded")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.tok.vocab_size or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias maps token ids (0 to {self.tok.vocab_size - 1}, as strings) to "
                               f"biases from -100 to 100; got {key!r}: {value}", "logit_bias")
            bias[int(key)] = value
        return Sampling(req.temperature, req.top_k, req.top_p, max_tokens, req.seed, logprobs,
                        stops + list(extra_stop), req.ignore_eos, req.presence_penalty, req.frequency_penalty, bias)

    def start(self, prompts, n, sampling, prompt_logprobs=None):
        """Queue n sequences per prompt (choice i*n + j is prompt i's j-th, seeded seed + j).
        Returns (sequences, an async iterator of their events)."""
        if self.engine.cut_at is not None:
            raise APIError(503, "the server is shutting down", None, "shutting_down", {"Retry-After": "5"})
        if self.engine.broken:
            raise APIError(503, f"the model's device failed ({self.engine.broken}); restart the server",
                           None, "engine_failed")
        arrival, queue = time.monotonic(), asyncio.Queue()
        emit = queue.put_nowait  # called on the event loop's thread: see attach
        groups = []
        for i, ids in enumerate(prompts):
            seqs = []
            for j in range(n):
                s = Sampling(**vars(sampling))
                s.seed = None if s.seed is None else s.seed + j
                seqs.append(Sequence(i * n + j, s, emit, arrival, self.engine.device))
            groups.append(Group(ids, seqs, prompt_logprobs))
        try:
            self.engine.submit(groups)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e.args[0]} sequences are waiting (max_queue="
                           f"{self.engine.max_queue}); retry shortly", None, "queue_full", {"Retry-After": "1"})
        seqs = [s for g in groups for s in g.seqs]

        async def events():
            left = len(seqs)
            while left:
                event = await queue.get()
                if "error" in event:
                    raise APIError(500, f"generation failed: {event['error']}")
                left -= event["finish_reason"] is not None
                yield event
        return seqs, events()

    def token_text(self, t):
        b = self.tok.decode_bytes([t])
        try:
            return b.decode("utf-8"), b
        except UnicodeDecodeError:  # part of a character: OpenAI's notation for raw bytes
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b), b

    def completion_logprobs(self, entries):
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, alts, offset in entries:
            out["tokens"].append(self.token_text(t)[0])
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if alts is None else {self.token_text(a)[0]: v for a, v in alts})
            out["text_offset"].append(offset)
        return out

    def chat_logprobs(self, entries):
        def one(t, lp):
            text, b = self.token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(b)}
        return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in alts]}
                            for t, lp, alts, _ in entries]}

    async def respond(self, request, req, prompts, seqs, events, kind, choice):
        """One JSON answer, or a stream of chunks. choice(index, text, entries, reason, last) -> the
        choice object: for the whole answer (last=None), or for a chunk."""
        head = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.name}
        tokens = lambda: sum(len(s.tokens) for s in seqs)  # noqa: E731
        usage = lambda: {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": tokens(),  # noqa: E731
                         "total_tokens": sum(map(len, prompts)) + tokens()}
        if not req.stream:
            # Starlette does not cancel a plain handler when its client leaves: watch for that here
            watcher = asyncio.create_task(self.watch_disconnect(request, seqs))
            texts, entries, reasons = collections.defaultdict(str), collections.defaultdict(list), {}
            try:
                async for ev in events:
                    texts[ev["index"]] += ev["text"]
                    entries[ev["index"]] += ev["logprobs"]
                    reasons[ev["index"]] = ev["finish_reason"]
            finally:
                watcher.cancel()
                self.engine.cancel(seqs)  # a no-op unless this handler was cancelled
                self.write_log(req, kind, prompts, seqs, texts)
            choices = [choice(i, texts[i], entries[i], reasons[i], None) for i in sorted(reasons)]
            return JSONResponse({**head, "choices": choices, "usage": usage()})

        if kind == "chat":
            head["object"] = "chat.completion.chunk"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def line(obj):  # with include_usage, every chunk has "usage": null but the last
            if include_usage and "usage" not in obj:
                obj = {**obj, "usage": None}
            return "data: " + json.dumps(obj) + "\n\n"

        async def sse():
            texts = collections.defaultdict(str)
            try:
                if kind == "chat":  # the role comes first, in a chunk of its own
                    for s in seqs:
                        role = {"role": "assistant", "content": ""}
                        yield line({**head, "choices": [{"index": s.index, "delta": role, "logprobs": None,
                                                         "finish_reason": None}]})
                async for ev in events:
                    texts[ev["index"]] += ev["text"]
                    if ev["text"] or ev["logprobs"]:
                        yield line({**head, "choices": [choice(ev["index"], ev["text"], ev["logprobs"], None, False)]})
                    if ev["finish_reason"]:  # a choice's last chunk: no text, and the reason
                        yield line({**head, "choices": [choice(ev["index"], "", [], ev["finish_reason"], True)]})
                if include_usage:
                    yield line({**head, "choices": [], "usage": usage()})
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            finally:
                self.engine.cancel(seqs)  # a disconnect lands here (Starlette cancels the stream)
                self.write_log(req, kind, prompts, seqs, texts)
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def write_log(self, req, kind, prompts, seqs, texts):
        """One line per prompt of the request in the request log, if there is one: what eval.py can read
        back (--task=ppl --data=LOG --text_field=prompt, or --prompts=LOG)."""
        if self.log is None:
            return
        settings = req.model_dump(exclude={"prompt", "messages", "stream_options"}, exclude_none=True)
        n = len(seqs) // len(prompts)
        for p, ids in enumerate(prompts):
            mine = seqs[p * n:(p + 1) * n]
            self.log.write({
                "time": time.time(), "endpoint": kind, "prompt": self.tok.decode(ids),
                "completion": texts.get(mine[0].index, ""), "completions": [texts.get(s.index, "") for s in mine],
                "settings": settings, "prompt_tokens": len(ids), "completion_tokens": [len(s.tokens) for s in mine],
                "finish_reason": [s.finish for s in mine], "seconds": round(time.monotonic() - mine[0].arrival, 4),
                "prompt_bits_per_byte": mine[0].prompt_bpb,
                "mean_logprob": [s.logprob_sum / len(s.tokens) if s.tokens else None for s in mine],
                "repetition": [repetition(s.tokens) for s in mine]})

    async def watch_disconnect(self, request, seqs):
        while (await request.receive())["type"] != "http.disconnect":  # the body has been read already
            pass
        self.engine.cancel(seqs)

    async def completions(self, request, req):
        p = req.prompt
        p = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p or [[]]
        # "" starts a new document, as in sample.py: prepare.py puts <|endoftext|> before each one
        prompts = [list(x) if not isinstance(x, str) else self.encode(x, "prompt") if x
                   else [self.tok.eot_token] for x in p]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # null: OpenAI's default
        scoring = req.echo and req.logprobs is not None  # the prompt's logprobs are wanted too
        if max_tokens < 1 and not (max_tokens == 0 and scoring):
            raise APIError(400, f"max_tokens={max_tokens} must be at least 1 (0 only with echo=true and "
                           f"logprobs, to score the prompt)", "max_tokens")
        sampling = self.sampling(req, prompts, max_tokens, req.logprobs)
        seqs, events = self.start(prompts, req.n, sampling, req.logprobs if scoring else None)
        echo = {s.index: self.tok.decode(prompts[s.index // req.n]) if req.echo else "" for s in seqs}
        unsent = dict(echo)  # streamed: the prompt goes in front of the choice's first chunk

        def choice(i, text, entries, reason, last):
            text = (echo[i] if last is None else unsent.pop(i, "")) + text
            lp = self.completion_logprobs(entries) if req.logprobs is not None and (entries or last is None) else None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
        return await self.respond(request, req, prompts, seqs, events, "completion", choice)

    async def chat(self, request, req):
        lines = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            lines.append(content + "\n" if m.role in ("system", "developer") else
                         f"{'User' if m.role == 'user' else 'Assistant'}: {content}")
        ids = [self.tok.eot_token] + self.encode("\n".join(lines) + "\nAssistant:", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.block_size - len(ids))  # the rest of the context, as OpenAI
        if max_tokens < 1:
            raise APIError(400, f"max_tokens={max_tokens} must be at least 1", "max_tokens")
        top = (req.top_logprobs or 0) if req.logprobs else None
        seqs, events = self.start([ids], req.n, self.sampling(req, [ids], max_tokens, top, [CHAT_STOP]))

        def choice(i, text, entries, reason, last):
            lp = self.chat_logprobs(entries) if req.logprobs and (entries or last is None) else None
            if last is None:
                return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": reason}
            return {"index": i, "delta": {} if last else {"content": text}, "logprobs": lp, "finish_reason": reason}
        return await self.respond(request, req, [ids], seqs, events, "chat", choice)


class RequestLog:
    """Requests as JSON lines (never the API key: it is a header, not part of the request body), in
    `path`, which is renamed to path.1 (replacing the previous one) once it grows past max_bytes."""

    def __init__(self, path, max_bytes):
        self.path, self.max_bytes = path, max_bytes
        open(path, "a").close()  # a folder that is not there, or not writable, fails at start

    def write(self, record):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if os.path.exists(self.path) and os.path.getsize(self.path) + len(line) > self.max_bytes:
            os.replace(self.path, self.path + ".1")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def build_app(service, metrics, key=""):
    """The ASGI app: FastAPI's routes behind Gate (the API key, and counting requests)."""
    engine = service.engine

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.attach(asyncio.get_running_loop())
        engine.thread.start()
        yield
        engine.stop()

    app = FastAPI(title="gpt-from-scratch", lifespan=lifespan, docs_url=None, redoc_url=None)  # /openapi.json
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "playground.html")) as f:
        playground = f.read()

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):  # pydantic's report -> a 400 naming the field
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('msg')}", None, "invalid_json").response()
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "extra_forbidden":
            return APIError(400, f"{'.'.join(loc)}: this server does not implement this field; leave it out",
                            loc[0] if loc else None, "unsupported_field").response()
        return APIError(400, f"{'.'.join(loc)}: {err.get('msg')}" if loc else err.get("msg"),
                        loc[0] if loc else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown route, wrong method
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                        "not_found" if e.status_code == 404 else None, e.headers).response()

    @app.exception_handler(Exception)
    async def crash(request, e):
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        return await service.completions(request, req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest):
        return await service.chat(request, req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "gpt-from-scratch", "max_model_len": service.block_size}]}

    @app.get("/health")
    async def health():
        if engine.cut_at is not None:  # draining: a load balancer should send no more
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine.broken or not engine.thread.is_alive():  # the device failed: every request would too
            return JSONResponse({"status": "error", "error": engine.broken or "the engine thread stopped"},
                                status_code=503)
        return {"status": "ok", "model": service.name, "running": len(engine.active), "waiting": engine.n_waiting}

    @app.get("/metrics")
    async def scrape():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return HTMLResponse(playground)

    return Gate(app, key, metrics, {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                    "/metrics", "/", "/openapi.json"})


class Gate:
    """ASGI middleware in front of the app: the API key on /v1/* (so /health, /metrics and the page
    stay open), a bound on the body's size (read here, before any parsing), and the count of every
    request by route and status, those it refuses included."""

    def __init__(self, app, key, metrics, routes):
        self.app, self.key, self.metrics, self.routes = app, key, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        path = scope["path"]
        try:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if self.key and path.startswith("/v1/") and not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send_status)
            if scope["method"] == "POST":  # the whole body, at most MAX_BODY bytes, then replayed to the app
                body, more = b"", True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > MAX_BODY:
                        err = APIError(413, f"the request body is over {MAX_BODY // 2 ** 20} MiB", None,
                                       "body_too_large")
                        return await err.response()(scope, receive, send_status)
                replay = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive_again():  # then, as the client's next message: it left
                    return replay.pop() if replay else await receive()
                return await self.app(scope, receive_again, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(path if path in self.routes else "other", str(status[0])).inc()


class Server(uvicorn.Server):
    """uvicorn's Server, draining on SIGTERM and SIGINT: the engine is told when to cut what is left,
    and the process exits 0 (uvicorn itself re-raises the signal after shutdown: status 143)."""

    def __init__(self, config, engine, drain):
        super().__init__(config)
        self.engine, self.drain = engine, drain

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            print(f"{signal.Signals(sig).name}: accepting no more connections; finishing the requests in "
                  f"flight (for at most {self.drain:g} s)", file=sys.stderr, flush=True)
        self.engine.drain(self.drain)
        self.force_exit = self.should_exit  # a second signal: stop waiting
        self.should_exit = True


def main(argv=None):
    configure(globals(), argv, renamed=OLD_MODEL_FLAGS)
    # every setting is checked before anything is loaded or bound
    if quantize not in MODES:
        raise UserError(f"quantize={quantize!r} is not one of {', '.join(map(repr, MODES))}")
    if max_batch < 1 or max_queue < 0 or drain_seconds < 0 or not 0 <= port < 65536 or threads < 0 or \
            prefill_chunk < 0 or prefix_cache < 0 or log_max_mb <= 0:
        raise UserError(f"need max_batch >= 1, max_queue >= 0, drain_seconds >= 0, 0 <= port < 65536, threads, "
                        f"prefill_chunk, prefix_cache >= 0 and log_max_mb > 0; got max_batch={max_batch}, max_queue="
                        f"{max_queue}, drain_seconds={drain_seconds}, port={port}, threads={threads}, prefill_chunk="
                        f"{prefill_chunk}, prefix_cache={prefix_cache}, log_max_mb={log_max_mb}")
    if draft:  # measured (bench/README.md): a draft step costs a quarter of a target step on a CPU, so even one
        # stream gained nothing; a batch of rows already shares each target step, and a round that scores
        # draft_k + 1 tokens per row costs the batch more where rows accept different numbers of them
        raise UserError("--draft: serve.py does not decode speculatively (its continuous batch already shares each "
                        "step among rows, and a draft gained nothing on a CPU); use sample.py --draft=RUN, or "
                        "serve without --draft")
    log = RequestLog(log_requests, int(log_max_mb * 2 ** 20)) if log_requests else None
    dev, device_type, ptdtype = pick_device(device, dtype)
    if compile and compile_problem(device_type):
        raise UserError(f"--compile=True: {compile_problem(device_type)}; or serve without it")
    if quantize == "int4-gptq":
        raise UserError("quantize=int4-gptq needs calibration data: make the model with eval.py --quantize=int4-gptq "
                        "--save_quantized=FILE, then serve --model=FILE")
    if quantize != "none" and device_type != "cpu":
        raise UserError(f"quantize={quantize!r} runs on the CPU only, but the device is {dev}; add --device=cpu")
    if threads:
        torch.set_num_threads(threads)
    key = api_key or os.environ.get("SERVE_API_KEY", "")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound before the model loads, so a busy port is a one-line error at once
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; another server may be there: "
                        f"pick another --port") from None

    opened = open_model(model, ckpt)
    if quantize != "none" and getattr(opened.model, "quantization", None):
        raise UserError(f"--model is already quantized ({opened.model.quantization['mode']}); drop --quantize")
    gpt = quantize_model(for_inference(opened.model, dev, device_type, ptdtype), quantize)
    tok, where = opened.tokenizer, opened.description
    name = model_name or os.path.basename(os.path.normpath(model))
    metrics = Metrics()
    engine = Engine(gpt, tok, max_batch, max_queue, metrics, device_type, ptdtype, prefill_chunk, prefix_cache,
                    score_prompts, Decoder(gpt, device_type) if compile else None)
    try:
        seconds = engine.warm_up()
    except torch.OutOfMemoryError:
        raise UserError(f"the KV cache of max_batch={max_batch} rows x {gpt.config.block_size} positions does not "
                        f"fit in {dev}'s memory; lower --max_batch") from None
    if compile:
        print(f"compiling the decode step: {seconds:.0f} s, once", file=sys.stderr)
    app = build_app(Service(gpt, tok, name, engine, log), metrics, key)
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=drain_seconds + 5), engine, drain_seconds)
    sock.listen(128)
    precision = quantize if quantize != "none" else str(ptdtype).removeprefix("torch.")
    print(f"serving {where} as {name!r}: {gpt.config.n_layer} layers, {weight_bytes(gpt) / 1e6:.1f} MB of "
          f"weights ({precision}) on {dev}, max_batch={max_batch}{', API key required' if key else ''}",
          file=sys.stderr)
    print(f"listening on http://{host}:{sock.getsockname()[1]} (playground: /, API: /v1)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    run(main)
