"""
bench/bench_quickstart.py: how good a model does a CPU user get in a few minutes?

Side by side, in one run, on the same ~1 MB of English prose (the King James Bible, printed by Debian's
`bible-kjv` package: `apt-get install bible-kjv`; or any text file via --text=FILE):

  reference  nanoGPT's CPU "baby GPT" recipe from its README: character level, 4 layers, 4 heads,
             128 wide, context 64, batch 12, 2,000 iterations, lr 1e-3 (config/train_shakespeare_char.py)
  ours       prepare.py --input=FILE --tokenizer=train, then train.py config/quickstart.py

Both are scored the same way: bits per byte over the *whole* validation text (non-overlapping windows
of each model's context), so a character model and a BPE model compare. nanoGPT sees exactly our
validation and training text: its char-level files are made by decoding our shards.

The race: how soon does ours reach the val bits per byte nanoGPT's recipe ends at? The figures in the
README come from these three runs (the Bible and Pride and Prejudice were tuned on, Moby-Dick was not):

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python bench/bench_quickstart.py --nanogpt=/tmp/nanoGPT --our_max_iters=80
    python bench/bench_quickstart.py --nanogpt=/tmp/nanoGPT --our_max_iters=80 --text=pride.txt --work=data/bq_pride
    python bench/bench_quickstart.py --nanogpt=/tmp/nanoGPT --our_max_iters=80 --text=moby.txt --work=data/bq_moby
pride.txt: Project Gutenberg #1342 between its START and END lines (685 kB); moby.txt: the first 1 MB of
#2701 with LF line ends.

Also prints ms/step and tokens/s of config/quickstart.py and of a baby-GPT-sized model in train.py,
with and without torch.compile (--speed=True).
"""
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from benchlib import ROOT  # first: it puts the repository root on sys.path for the imports below
from bpe import Tokenizer
from checkpoint import load_model
from configurator import configure
from shards import read_shard

nanogpt = ""             # path to a nanoGPT checkout (the reference); "" skips it
text = ""                # a prose file; "" = the first prose_mb MB of the KJV Bible from `bible`
prose_mb = 1.0
vocab_size = 4096        # our BPE for the prose (prepare.py --vocab_size): the quick start's size. On ~1 MB
                         # of prose 4,096 beat 2,048 and 3,072 at equal wall time (bench/README.md)
our_config = "config/quickstart.py"
our_max_iters = 0        # 0 = the config's max_iters
our_args = ""            # more train.py flags, space separated
speed = False            # also time ms/step with and without compile
threads = 0              # torch threads for every run; 0 = torch's default (all cores)
work = "data/bench_quickstart"

PY = sys.executable


def kjv_prose(path, mb):
    """The first `mb` MB of the KJV as plain prose: a title line per chapter, one verse per line."""
    raw = subprocess.run(["bible", "-l0", "Genesis1:1-Revelation22:21"], capture_output=True, text=True,
                         check=True).stdout
    out, size = [], 0
    for chapter in re.split(r"\n(?=\S)", raw.strip("\n")):  # chapters start with an unindented title
        lines = chapter.splitlines()
        verses = [re.sub(r"^\s*\d+\s+", "", v) for v in lines[1:] if v.strip()]
        block = lines[0] + "\n\n" + "\n".join(verses) + "\n\n"
        out.append(block)
        size += len(block.encode())
        if size >= mb * 1e6:
            break
    with open(path, "w") as f:
        f.write("".join(out))


def run(cmd, cwd=ROOT, log=None):
    """Run cmd, return (wall seconds, stdout). Output also goes to the log file."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else dict(os.environ)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if log:
        with open(log, "w") as f:
            f.write(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return dt, p.stdout


@torch.no_grad()
def val_bits_per_byte(model, tokens, byte_len, block):
    """Bits per byte of `tokens` (1-D int64) under our `model`, in non-overlapping windows of `block`;
    byte_len[id] is the UTF-8 length of token id (Tokenizer.token_byte_lengths)."""
    model.eval()
    n = (len(tokens) - 1) // block * block
    x, y = tokens[:n].view(-1, block), tokens[1:n + 1].view(-1, block)
    nats = 0.0
    for i in range(0, x.size(0), 64):
        _, loss = model(x[i:i + 64], y[i:i + 64], reduction="none")  # (64, block) nats per token
        nats += loss.double().sum().item()
    return nats / math.log(2) / byte_len[y].sum().item()


def score_ours(data_dir, out_dir):
    """Val bits per byte of the newest checkpoint in out_dir, over the first val shard in data_dir."""
    model, tok, _ = load_model(out_dir, which="last")
    byte_len = torch.tensor(tok.token_byte_lengths())
    val = torch.from_numpy(read_shard(next(iter(sorted(
        os.path.join(data_dir, f) for f in os.listdir(data_dir) if "_val_" in f)))).astype(np.int64))
    return val_bits_per_byte(model, val, byte_len, model.config.block_size)


def nanogpt_files(data_dir, dst):
    """Write nanoGPT char-level train.bin/val.bin/meta.pkl holding exactly the text of our shards."""
    tok = Tokenizer.load(os.path.join(data_dir, "tokenizer.bpe"))
    texts = {}
    for split in ("train", "val"):
        parts = []
        for f in sorted(os.listdir(data_dir)):
            if f"_{split}_" in f and f.endswith(".bin"):
                ids = read_shard(os.path.join(data_dir, f)).astype(np.int64)
                parts.append(tok.decode_bytes([int(t) for t in ids if t != tok.eot_token]))
        texts[split] = b"".join(parts).decode("utf-8", errors="replace")
    chars = sorted(set(texts["train"]) | set(texts["val"]))
    stoi = {c: i for i, c in enumerate(chars)}
    os.makedirs(dst, exist_ok=True)
    for split, t in texts.items():
        np.array([stoi[c] for c in t], dtype=np.uint16).tofile(os.path.join(dst, f"{split}.bin"))
    with open(os.path.join(dst, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return {s: len(t.encode()) for s, t in texts.items()}, {s: len(t) for s, t in texts.items()}


NANOGPT_SCORE = r"""
import math, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig
ck = torch.load(sys.argv[2], map_location='cpu', weights_only=False)
m = GPT(GPTConfig(**ck['model_args']))
m.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in ck['model'].items()})
m.eval()
val = torch.from_numpy(np.fromfile(sys.argv[3], dtype=np.uint16).astype(np.int64))
T = m.config.block_size
n = (len(val) - 1) // T * T
x, y = val[:n].view(-1, T), val[1:n + 1].view(-1, T)
nats = 0.0
with torch.no_grad():
    for i in range(0, x.size(0), 64):
        logits, _ = m(x[i:i + 64], y[i:i + 64])
        nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 64].flatten(), reduction='sum').item()
