"""
bench/bench_quantize.py: what int8 and int4 weights (quantize.py) cost in quality and buy in size and speed,
on models trained here from the offline stdlib data.

Two parts.
  1. The int4 matmul (--kernels=True): microseconds per call of each way to multiply by int4 weights, for
     the Linear shapes of a 6 x 384 modern model and its 4,096-token output head, at batch 1 and 16:
     float32 F.linear (the reference), torch's int4 kernel with float32 inputs and with bfloat16 inputs
     (Int4Linear), unpacking the whole matrix to float32 then F.linear, and int8 (Int8Linear).
  2. The models (--runs=...): each run is trained by train.py (a second call finds it finished, or
     resumes it), then its best checkpoint is scored in float32, int8, int4 round-to-nearest and int4
     GPTQ: bits per byte on `windows` windows of block_size tokens spread over the val shard, the bytes
     of the weights, the time to quantize, and tokens/s of greedy generation at batch 1 and 16 with the
     KV cache (the models take turns, fastest of 5). head_rows adds the int4 models with a float32 head.
     Then multiple-choice accuracy through eval.py itself (--task=mc --quantize=MODE, which scores the
     float model and the quantized one side by side): mc_items items from the val text, each a context
     of 48 tokens and 4 endings of 16 tokens, the true continuation and 3 spans from elsewhere in val.

    python prepare.py --dataset=stdlib                      # data/stdlib: ~3M train tokens, offline
    python bench/bench_quantize.py                          # kernels, then the quick start model (~5 min)
    python bench/bench_quantize.py --runs=quickstart,6x384  # + a 6 x 384 model, 300 steps (~15 min more)
"""
import copy
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchlib import ROOT  # first: it puts the repository root on sys.path for the imports below
from checkpoint import load_model
from configurator import configure, run
from decode import generate
from quantize import Int8Linear, calibration_rows, quantize, rtn, weight_bytes
from shards import read_shard

kernels = True              # part 1: time the int4 matmul against the alternatives
runs = "quickstart"         # part 2: comma separated names of RUNS below; "" skips it
modes = "none,int8,int4,int4-gptq"
group_size = 128
calibration = 256           # GPTQ: rows of block_size train tokens (quantize.calibration_rows)
windows = 256               # val windows of block_size tokens to score
new_tokens = 64             # greedy tokens per generation timing
head_rows = True            # also score the int4 models with the output head left in float32
threads = 1                 # torch threads: 2 shared cores, so one thread gives steadier figures
mc_items = 500              # multiple-choice items for eval.py --task=mc; 0 skips it

RUNS = {  # name: (run directory, train.py arguments)
    "quickstart": ("out-quickstart", ["config/quickstart.py"]),
    "6x384": ("out-quant-6x384", ["config/quickstart.py", "--n_layer=6", "--n_head=6", "--n_embd=384",
                                  "--max_iters=300", "--learning_rate=1e-3", "--min_lr=1e-4", "--eval_interval=300"]),
}
SHAPES = {"c_attn": (384, 1152), "attn.c_proj": (384, 384), "mlp.c_fc": (384, 2048), "mlp.c_proj": (1024, 384),
          "lm_head": (384, 4096)}  # (in, out) of the 6 x 384 modern model (SwiGLU's c_fc holds gate and up)


