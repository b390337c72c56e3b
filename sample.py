"""
sample.py: write text with a model trained by train.py, or with OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-quickstart                      # best checkpoint of a run
    python sample.py --out_dir=out-quickstart --ckpt=last --start="def fib(n):"
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --top_p=0.9

A checkpoint carries its own tokenizer (train.py embeds the .bpe file's text), so nothing else needs
pointing at. Tokens are printed the moment they are generated: model.generate_stream keeps a KV cache,
so each step runs the model on one new token instead of the whole sequence. A token can end in the
middle of a multi-byte UTF-8 character, so bytes go through an incremental decoder that holds back an
unfinished character until its last byte arrives. Same seed, same settings, same text.
"""
import codecs
import contextlib
import os
import sys
import time
from contextlib import nullcontext

import torch

from bpe import Tokenizer
from configurator import configure
from model import GPT
from train import checkpoints, load_checkpoint, pick_device

# ---- settings (override with a config file and/or --key=value) -----------------------------------
out_dir = "out"            # the run whose checkpoint to load (init_from='resume')
ckpt = "best"              # 'best' (lowest val loss, best.pt) | 'last' (newest ckpt_*.pt) | a .pt path
init_from = "resume"       # 'resume' (a checkpoint in out_dir) | 'gpt2', 'gpt2-medium', ... | local HF dir
start = ""                 # the prompt; "" starts a fresh document; FILE:path reads the prompt from a file
num_samples = 1            # samples, one after another
max_new_tokens = 300       # tokens to generate per sample
temperature = 0.8          # < 1 sharpens the distribution, > 1 flattens it, 0 is greedy
top_k = 200                # sample among the k likeliest tokens only (None: all)
top_p = None               # nucleus sampling: the smallest set with probability >= top_p (None: off)
stop_at_eot = True         # end a sample at <|endoftext|>, where the model thinks the document ends
seed = 1337
device = "auto"            # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"             # 'auto' = bfloat16 on GPUs that have it, else float32 | 'float32' | 'float16'
compile = False            # torch.compile; pays off only for long generations
# --------------------------------------------------------------------------------------------------


def load_model(out_dir, ckpt, init_from):
    """(model, tokenizer, where) for a train.py checkpoint or pretrained GPT-2 weights."""
    if init_from != "resume":
        return GPT.from_pretrained(init_from), Tokenizer.gpt2(), init_from  # HF GPT-2 uses GPT-2's BPE
    if ckpt in ("best", "last"):
        if not os.path.isdir(out_dir):
            raise SystemExit(f"error: no run directory {out_dir}/; train one (python train.py ...) or "
                             f"pass --out_dir=DIR of a run, or --init_from=gpt2")
        found = checkpoints(out_dir)
        path = os.path.join(out_dir, "best.pt") if ckpt == "best" else (found[-1] if found else "")
        if ckpt == "best" and not os.path.exists(path) and found:
            path = found[-1]  # a run that never evaluated has no best.pt yet: use its newest checkpoint
        if not os.path.exists(path):
            raise SystemExit(f"error: {out_dir}/ holds no checkpoint (best.pt or ckpt_*.pt); train first")
    else:
        path = ckpt
        if not os.path.exists(path):
            raise SystemExit(f"error: checkpoint {path} does not exist; pass --ckpt=best|last|PATH")
    state, model = load_checkpoint(path)
    return model, Tokenizer.loads(state["tokenizer"]), f"{path} (step {state['iter_num']})"


if __name__ == "__main__":
    config = configure(globals())
    device, device_type, ptdtype = pick_device(device, dtype)
    torch.manual_seed(seed)  # on CPU and every GPU: the same seed gives the same samples

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the sample alone, for pipes
        model, tok, where = load_model(out_dir, ckpt, init_from)
    model.eval().to(device)
    print(f"sampling {where}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"{tok.name} tokenizer, on {device} in {str(ptdtype).removeprefix('torch.')}", file=sys.stderr)
    if compile:
        model = torch.compile(model)

    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise SystemExit(f"error: cannot read prompt file {start[5:]}: {e.strerror}")
    # an empty prompt begins a new document: prepare.py puts <|endoftext|> before every document
    ids = tok.encode(start, allowed_special="all") if start else [tok.eot_token]
    block_size = model.config.block_size
    if len(ids) >= block_size:  # keep room for at least one new token inside the context
        print(f"warning: the prompt is {len(ids)} tokens, the model's context is {block_size}; "
              f"keeping its last {block_size - 1} tokens", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)

    autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    eot = tok.eot_token if stop_at_eot else None
    for i in range(num_samples):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back split characters
        sys.stdout.write(start)
        n, t0 = 0, time.time()
        with autocast:
            for token in model.generate_stream(x, max_new_tokens, temperature, top_k, top_p, eot):
                t = token.item()
                n += 1
                if t == eot:
                    break
                sys.stdout.write(text.decode(tok.decode_bytes([t])))
                sys.stdout.flush()
        sys.stdout.write(text.decode(b"", final=True) + "\n")
        if i < num_samples - 1:
            sys.stdout.write("-" * 40 + "\n")
        dt = time.time() - t0
        print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s]", file=sys.stderr)
