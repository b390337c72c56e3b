"""
bench/bench_serve.py: what continuous batching buys on this CPU. serve.py is started on 127.0.0.1 and
streamed to by 1, 4 and 16 concurrent clients, and compared with serving one request at a time (the
same server with max_batch=1, under 16 clients), in float32 and in int8 (quantize.py), for two model
shapes: the quick start's (modern preset, 4 layers, 128 wide, context 128, vocabulary 4,096: 1.4M
parameters) and a ~14M-parameter one (7 layers, 384 wide, context 256, the same vocabulary).

The weights are untrained (the usual random initialisation): the work per token does not depend on
what the weights say, and ignore_eos makes every request exactly max_tokens long. Reported per level:
aggregate completion tokens/s (all tokens over the wall time), and the p50/p99 of each request's
latency and time to first token. The load is bounded: `requests` requests per level, to 127.0.0.1.

With --ppl_run=DIR (a trained run, e.g. out-quickstart), it also scores that run's model on its own
validation shard in float32 and int8: perplexity, and the weights' size.

    python bench/bench_serve.py                                   # both shapes, float32 and int8
    python bench/bench_serve.py --models=quickstart --ppl_run=out-quickstart --threads=2
"""
import asyncio
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import torch

from benchlib import ROOT  # first: it puts the repository root on sys.path for the imports below
from bpe import Tokenizer
from checkpoint import VERSION, find, load, load_model
from configurator import configure, run
from model import GPT, GPTConfig
from quantize import quantize, weight_bytes
from shards import read_shard

models = "quickstart,14m"  # which shapes (SHAPES below), comma separated
weights = "none,int8"      # quantize= settings to compare
clients = (1, 4, 16)       # concurrent streaming clients
requests = 32              # requests per level, spread over the clients
max_tokens = 64            # tokens per request (ignore_eos: exactly this many)
threads = 1                # serve.py --threads
ppl_run = ""               # a trained run directory: also perplexity and size, float32 vs int8
ppl_windows = 256          # validation windows of block_size tokens to score
work = "data/bench_serve"  # checkpoints of the untrained models go here

SHAPES = {  # GPTConfig.preset("modern", ...) overrides
    "quickstart": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "14m": dict(n_layer=7, n_head=6, n_embd=384, block_size=256),
}


def tokenizer():
    """The stdlib quick start's 4,096-token BPE if prepared, else one trained here on the stdlib source."""
    path = os.path.join(ROOT, "data", "stdlib", "tokenizer.bpe")
    if os.path.exists(path):
        return Tokenizer.load(path)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    return Tokenizer.train([open(f, encoding="utf-8", errors="replace").read() for f in files], 4096)


def untrained_run(name, tok):
    """A run directory holding one checkpoint of a randomly initialised model of shape `name`."""
    out = os.path.join(ROOT, work, name)
    config = GPTConfig.preset("modern", vocab_size=tok.vocab_size, **SHAPES[name])
    if not os.path.exists(os.path.join(out, "ckpt_000000.pt")):
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(0)
        torch.save({"version": VERSION, "model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config),
                    "tokenizer": tok.dumps(), "iter_num": 0}, os.path.join(out, "ckpt_000000.pt"))
    return out, GPT(config).num_params(non_embedding=False)


class Server:
    def __init__(self, run_dir, *args):
        self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--model={run_dir}",
                                   "--port=0", f"--threads={threads}", *args],
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline, self.err = time.monotonic() + 120, ""
        while time.monotonic() < deadline:  # the server prints the port it got, once it is listening
            line = self.p.stderr.readline()
            self.err += line
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                return
            if not line and self.p.poll() is not None:
                break
        raise SystemExit(f"serve.py did not start:\n{self.err}")

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