def microseconds(fn, calls=50, repeats=7):
    """Median over repeats of the mean time of `calls` calls, after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * statistics.median(times)


@torch.inference_mode()
def time_kernels():
    print("| Linear (in -> out) | batch | float32 F.linear | int4 kernel, float32 in | int4 kernel, bfloat16 in "
          "(Int4Linear) | unpack to float32, F.linear | int8 (Int8Linear) |\n|---|---|---|---|---|---|---|")
    for name, (K, N) in SHAPES.items():
        torch.manual_seed(0)
        linear = torch.nn.Linear(K, N, bias=False)
        q4, q8 = rtn(linear, group_size), Int8Linear(linear)
        sz32 = q4.scales_and_zeros.float()
        for B in (1, 16):
            x = torch.randn(B, K)
            us = [microseconds(lambda: F.linear(x, linear.weight)),
                  microseconds(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.packed, group_size, sz32),
                               calls=5),
                  microseconds(lambda: q4(x)),
                  microseconds(lambda: F.linear(x, q4.dequantize()), calls=10),
                  microseconds(lambda: q8(x))]
            print(f"| {name} ({K} -> {N}) | {B} | " + " | ".join(f"{u:,.0f} µs" for u in us) + " |", flush=True)


def trained(name):
    """The model, tokenizer and description of RUNS[name]'s best checkpoint, after train.py has trained it
    (its config's init_from="auto" resumes an unfinished run, and does nothing for a finished one)."""
    out, args = RUNS[name]
    out = os.path.join(ROOT, out)
    print(f"training {name}: python train.py {' '.join(args)} --out_dir={out}", flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={out}"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    return load_model(out)


@torch.inference_mode()
def bits_per_byte(model, val, byte_lengths, block):
    """Loss in bits per UTF-8 byte of the targets, over `windows` windows spread evenly over val."""
    step = max(block, (len(val) - block - 1) // windows)
    starts = range(0, len(val) - block - 1, step)[:windows]
    x = torch.stack([torch.as_tensor(val[s:s + block + 1].astype("int64")) for s in starts])  # (n, block + 1)
    nats = sum(model(x[i:i + 16, :-1], x[i:i + 16, 1:], reduction="none")[1].sum().item()
               for i in range(0, len(x), 16))
    return nats / math.log(2) / byte_lengths[x[:, 1:]].sum().item()


@torch.inference_mode()
def tokens_per_s(models, prompts, repeats=5):
    """Greedy tokens per second of each model, from its fastest of `repeats` generations. The models take
    turns, so whatever else runs on the shared cores slows them all alike."""
    for m in models:
        generate(m, prompts[:, :4], 2, temperature=0)  # warm-up
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            generate(m, prompts, new_tokens, temperature=0)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [prompts.size(0) * new_tokens / t for t in best]


def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    print(f"bench_quantize: torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{threads} thread(s), group_size {group_size}")
    if kernels:
        time_kernels()
    for name in filter(None, runs.split(",")):
        model, tok, where = trained(name)
        T = model.config.block_size
        data_dir = os.path.join(ROOT, "data", "stdlib")
        val = read_shard(os.path.join(data_dir, "stdlib_val_000000.bin"))
        byte_lengths = torch.tensor(tok.token_byte_lengths())
        prompts = torch.as_tensor(val[:16 * 16].astype("int64")).view(16, 16)  # 16 prompts of 16 tokens
        calib = calibration_rows(data_dir, n=calibration, T=T)
        print(f"\n{where}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters; {windows} val windows "
              f"of {T} tokens; GPTQ on {calibration} x {T} train tokens\n"
              f"| weights | val bits/byte | weight bytes | quantize time | tokens/s, batch 1 | tokens/s, batch 16 |\n"
              f"|---|---|---|---|---|---|")
        quantized, rows = [], []
        for mode in modes.split(","):
            t0 = time.perf_counter()
            m = quantize(model, mode, calibration=calib if mode == "int4-gptq" else None, group_size=group_size)
            seconds = time.perf_counter() - t0
            quantized.append(m)
            rows.append(f"| {'float32' if mode == 'none' else mode} | {bits_per_byte(m, val, byte_lengths, T):.4f} | "
                        f"{weight_bytes(m) / 1e6:.2f} MB | {seconds:.1f} s")
        speeds = zip(tokens_per_s(quantized, prompts[:1]), tokens_per_s(quantized, prompts))
        for row, (one, sixteen) in zip(rows, speeds):
            print(f"{row} | {one:,.0f} | {sixteen:,.0f} |", flush=True)
        if head_rows:  # how much of each int4 loss is the output head's: the same models with a float32 head
            for mode, m in zip(modes.split(","), quantized):
                if mode.startswith("int4"):
                    m = copy.deepcopy(m)
                    m.lm_head = model.lm_head
                    print(f"| {mode}, float32 lm_head | {bits_per_byte(m, val, byte_lengths, T):.4f} | "
                          f"{weight_bytes(m) / 1e6:.2f} MB | | | |", flush=True)
        if mc_items:
            print(f"\n{mc_items} multiple-choice items from the val text (4 endings, chance 0.25), eval.py --task=mc\n"
                  f"| weights | acc | acc_norm |\n|---|---|---|")
            for mode, (acc, norm) in multiple_choice(name, val, tok).items():
                print(f"| {'float32' if mode == 'none' else mode} | {acc:.3f} | {norm:.3f} |", flush=True)


def multiple_choice(name, val, tok):
    """eval.py --task=mc on mc_items items cut from the val text, once per quantized mode: {mode: (acc, acc_norm)}."""
    import json
    import random
    run_dir = os.path.join(ROOT, RUNS[name][0])
    path = os.path.join(run_dir, "mc_val.jsonl")
    r, n = random.Random(0), len(val) - 64
    with open(path, "w") as f:
        for _ in range(mc_items):
            at = r.randrange(n)
            spans = [at + 48] + [r.randrange(n) for _ in range(3)]
            choices = [tok.decode(val[s:s + 16].tolist()) for s in spans]
            gold = r.randrange(4)
            choices[0], choices[gold] = choices[gold], choices[0]
            f.write(json.dumps({"query": tok.decode(val[at:at + 48].tolist()), "choices": choices, "gold": gold}) + "\n")
    out = {}
    for mode in modes.split(","):
        res = os.path.join(run_dir, f"eval_mc_{mode}.json")
        subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--model={run_dir}", "--task=mc",
                        f"--data={path}", "--target_delimiter=", f"--quantize={mode}", f"--group_size={group_size}",
                        "--device=cpu", f"--out={res}"], cwd=ROOT, check=True, capture_output=True)
        values = {x["metric"]: x["value"] for x in json.load(open(res))["results"]}
        out.setdefault("none", (values["acc"], values["acc_norm"]))
        if mode != "none":
            out[mode] = (values[f"acc ({mode})"], values[f"acc_norm ({mode})"])
    return out


if __name__ == "__main__":
    run(main)
