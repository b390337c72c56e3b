"""
bench/bench_decode.py: eager against compiled decoding (decode.py) on this CPU. decode.generate, greedy,
new_tokens tokens after a prompt of prompt_tokens, at batch 1 and 16, for three shapes with random
weights (the work per token does not depend on what the weights say): the quick start's (modern
preset, 4 layers, 128 wide, vocabulary 4,096, here with a 256-token context), 6 layers 384 wide (the
same otherwise), and GPT-2 124M (gpt2 preset: 12 layers, 768 wide, vocabulary 50,257, context 1,024).

    python bench/bench_decode.py                                  # every shape, batch 1 and 16
    python bench/bench_decode.py --shapes=quickstart --batches=1 --modes=cpp_wrapper,default,max-autotune-no-cudagraphs

Each (shape, batch, inductor mode) runs in two fresh processes that share one new inductor cache
directory (TORCHINDUCTOR_CACHE_DIR): the first compiles from nothing (a first start), the second finds
its FX graph cache filled (a warm start, as every start after the first on a machine). tokens/s count
generation only, after a warm-up; "same" says whether compiled greedy tokens equal eager ones.
Modes: cpp_wrapper (decode.py's choice on a CPU: the kernels called from C++), default (called from a
Python wrapper), max-autotune-no-cudagraphs (inductor also benchmarks its own matmul kernels).

Speculative decoding (speculative.py) needs trained weights (a draft that agrees with its target), so it
runs on a trained target and drafts with its tokenizer, batch 1, after a text prompt:

    python bench/bench_decode.py --target=out-gpt1-laptop --drafts=draft-1x64,draft-2x128 --draft_ks=2,3,4

For each draft and k, greedy and at temperature 0.8: tokens/s eager and compiled (speculative.compile,
both models' steps), against the target alone eager and compiled in the same process, the fraction of
guesses accepted, and for greedy whether the text equals the target's own.

Where a step's time goes, batch 1, greedy, eager and compiled: the model's step (hidden_states), the
head, choosing the token, and the whole of generate's step, each in ms per token:

    python bench/bench_decode.py --breakdown=out-quickstart --start="def " --new_tokens=100
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchlib import ROOT, timed  # first: it puts the repository root on sys.path for the imports below
from configurator import configure, run
from checkpoint import open_model
from decode import Decoder, generate, sample_next
from model import GPT, GPTConfig, KVCache
from speculative import SpeculativeDecoder, check_draft

shapes = "quickstart,6x384,gpt2"  # which shapes (SHAPES below), comma separated
batches = (1, 16)                  # rows generated together
modes = "cpp_wrapper"              # inductor settings to compare (MODES below), comma separated
new_tokens = 240                   # tokens generated per row
prompt_tokens = 16                 # random prompt tokens per row
threads = 0                        # torch threads; 0 = torch's default (all cores), as sample.py
one = ""                           # internal: measure "shape,batch,mode,eager" in this process, print JSON
target = ""                        # speculative sweep instead: a trained run (any --model form of sample.py)
drafts = ""                        # its drafts (same tokenizer), comma separated
draft_ks = "2,3,4"                 # tokens a draft proposes per round
temperatures = "0,0.8"             # 0: greedy
start = "It was a dark and stormy night, and"  # the prompt
breakdown = ""                     # instead: where a greedy step's time goes for this run, batch 1

SHAPES = {  # GPTConfig.preset arguments
    "quickstart": dict(name="modern", n_layer=4, n_head=4, n_embd=128, vocab_size=4096, block_size=256),
    "6x384": dict(name="modern", n_layer=6, n_head=6, n_embd=384, vocab_size=4096, block_size=256),
    "gpt2": dict(name="gpt2"),
}
MODES = {"cpp_wrapper": dict(options={"cpp_wrapper": True}), "default": {},
         "max-autotune-no-cudagraphs": dict(mode="max-autotune-no-cudagraphs")}


def measure(shape, batch, mode, eager):
    """One process's figures: eager tokens/s (if eager), compile seconds, compiled tokens/s."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(**SHAPES[shape])).eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens))
    out, result = None, {}
    if eager:
        generate(model, prompt, 8, temperature=0)  # warm-up: the first calls allocate
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0)
        result["eager"] = batch * new_tokens / (time.perf_counter() - t0)
    decoder = Decoder(model, "cpu")
    decoder.step = torch.compile(model.hidden_states, fullgraph=True, dynamic=False, **MODES[mode])  # the mode asked
    result["compile_s"] = decoder.warm_up(decoder.cache(batch, prompt_tokens + new_tokens))
    t0 = time.perf_counter()
    compiled = generate(model, prompt, new_tokens, temperature=0, decoder=decoder)
    result["compiled"] = batch * new_tokens / (time.perf_counter() - t0)
    if out is not None:
        result["same"] = torch.equal(out, compiled)
    return result


