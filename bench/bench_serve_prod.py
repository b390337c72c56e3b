"""
bench/bench_serve_prod.py: what serve.py's production features do, measured on 127.0.0.1.

  chunk    Long prompts arriving among short requests. A modern-preset model with a 2,048-token context
           serves 4 clients that each send short requests (a 16-token prompt, 32 tokens out) back to
           back, while a fifth client sends 1,900-token prompts one after another. Reported: the short
           requests' time to first token and inter-token latency, p50 and p99, with --prefill_chunk=0
           (a long prompt is one forward, which every other row waits for) and with chunks of 256.
  prefix   Requests that share a 1,000-token beginning (a long system prompt), each with its own
           16-token question and 8 tokens out, from 4 clients: requests per second with --prefix_cache=0
           and with a 4,096-token prefix cache.
  drift    The prompt-surprise metric on a trained run (--run_dir, e.g. out-quickstart, trained on code):
           200 prompts from its own validation text, then 200 from English prose (the licence texts in
           /usr/share/common-licenses); model_prompt_bits_per_byte's median for each, read from /metrics.

The models of chunk and prefix are untrained: the work per token does not depend on what the weights
say, and ignore_eos makes every request exactly max_tokens long. Run it alone: two cores are easily shared.

    python bench/bench_serve_prod.py --run_dir=out-quickstart
    python bench/bench_serve_prod.py --which=chunk,prefix
"""
import dataclasses
import glob
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import torch

from benchlib import ROOT  # first: it puts the repository root on sys.path for the imports below
from bpe import Tokenizer
from checkpoint import VERSION, open_model
from configurator import configure, run
from model import GPT, GPTConfig
from shards import read_shard

which = "chunk,prefix,drift"
run_dir = ""               # drift: a trained run directory (its val shard is found beside it, as train.py does)
threads = 1                # serve.py --threads
seconds = 40.0             # chunk: how long the load runs, per setting
work = "data/bench_serve_prod"
SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=2048)  # the modern preset at a 2,048-token context


def untrained(tok):
    out = os.path.join(ROOT, work, "modern2048")
    config = GPTConfig.preset("modern", vocab_size=tok.vocab_size, **SHAPE)
    if not os.path.exists(os.path.join(out, "ckpt_000000.pt")):
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(0)
        torch.save({"version": VERSION, "model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config),
                    "tokenizer": tok.dumps(), "iter_num": 0}, os.path.join(out, "ckpt_000000.pt"))
    return out


class Server:
    def __init__(self, model, *args):
        self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--model={model}", "--port=0",
                                   f"--threads={threads}", "--max_queue=256", *args], stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline, err = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            line = self.p.stderr.readline()
            err += line
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url, self.name = found.group(1), os.path.basename(os.path.normpath(model))
                return
            if not line and self.p.poll() is not None:
                break
        raise SystemExit(f"serve.py did not start:\n{err}")

    def stream(self, prompt, max_tokens):
        """One streamed request -> (time to first token, [gaps between tokens]) in seconds."""
        t0, times = time.perf_counter(), []
        body = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():  # a chunk with text: a token arrived (a partial character waits)
                if line.startswith("data: {") and any(c.get("text") for c in json.loads(line[6:])["choices"]):
                    times.append(time.perf_counter())
        times = times[:max_tokens]
        return times[0] - t0, list(np.diff(times))

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def pct(xs, p):
    return float(np.percentile(xs, p)) if xs else float("nan")