print(nats / math.log(2) / y.numel())  # bits per character
"""


def main():
    os.makedirs(os.path.join(ROOT, work), exist_ok=True)
    prose = text or os.path.join(ROOT, work, "prose.txt")
    if not text:
        kjv_prose(prose, prose_mb)
    name = os.path.basename(work.rstrip("/")) + "_shards"  # one data folder per --work: runs can go side by side
    data_dir = os.path.join(ROOT, "data", name)
    prep, _ = run([PY, "prepare.py", f"--input={prose}", f"--name={name}", "--tokenizer=train",
                   f"--vocab_size={vocab_size}"], log=os.path.join(ROOT, work, "prepare.log"))
    print(f"prepared {os.path.getsize(prose) / 1e6:.2f} MB of prose with a {vocab_size}-token BPE in {prep:.1f} s")

    rows = []
    if nanogpt:
        nbytes, nchars = nanogpt_files(data_dir, os.path.join(nanogpt, "data", name + "_char"))
        out = os.path.join(ROOT, work, "out-nanogpt")
        dt, _ = run([PY, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                     "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                     "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
                     "--dropout=0.0", f"--dataset={name}_char", f"--out_dir={out}"], cwd=nanogpt,
                    log=os.path.join(ROOT, work, "nanogpt.log"))
        _, bpc = run([PY, "-c", NANOGPT_SCORE, nanogpt, os.path.join(out, "ckpt.pt"),
                      os.path.join(nanogpt, "data", name + "_char", "val.bin")])
        bpb = float(bpc.split()[-1]) * nchars["val"] / nbytes["val"]
        rows.append(("nanoGPT baby GPT (char, 2000 iters)", dt, bpb))
        print(f"reference: {dt:.1f} s wall, val {bpb:.4f} bits/byte")

    out = os.path.join(ROOT, work, "out-ours")
    flags = [f"--dataset={name}", f"--out_dir={out}", "--init_from=scratch"]
    flags += [f"--max_iters={our_max_iters}"] if our_max_iters else []
    shutil.rmtree(out, ignore_errors=True)
    dt, log = run([PY, "train.py", our_config, *flags, *our_args.split()], log=os.path.join(ROOT, work, "ours.log"))
    bpb = score_ours(data_dir, out)
    rows.append((f"ours: {our_config} {' '.join(flags[3:] + our_args.split())}", dt, bpb))

    print(f"\n{'run':60s} {'wall s':>8s} {'val bits/byte':>14s}")
    for r in rows:
        print(f"{r[0]:60s} {r[1]:8.1f} {r[2]:14.4f}")
    if len(rows) == 2:
        print(f"wall-time ratio ours/reference: {rows[1][1] / rows[0][1]:.3f} (target <= 0.2; "
              f"{(rows[1][1] + prep) / rows[0][1]:.3f} counting our tokenizer and shards too); "
              f"bpb ours - reference: {rows[1][2] - rows[0][2]:+.4f} (target <= 0)")

    if speed:
        print(f"\n{'model':44s} {'compile':>8s} {'ms/step':>8s} {'tokens/s':>9s}")
        shapes = {"config/quickstart.py": [],
                  "baby GPT shape (4x4x128, ctx 64, batch 12)": ["--preset=gpt2", "--n_layer=4", "--n_head=4",
                                                                 "--n_embd=128", "--block_size=64",
                                                                 "--batch_size=12",
                                                                 "--gradient_accumulation_steps=1"]}
        for label, extra in shapes.items():
            for comp in (False, True):
                o = os.path.join(ROOT, work, "out-speed")
                shutil.rmtree(o, ignore_errors=True)
                run([PY, "train.py", "config/quickstart.py", f"--dataset={name}", f"--out_dir={o}",
                     "--max_iters=120", "--eval_interval=1000", "--log_interval=40", f"--compile={comp}", *extra])
                # log.jsonl holds the figures unrounded; the first log window holds compilation/warm-up,
                # so report the last one
                with open(os.path.join(o, "log.jsonl")) as f:
                    last = [r for r in map(json.loads, f) if "ms_per_step" in r][-1]
                ms, tps = last["ms_per_step"], last["tokens_per_s"]
                print(f"{label:44s} {str(comp):>8s} {ms:8.1f} {tps:9.0f}")


if __name__ == "__main__":
    configure(globals())
    main()