def child(shape, batch, mode, eager, cache_dir):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_decode.py"), f"--threads={threads}",
                        f"--one={shape},{batch},{mode},{int(eager)}", f"--new_tokens={new_tokens}",
                        f"--prompt_tokens={prompt_tokens}"],
                       env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{shape} batch {batch} {mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def where_time_goes():
    """ms per token of each part of a greedy decode step at batch 1, eager and compiled (bench_llamacpp.py's gap)."""
    opened = open_model(breakdown)
    gpt, prompt = opened.model.eval(), torch.tensor([opened.tokenizer.encode(start)])
    T = prompt.size(1)
    print(f"breakdown: {breakdown} ({gpt.num_params(non_embedding=False) / 1e6:.2f}M parameters), {new_tokens} "
          f"tokens after {T}, batch 1, {torch.get_num_threads()} threads (ms per token)")
    for decoder in (None, Decoder(gpt, "cpu")):
        cache = decoder.cache(1, T + new_tokens) if decoder else KVCache(gpt.config.n_layer, 1, T + new_tokens)
        if decoder:
            decoder.warm_up(cache)
        parts = dict(step=0.0, head=0.0, choose=0.0)
        for rep in range(2):  # the first pass warms up (allocations); the second is timed
            cache.pos.zero_()
            step = (lambda x, s: decoder(x, cache, s)) if decoder else (lambda x, s: gpt.hidden_states(x, cache))
            h = step(prompt, 0)
            for i in range(new_tokens - 1):
                t0 = time.perf_counter()
                logits = gpt.head(h[:, -1:])[:, -1]
                t1 = time.perf_counter()
                nxt = sample_next(logits, 0)
                t2 = time.perf_counter()
                h = step(nxt, T + i)
                for part, seconds in zip(parts, (time.perf_counter() - t2, t1 - t0, t2 - t1)):
                    parts[part] += seconds * rep  # rep 0: not counted
        _, tps = timed(lambda n: generate(gpt, prompt, n, temperature=0, decoder=decoder), new_tokens)
        print(f"  {'compiled' if decoder else 'eager'}: " + ", ".join(
            f"{k} {v * 1e3 / (new_tokens - 1):.2f}" for k, v in parts.items()) + f"; generate {1e3 / tps:.2f} "
            f"({tps:.0f} tokens/s, the prefill included)", flush=True)


def speculative_sweep():
    big = open_model(target)
    prompt = torch.tensor([big.tokenizer.encode(start)])
    gpt, T = big.model.eval(), prompt.size(1)
    print(f"speculative: {target} ({gpt.num_params(non_embedding=False) / 1e6:.2f}M parameters), {T} prompt tokens, "
          f"{new_tokens} new, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    decoder = Decoder(gpt, "cpu")
    t0 = time.perf_counter()
    decoder.warm_up(decoder.cache(1, T + new_tokens))
    print(f"  target alone: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    lines = []
    for temp in map(float, temperatures.split(",")):
        gen = lambda n, d=None: generate(gpt, prompt, n, temperature=temp, decoder=d)  # noqa: E731
        ref, plain = timed(gen, new_tokens)
        _, plain_c = timed(lambda n: gen(n, decoder), new_tokens)
        print(f"  T {temp}: target alone {plain:.0f} tokens/s eager, {plain_c:.0f} compiled", flush=True)
        lines.append(f"| target alone | | {temp} | | {plain:,.0f} | {plain_c:,.0f} | 1.00 / {plain_c / plain:.2f} | |")
        for name in drafts.split(","):
            small = open_model(name)
            check_draft(big, small)
            for k in map(int, draft_ks.split(",")):
                spec = SpeculativeDecoder(gpt, small.model.eval(), k)
                out, eager = timed(lambda n: spec.generate(prompt, n, temperature=temp), new_tokens)
                acceptance = spec.acceptance
                spec.compile("cpu")
                spec.warm_up(1, T + new_tokens)
                out_c, compiled = timed(lambda n: spec.generate(prompt, n, temperature=temp), new_tokens)
                same = "yes" if temp == 0 and torch.equal(out, ref) and torch.equal(out_c, ref) else \
                    ("no" if temp == 0 else "")
                size = f"{small.model.num_params(non_embedding=False) / 1e6:.2f}M"
                print(f"  T {temp}: {name} ({size}) k {k}: {acceptance:.0%} accepted, {eager:.0f} tokens/s eager, "
                      f"{compiled:.0f} compiled {same}", flush=True)
                lines.append(f"| {name} ({size}) | {k} | {temp} | {acceptance:.0%} | {eager:,.0f} | {compiled:,.0f} | "
                             f"{eager / plain:.2f} / {compiled / plain_c:.2f} | {same} |")
    print("\n| draft | k | temperature | accepted | eager tokens/s | compiled tokens/s | speedup over the target "
          "alone, eager / compiled | greedy text the target's |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def main(argv=None):
    configure(globals(), argv)
    if threads:
        torch.set_num_threads(threads)
    if one:
        shape, batch, mode, eager = one.split(",")
        print(json.dumps(measure(shape, int(batch), mode, eager == "1")))
        return
    if target:
        return speculative_sweep()
    if breakdown:
        return where_time_goes()
    print(f"bench_decode: {new_tokens} greedy tokens after {prompt_tokens} prompt tokens per row, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}; random weights",
          flush=True)
    rows = []
    for shape in shapes.split(","):
        for batch in batches:
            for mode in modes.split(","):
                with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
                    first = child(shape, batch, mode, True, cache_dir)
                    warm = child(shape, batch, mode, False, cache_dir)
                rows.append((shape, batch, mode, first, warm))
                print(f"  {shape} batch {batch} {mode}: eager {first['eager']:.0f} tokens/s, compiled "
                      f"{first['compiled']:.0f} / {warm['compiled']:.0f} (first / warm start) tokens/s, same "
                      f"tokens {first['same']}; compile {first['compile_s']:.1f} s first start, "
                      f"{warm['compile_s']:.1f} s warm", flush=True)
    print("\n| shape | batch | mode | eager tokens/s | compiled tokens/s | compiled / eager | compile: first start "
          "/ warm | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, batch, mode, first, warm in rows:
        print(f"| {shape} | {batch} | {mode} | {first['eager']:,.0f} | {first['compiled']:,.0f} | "
              f"{first['compiled'] / first['eager']:.2f} | {first['compile_s']:.0f} / {warm['compile_s']:.0f} s | "
              f"{'yes' if first['same'] else 'no'} |")


if __name__ == "__main__":
    run(main)