async def load_test(url, model, n_clients, n_requests):
    """n_requests streamed requests from n_clients concurrent clients -> (tokens/s, latencies, ttfts)."""
    import httpx
    body = {"model": model, "prompt": "def ", "max_tokens": max_tokens, "temperature": 0.8, "top_k": 200,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    todo, done = list(range(n_requests)), []

    async def client(http):
        while todo:
            i = todo.pop()
            t0, ttft, tokens = time.perf_counter(), None, 0
            async with http.stream("POST", url + "/v1/completions", json={**body, "seed": i}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk["choices"]:
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            done.append((time.perf_counter() - t0, ttft, tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n_clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    assert all(n == max_tokens for _, _, n in done), "a request came back short"
    return sum(n for _, _, n in done) / wall, [d[0] for d in done], [d[1] for d in done]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def perplexity(model, tokens, block):
    """exp(mean next-token loss) over ppl_windows non-overlapping windows of the validation tokens."""
    x = torch.as_tensor(tokens[:ppl_windows * block + 1].astype("int64"))
    n = (x.numel() - 1) // block
    inputs, targets = x[:n * block].view(n, block), x[1:n * block + 1].view(n, block)
    with torch.inference_mode():
        losses = [model(inputs[i:i + 8], targets[i:i + 8])[1].item() for i in range(0, n, 8)]
    return math.exp(sum(losses) / len(losses))


def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    if models:
        print(f"bench_serve: {requests} requests of {max_tokens} tokens per level, serve.py --threads={threads}, "
              f"{os.cpu_count()} cores; untrained weights")
    tok = tokenizer()
    rows = []
    for name in filter(None, models.split(",")):  # --models= skips the load tests
        run_dir, n_params = untrained_run(name, tok)
        for w in weights.split(","):
            levels = [("batched", c, ["--max_batch=16"]) for c in clients] + [("one at a time", 16, ["--max_batch=1"])]
            for serving, n_clients, flags in levels:
                server = Server(run_dir, f"--quantize={w}", *flags, f"--max_queue={requests}")
                try:
                    asyncio.run(load_test(server.url, name, 1, 2))  # warm-up: the first call allocates the cache
                    tps, lat, ttft = asyncio.run(load_test(server.url, name, n_clients, requests))
                finally:
                    server.stop()
                rows.append((name, n_params, "float32" if w == "none" else w, serving, n_clients, tps, lat, ttft))
                print(f"  {name} ({n_params / 1e6:.1f}M) {rows[-1][2]:7s} {serving:13s} {n_clients:2d} clients: "
                      f"{tps:7.0f} tokens/s, latency p50 {pct(lat, 50):.2f} s p99 {pct(lat, 99):.2f} s, "
                      f"TTFT p50 {pct(ttft, 50) * 1000:.0f} ms p99 {pct(ttft, 99) * 1000:.0f} ms", flush=True)

    if rows:
        print("\n| model | weights | serving | clients | tokens/s | latency p50 / p99 | TTFT p50 / p99 |")
        print("|---|---|---|---|---|---|---|")
    for name, n, w, serving, c, tps, lat, ttft in rows:
        print(f"| {name} ({n / 1e6:.1f}M) | {w} | {serving} | {c} | {tps:,.0f} | {pct(lat, 50):.2f} / "
              f"{pct(lat, 99):.2f} s | {pct(ttft, 50) * 1000:.0f} / {pct(ttft, 99) * 1000:.0f} ms |")
    tps = {(r[0], r[2], r[3], r[4]): r[5] for r in rows}
    for name, w in dict.fromkeys((r[0], r[2]) for r in rows):
        if (name, w, "batched", 16) in tps:
            ratio = tps[name, w, "batched", 16] / tps[name, w, "one at a time", 16]
            print(f"{name} {w}: 16 clients, batched / one at a time = {ratio:.1f}x (target >= 4x)")

    if ppl_run:
        model, _, where = load_model(ppl_run)
        dataset = load(find(ppl_run))["config"]["dataset"]  # the shards sit beside the run, as train.py found them
        val = read_shard(os.path.join(os.path.dirname(os.path.abspath(ppl_run)), "data", dataset,
                                      f"{dataset}_val_000000.bin"))
        block = model.config.block_size
        print(f"\n{where}, {ppl_windows} validation windows of {block} tokens:")
        for w in ("none", "int8"):
            m = quantize(model, w)
            print(f"  {'int8' if w == 'int8' else 'float32':7s}: weights {weight_bytes(m) / 1e6:.2f} MB, "
                  f"perplexity {perplexity(m, val, block):.3f}")


if __name__ == "__main__":
    run(main)