def chunk_bench(tok):
    model = untrained(tok)
    rng = random.Random(0)
    long_prompt = [rng.randrange(tok.vocab_size) for _ in range(1900)]
    rows = []
    for chunk in (0, 256):
        server = Server(model, f"--prefill_chunk={chunk}", "--prefix_cache=0", "--score_prompts=False")
        ttft, itl, stop, longs = [], [], time.monotonic() + seconds, [0]
        try:
            server.stream("def ", 4)  # warm-up

            def short():
                while time.monotonic() < stop:
                    t, gaps = server.stream("def f(x):\n    return", 32)
                    ttft.append(t)
                    itl.extend(gaps)

            def long():
                while time.monotonic() < stop:
                    server.stream(long_prompt, 4)
                    longs[0] += 1
            workers = [threading.Thread(target=short) for _ in range(4)] + [threading.Thread(target=long)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            server.stop()
        rows.append((chunk, ttft, itl, longs[0]))
        print(f"  prefill_chunk={chunk}: {len(ttft)} short requests, {longs[0]} long prompts; TTFT p50 "
              f"{pct(ttft, 50) * 1000:.0f} ms p99 {pct(ttft, 99) * 1000:.0f} ms; ITL p50 {pct(itl, 50) * 1000:.1f} ms "
              f"p99 {pct(itl, 99) * 1000:.1f} ms", flush=True)
    print("\n| prefill_chunk | short requests | long prompts | TTFT p50 / p99 | ITL p50 / p99 |\n|---|---|---|---|---|")
    for chunk, ttft, itl, n in rows:
        print(f"| {chunk or 'off'} | {len(ttft)} | {n} | {pct(ttft, 50) * 1000:.0f} / {pct(ttft, 99) * 1000:.0f} ms | "
              f"{pct(itl, 50) * 1000:.1f} / {pct(itl, 99) * 1000:.1f} ms |")


def prefix_bench(tok):
    model = untrained(tok)
    rng = random.Random(1)
    shared = [rng.randrange(tok.vocab_size) for _ in range(1000)]
    questions = [[rng.randrange(tok.vocab_size) for _ in range(16)] for _ in range(64)]
    print()
    for cache in (0, 4096):
        server = Server(model, f"--prefix_cache={cache}", "--score_prompts=False")
        try:
            server.stream(shared + questions[0], 2)  # warm-up (and, with the cache, the shared prefix)
            todo, lock = list(questions), threading.Lock()

            def client():
                while True:
                    with lock:
                        if not todo:
                            return
                        q = todo.pop()
                    server.stream(shared + q, 8)
            t0 = time.perf_counter()
            workers = [threading.Thread(target=client) for _ in range(4)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rate = len(questions) / (time.perf_counter() - t0)
        finally:
            server.stop()
        print(f"| prefix_cache={cache} | {len(questions)} requests sharing 1,000 tokens | {rate:.2f} requests/s |",
              flush=True)


def drift_bench():
    opened = open_model(run_dir)
    dataset = opened.state["config"]["dataset"]
    data = os.path.join(os.path.dirname(os.path.abspath(opened.run_dir)), "data", dataset)
    val = read_shard(os.path.join(data, f"{dataset}_val_000000.bin"))
    tok, rng = opened.tokenizer, random.Random(2)
    own = [tok.decode(val[s:s + 96].tolist()) for s in (rng.randrange(len(val) - 96) for _ in range(200))]
    prose_text = " ".join(open(f, errors="replace").read() for f in sorted(glob.glob("/usr/share/common-licenses/*"))
                          if os.path.isfile(f))
    words = prose_text.split()
    prose = [tok.decode(tok.encode(" ".join(words[s:s + 60]))[:96])  # 96 tokens, as the val prompts
             for s in (rng.randrange(len(words) - 60) for _ in range(200))]
    server = Server(run_dir)
    try:
        medians = []
        for label, prompts in (("its own val text", own), ("English prose", prose)):
            before = httpx.get(server.url + "/metrics").text
            for p in prompts:
                httpx.post(server.url + "/v1/completions", json={"model": server.name, "prompt": p, "max_tokens": 1},
                           timeout=60).raise_for_status()
            after = httpx.get(server.url + "/metrics").text
            medians.append((label, median_from_buckets(before, after)))
    finally:
        server.stop()
    print(f"\nprompt surprise on {opened.description}, 200 prompts each:")
    print("| prompts | median model_prompt_bits_per_byte |\n|---|---|")
    for label, m in medians:
        print(f"| {label} | {m:.2f} |")


def median_from_buckets(before, after):
    """The median of the observations between two scrapes of a Prometheus histogram, interpolated in its bucket."""
    def buckets(text):
        return {float(le): float(v) for le, v in
                re.findall(r'^model_prompt_bits_per_byte_bucket\{le="([^"]+)"\} (\S+)$', text, re.M) if le != "+Inf"}
    b, a = buckets(before), buckets(after)
    les = sorted(a)
    counts = [a[le] - b.get(le, 0) for le in les]
    half, prev_le, prev_c = counts[-1] / 2, 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= half:
            return prev_le + (le - prev_le) * (half - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return float("inf")


def main(argv=None):
    configure(globals(), argv)
    path = os.path.join(ROOT, "data", "stdlib", "tokenizer.bpe")
    tok = Tokenizer.load(path) if os.path.exists(path) else Tokenizer.gpt2()
    print(f"bench_serve_prod: serve.py --threads={threads}, {os.cpu_count()} cores")
    if "chunk" in which:
        chunk_bench(tok)
    if "prefix" in which:
        prefix_bench(tok)
    if "drift" in which and run_dir:
        drift_bench()


if __name__ == "__main__":
    run(main)
