"""
train.py: train a GPT (model.py) on the token shards written by prepare.py, on a laptop CPU, one
GPU, or many GPUs and nodes through torchrun.

    python train.py config/quickstart.py                                   # 2-core CPU, ~5 minutes
    python train.py config/gpt2_124m.py --batch_size=16 --gradient_accumulation_steps=32  # a 40 GB GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py  # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \
             --nproc_per_node=8 train.py config/gpt2_124m.py               # first of two nodes

The settings below are plain variables; config files, then --key=value flags, override them
(configurator.py; `--help` lists them). The script then reads in the order the run happens:
setup, data, model, optimizer, and the loop that evaluates, logs and checkpoints.

Design choices
- Data. The train shards are one endless stream of tokens, shard after shard, wrapping around at the
  end, cut into rows of block_size inputs. A row also reads the token after it as its last target
  (the next row's first input), so every token is an input exactly once per pass; a row that
  straddles two shards is stitched from both, nothing is dropped or repeated. An epoch is the next
  total_tokens // block_size rows (the leftover < block_size tokens start the next epoch instead of
  being dropped). shuffle=True reads an epoch's rows in a random order seeded by (seed, epoch), so a
  batch mixes the whole corpus, not one region of it: with the stdlib files in sorted order, reading
  in file order made the quickstart model fit the encodings/ charmap tables and forget the rest (val
  loss 5.7 -> 7.1 while it read them; 2.09 vs 1.75 val bits per byte after 800 steps), and with
  the files in shuffled order, rows of one file still came together (1.98 vs 1.49). Under DDP
  rank r of W reads micro-batches r, r+W, ..., so W ranks read exactly the rows one process would.
  The data position is one integer, the rows read so far, saved in every checkpoint.
- Exact resume. A checkpoint holds everything the next step depends on: weights, AdamW moments,
  GradScaler, step, data position and every rank's RNG states (dropout masks). On CPU in float32,
  N steps + resume + N steps gives the same losses and weights as 2N steps, bit for bit.
- Crash safety. Checkpoints are written to a temp file in out_dir and moved into place with
  os.replace (atomic), so a crash or SIGKILL mid-save leaves the previous checkpoints intact.
  SIGTERM/SIGINT (a preempted machine, Ctrl-C) finish the current step, save, and exit cleanly.
- No host syncs in the step: the loss is summed on the device and read (.item(), which waits for the
  GPU) only every log_interval steps, so the CPU queues work ahead of the GPU.
- Bits per byte. val loss in nats per token depends on the tokenizer; loss/ln 2 * tokens / UTF-8
  bytes of the same text does not, so runs with different vocabularies compare (as nanochat reports).
"""
import dataclasses
import glob
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bpe import Tokenizer
from configurator import configure
from model import GPT, GPTConfig
from prepare import read_shard

# ----------------------------------------------------------------------------------------------
# default settings: GPT-2 124M shapes on the stdlib corpus; config/*.py hold the real recipes
# I/O
dataset = "stdlib"            # reads data/<dataset>/*_train_*.bin, *_val_*.bin and tokenizer.bpe
out_dir = "out"               # checkpoints ckpt_XXXXXX.pt, best.pt and log.jsonl go here
init_from = "scratch"         # 'scratch' | 'resume' (latest ckpt in out_dir) | 'gpt2'... | local HF dir
eval_interval = 250           # steps between evaluations; each evaluation also saves a checkpoint
eval_iters = 20               # batches per split in an evaluation (always the same, first, batches)
log_interval = 10             # steps between log lines; each waits for the GPU (and, under DDP, is
                              # where ranks agree to stop on SIGTERM/SIGINT)
keep_last = 2                 # step checkpoints to keep, besides best.pt (lowest val loss)
patience = 0                  # stop after this many evaluations without a better val loss; 0 = off
wandb_log = False             # Weights & Biases logging (works with WANDB_MODE=offline)
wandb_project = "gpt"
wandb_run_name = "run"
# data
shuffle = True                # read each epoch's rows in a random (seeded) order; False: in file order
batch_size = 12               # sequences per micro-batch per process
gradient_accumulation_steps = 40  # micro-batches per optimizer step, summed over all processes
# model: a preset from model.py, plus overrides; None keeps the preset's value
preset = "gpt2"               # 'gpt1' | 'gpt2' | 'modern'
n_layer = None
n_head = None
n_embd = None
block_size = None             # context length (gpt1: 512, gpt2: 1024, modern: 4096)
dropout = None                # 0 for pretraining on lots of data; 0.1+ against overfitting small data
bias = None                   # biases in Linear and LayerNorm
grad_checkpoint = False       # out of memory? recompute each block in backward: far less activation
                              # memory for ~1/3 more compute (applies to resumed and pretrained models too)
# optimizer: AdamW (Loshchilov & Hutter 2019)
learning_rate = 6e-4          # peak, reached after warmup
max_iters = 5000              # optimizer steps of the whole run
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95                  # 0.95 rather than Adam's 0.999: steadier for large-batch LM training
eps = 1e-8
grad_clip = 1.0               # clip the global gradient norm to this; 0 = off
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 200
lr_decay_iters = 0            # step where the decay reaches min_lr; 0 = max_iters
min_lr = 6e-5                 # ~learning_rate/10 (Chinchilla, Hoffmann et al. 2022)
# system
device = "auto"               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"                # 'float32' | 'bfloat16' | 'float16'; auto = bfloat16 on GPUs that have it
compile = None                # torch.compile; None = on for CUDA, off on CPU (see the note below)
seed = 1337
# ----------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 1  # bump when the checkpoint layout changes; sample.py checks it

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (no 2:4 sparsity), for MFU. float32 means TF32
# tensor cores, which train.py switches on. First substring match of the device name wins.
_PEAK_FLOPS = [  # (name part, {dtype: FLOP/s})
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),  # SXM
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("a10g", {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12}),
    ("l40s", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("l4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("4090", {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12}),
    ("3090", {"bfloat16": 71e12, "float16": 71e12, "float32": 36e12}),
    ("v100", {"float16": 125e12, "float32": 15.7e12}),  # no bfloat16 tensor cores
    ("t4", {"float16": 65e12, "float32": 8.1e12}),
]


def peak_flops(device_type, dtype_name):
    """Peak FLOP/s of this GPU at dtype_name, or None (CPU, MPS, an unknown GPU: then no MFU)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    return next((table.get(dtype_name) for part, table in _PEAK_FLOPS if part in name), None)


class TokenStream:
    """The shards `files` as one endless token stream, cut into rows of T inputs (and the T targets,
    shifted by one). Rows are numbered in the order they are read; rank `rank` of `world` reads
    micro-batches rank, rank+world, ... of B rows each. An epoch is the next `rows` whole rows of
    the stream; with a seed they are read in a random order, a new one each epoch (see the file
    docstring). self.pos counts the rows read so far by all ranks: the data position."""

    def __init__(self, files, B, T, rank=0, world=1, device="cpu", seed=None):
        self.shards = [read_shard(f) for f in files]  # np.memmap uint16: pages are read on demand
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # offset of each shard's 1st token
        self.total = int(self.starts[-1])  # tokens in the stream, before it wraps around
        if self.total < B * T + 1:
            raise ValueError(f"{files[0]}...: {self.total} tokens, fewer than one batch of "
                             f"{B}x{T}+1; lower batch_size or block_size, or prepare more data")
        self.rows = self.total // T  # rows per epoch; epoch e covers rows e*rows .. (e+1)*rows - 1
        self.B, self.T, self.rank, self.world, self.device, self.seed = B, T, rank, world, device, seed
        self.pos, self.order = 0, (None, None)  # (epoch, its permutation), computed once per epoch

    def read(self, start, n):
        """n tokens from stream position start, stitched across shard ends and the wrap-around."""
        out = np.empty(n, dtype=np.int64)  # int64: what embedding lookups and cross_entropy take
        done, start = 0, start % self.total
        while done < n:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1  # shard holding `start`
            off = start - int(self.starts[i])
            take = min(n - done, len(self.shards[i]) - off)
            out[done:done + take] = self.shards[i][off:off + take]
            done, start = done + take, (start + take) % self.total
        return out

    def row_start(self, r):
        """Stream position of the first input token of the r-th row read."""
        epoch, j = divmod(r, self.rows)
        if self.seed is not None:
            if self.order[0] != epoch:  # the same permutation on every rank and after a resume
                self.order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rows))
            j = int(self.order[1][j])
        return (epoch * self.rows + j) * self.T

    def batch(self, starts):
        """Rows at stream positions `starts` -> inputs x and targets y, each (B, T) on the device."""
        buf = torch.from_numpy(np.stack([self.read(p, self.T + 1) for p in starts]))  # (B, T+1)
        if self.device.startswith("cuda"):  # page-locked memory: the copy runs async, overlapping compute
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        buf = buf.to(self.device)
        return buf[:, :-1], buf[:, 1:]  # one copy, two views

    def next_batch(self):
        """This rank's next training micro-batch; advances the position of all ranks."""
        first = self.pos + self.rank * self.B
        self.pos += self.world * self.B
        return self.batch([self.row_start(r) for r in range(first, first + self.B)])

    def eval_batch(self, k):
        """The k-th batch of the stream in file order: the same fixed batches for every evaluation."""
        return self.batch([(k * self.B + b) * self.T for b in range(self.B)])

    def state(self):
        return {"epoch": self.pos // self.rows, "row": self.pos % self.rows, "rows_per_epoch": self.rows}

    def load_state(self, s):
        if s["rows_per_epoch"] != self.rows:
            print(f"warning: the train shards changed since the checkpoint ({s['rows_per_epoch']} -> "
                  f"{self.rows} rows per epoch); reading them from the start")
            return
        self.pos = s["epoch"] * self.rows + s["row"]


def get_lr(it, warmup, decay_iters, lr, lr_min):
    """Linear warmup from ~0 to lr over `warmup` steps, then half a cosine down to lr_min at
    decay_iters, flat after (the GPT-1 / GPT-2 / Chinchilla schedule)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return lr_min
    progress = (it - warmup) / max(1, decay_iters - warmup)  # 0 -> 1
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - lr_min)


def atomic_save(obj, path):
    """torch.save to a temp file in the same directory, flushed to disk, then renamed over path:
    readers see the old file or the new one, never a partial one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pick_device(device="auto", dtype="auto"):
    """Device and dtype settings -> (device, device_type, torch dtype), shared with sample.py. auto
    device: cuda > mps > cpu; auto dtype: bfloat16 on GPUs that have it, float16 on older GPUs
    (V100, T4), float32 elsewhere (CPUs without bfloat16 units gain nothing from 16 bits)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but torch sees no CUDA GPU; use --device=cpu")
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"error: dtype={dtype!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    return device, device_type, getattr(torch, dtype)


def compile_problem(device_type):
    """Why torch.compile cannot run here (it generates C++ on CPU and Triton on CUDA), or None."""
    if device_type == "mps":
        return "torch.compile does not support training on MPS"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++", "cl")):
        return "torch.compile on CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on the PATH"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs the triton package"
    return None


def checkpoints(directory):
    """The step checkpoints in directory, oldest first."""
    return sorted(glob.glob(os.path.join(directory, "ckpt_[0-9]*.pt")))


def load_checkpoint(path):
    """(checkpoint dict, GPT with its weights, on the CPU): the one reader of the format save_checkpoint
    writes, shared by resume and sample.py. A checkpoint of another version is a one-line error."""
    try:
        # weights_only=False: a checkpoint holds RNG states (Python and NumPy objects) besides tensors.
        # Load only checkpoints you trust: unpickling can run code.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"error: {path} is checkpoint version {got}, this code reads version "
                         f"{CHECKPOINT_VERSION}; use the train.py/sample.py that wrote it")
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    return state, model


if __name__ == "__main__":
    config = configure(globals())

    # ---- setup: processes, device, precision --------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun?
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    master = rank == 0  # only rank 0 prints, logs and writes checkpoints

    def say(*args):
        if master:
            print(*args, flush=True)

    for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if globals()[k] < 1:
            raise SystemExit(f"error: {k}={globals()[k]} must be at least 1")
    if gradient_accumulation_steps % world:
        raise SystemExit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be divisible "
                         f"by the number of processes ({world}); use a multiple of {world}")
    accum = gradient_accumulation_steps // world  # micro-steps per process per optimizer step
    device, device_type, ptdtype = pick_device(device, dtype)
    dtype = str(ptdtype).removeprefix("torch.")  # the resolved name, e.g. for the peak-FLOPs table
    if ddp:
        if device_type == "cuda":
            device = f"cuda:{local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # autocast runs matmuls in 16 bits and keeps reductions (softmax, norms, loss) in float32
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for float32 matmuls on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)  # ranks differ in dropout masks; DDP copies rank 0's initial weights
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if compile is None:
        # CUDA: fused kernels, the usual large speedup. CPU (2 cores, measured A/B in one process): the
        # quickstart model steps 0.86x the eager time, nanoGPT's baby GPT 1.29x, and the first compile
        # costs ~1 minute, a fifth of a 5-minute run; so off on CPU unless asked for.
        compile = device_type == "cuda"
    if compile and compile_problem(device_type):
        say(f"warning: {compile_problem(device_type)}; running without torch.compile")
        compile = False
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.items()))

    # ---- data -----------------------------------------------------------------------------------
    data_dir = os.path.join("data", dataset)
    tok_path = os.path.join(data_dir, "tokenizer.bpe")
    train_files = sorted(glob.glob(os.path.join(data_dir, "*_train_*.bin")))
    val_files = sorted(glob.glob(os.path.join(data_dir, "*_val_*.bin")))
    if not (train_files and val_files and os.path.exists(tok_path)):
        raise SystemExit(f"error: {data_dir}/ lacks train shards, val shards or tokenizer.bpe; "
                         f"run: python prepare.py --dataset={dataset}")
    tokenizer = Tokenizer.load(tok_path)

    # ---- model ----------------------------------------------------------------------------------
    ckpt = None
    if init_from == "resume":  # model shape from the checkpoint: the model settings above are ignored
        found = checkpoints(out_dir)
        if not found:
            raise SystemExit(f"error: init_from='resume' but {out_dir}/ has no ckpt_*.pt; "
                             f"start with --init_from=scratch or point --out_dir at a run")
        ckpt, model = load_checkpoint(found[-1])
        if ckpt["tokenizer"] != tokenizer.dumps():
            raise SystemExit(f"error: {tok_path} differs from the tokenizer the checkpoint was trained "
                             f"with; resume with the same --dataset")
    elif checkpoints(out_dir):  # a new run would interleave its checkpoints with the old run's
        raise SystemExit(f"error: {out_dir}/ already holds checkpoints of another run; continue it "
                         f"with --init_from=resume, or use a new --out_dir (or delete the old one)")
    elif init_from == "scratch":
        overrides = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                            dropout=dropout, bias=bias).items() if v is not None}
        try:
            base = GPTConfig.preset(preset)
            for k, v in overrides.items():  # None defaults accept any type, so check against the preset's
                want = type(getattr(base, k))
                if not (isinstance(v, want) or want is float and type(v) is int):
                    raise ValueError(f"config key '{k}' expects {want.__name__}, got {v!r}")
            model = GPT(GPTConfig.preset(preset, vocab_size=tokenizer.vocab_size, **overrides))
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    else:  # OpenAI's GPT-2 weights (a name, or a local Hugging Face directory) to fine-tune
        try:
            model = GPT.from_pretrained(init_from, dropout=dropout)
        except Exception as e:  # a bad name or directory, or no network for the download
            raise SystemExit(f"error: init_from={init_from!r}: {' '.join(str(e).split()) or type(e).__name__}")
        if model.config.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"error: GPT-2 weights need the gpt2 tokenizer, but {tok_path} has "
                             f"{tokenizer.vocab_size} tokens; prepare the data with --tokenizer=gpt2")
    T = block_size if (block_size and init_from not in ("scratch", "resume")) else model.config.block_size
    if T > model.config.block_size:
        raise SystemExit(f"error: block_size={T} exceeds the model's context {model.config.block_size}")
    model.config.grad_checkpoint = grad_checkpoint  # a memory/compute trade, not part of the model
    model.to(device)
    raw_model = model  # the uncompiled module: its state_dict has clean keys (no _orig_mod.)
    tokens_per_step = gradient_accumulation_steps * batch_size * T
    try:  # a corrupt or truncated shard, or too little data, is a one-line error naming the file
        train_data = TokenStream(train_files, batch_size, T, rank, world, device, seed if shuffle else None)
        val_data = TokenStream(val_files, batch_size, T, device=device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # UTF-8 bytes of each token, for bits per byte; special tokens stand for no text: 0 bytes
    specials = set(tokenizer.special_tokens.values())
    token_bytes = torch.tensor([0 if i in specials else len(tokenizer.decode_bytes([i]))
                                for i in range(tokenizer.vocab_size)], device=device)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters (non-embedding), {model.config}")
        print(f"global batch: {gradient_accumulation_steps} micro-batches x {batch_size} x {T} = "
              f"{tokens_per_step:,} tokens per step, {world} process(es); {train_data.total:,} train tokens "
              f"= {train_data.total / tokens_per_step:.1f} steps per epoch")

    # ---- optimizer --------------------------------------------------------------------------------
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), eps, device_type)
    # float16 has a narrow range: scale the loss up so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    iter_num, best_val_loss, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss, evals_since_best = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["evals_since_best"]
        train_data.load_state(ckpt["data"])
        rngs = ckpt["rng"]
        if len(rngs) == world:  # restore after the model was built, since init drew from the RNG
            r = rngs[rank]
            torch.set_rng_state(r["torch"])
            if r["cuda"] is not None and device_type == "cuda":
                torch.cuda.set_rng_state(r["cuda"])
            np.random.set_state(r["numpy"])
            random.setstate(r["python"])
        else:
            say(f"warning: checkpoint has RNG states of {len(rngs)} processes, this run has {world}; "
                f"dropout masks will differ from an uninterrupted run")
        say(f"resumed from {found[-1]} at step {iter_num}")
        ckpt = None  # free the memory
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    decay_iters = lr_decay_iters or max_iters

    @torch.no_grad()
    def evaluate():
        """Mean loss over the first eval_iters batches of each split (the same batches every time,
        so evaluations compare), and val bits per byte. Ranks split the batches and sum."""
        model.eval()
        out = {}
        for split, stream in (("train", train_data), ("val", val_data)):
            stats = torch.zeros(3, device=device)  # sum of mean batch losses, batches, bytes
            for k in range(rank, eval_iters, world):
                x, y = stream.eval_batch(k)
                with ctx:
                    _, loss = model(x, y)
                stats += torch.stack([loss.float(), torch.ones((), device=device), token_bytes[y].sum().float()])
            if ddp:
                dist.all_reduce(stats)
            loss_sum, n, nbytes = stats.tolist()
            out[split] = loss_sum / n
            if split == "val":  # nats -> bits, per token -> per byte of the text those tokens spell
                out["val_bpb"] = loss_sum * batch_size * T / math.log(2) / nbytes
        model.train()
        return out

    def save_checkpoint(is_best):
        """Every rank contributes its RNG state; rank 0 writes ckpt_<step>.pt, links best.pt to it
        when is_best, and keeps only the newest keep_last step checkpoints."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        rngs = [None] * world
        dist.all_gather_object(rngs, rng) if ddp else rngs.__setitem__(0, rng)
        if not master:
            return
        path = os.path.join(out_dir, f"ckpt_{iter_num:06d}.pt")
        atomic_save({"version": CHECKPOINT_VERSION, "model": raw_model.state_dict(),
                     "model_args": dataclasses.asdict(raw_model.config), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
                     "evals_since_best": evals_since_best, "config": config, "tokenizer": tokenizer.dumps(),
                     "rng": rngs, "data": train_data.state()}, path)
        if is_best:  # a hard link costs no copy; filesystems without links get a copy
            best, tmp = os.path.join(out_dir, "best.pt"), os.path.join(out_dir, "best.pt.tmp")
            if os.path.exists(tmp):
                os.remove(tmp)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, best)
        for old in checkpoints(out_dir)[:-max(1, keep_last)]:
            os.remove(old)
        print(f"saved {path}" + (" (best so far)" if is_best else ""))

    # ---- the loop -----------------------------------------------------------------------------
    stop_signal = None

    def on_signal(signum, frame):  # finish the step in flight, then save and exit (see the loop)
        global stop_signal
        if stop_signal is not None:
            raise KeyboardInterrupt  # a second signal (Ctrl-C twice): stop at once, no save
        stop_signal = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if master:
        log_file = open(os.path.join(out_dir, "log.jsonl"), "a" if init_from == "resume" else "w")
    if wandb_log and master:
        try:
            import wandb  # imported only when asked for: never a requirement
        except ImportError:
            raise SystemExit("error: wandb_log=True needs the wandb package: pip install wandb") from None
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def log(record):
        """One line for people (stdout), one JSON line for programs (out_dir/log.jsonl), and wandb."""
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if wandb_log:
            wandb.log(record, step=record["step"])

    def stop_if_not_finite(value, what):
        if not math.isfinite(value):
            kept = checkpoints(out_dir)
            raise SystemExit(f"error: {what} is {value} at step {iter_num}; stopped without saving (last good "
                             f"checkpoint: {kept[-1] if kept else 'none'}). Lower learning_rate, keep grad_clip on, "
                             f"or use bfloat16/float32 instead of float16")

    start_iter, resumed = iter_num, init_from == "resume"
    loss_sum = torch.zeros((), device=device)  # summed on the device between log lines: no sync
    steps_since_log, t0, stopping = 0, time.time(), False
    while True:
        if stopping:  # a signal arrived: the step in flight has finished
            say(f"received {signal.Signals(stop_signal).name} at step {iter_num}: saving and exiting")
            save_checkpoint(False)
            break
        # evaluate and checkpoint every eval_interval steps and at the end (not again right after a resume)
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not (resumed and iter_num == start_iter):
            losses = evaluate()
            stop_if_not_finite(losses["val"], "the val loss")
            is_best = losses["val"] < best_val_loss
            best_val_loss, evals_since_best = (losses["val"], 0) if is_best else (best_val_loss, evals_since_best + 1)
            if master:
                log({"step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     "val_bpb": losses["val_bpb"]})
            save_checkpoint(is_best)
            if patience and evals_since_best >= patience:
                say(f"early stop: {patience} evaluations without a better val loss; best is {out_dir}/best.pt")
                break
            t0 = time.time()  # evaluation time does not count against tokens/s
        if iter_num >= max_iters:
            break

        lr = get_lr(iter_num, warmup_iters, decay_iters, learning_rate, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            x, y = train_data.next_batch()
            # DDP all-reduces gradients after every backward unless told not to: only the last
            # micro-step needs it, the others just accumulate locally
            with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                scaler.scale(loss / accum).backward()  # / accum: the step's gradient is the mean
        scaler.unscale_(optimizer)  # true gradients, for clipping and the norm we log
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf"))
        scaler.step(optimizer)  # skipped by the scaler if float16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        steps_since_log += 1

        # A log step is the one place the loop waits for the device. Under DDP it is also where ranks
        # agree to stop on a signal (any rank got one), so they all save at the same step; alone, a
        # signal makes this step a log step at once.
        if iter_num % log_interval == 0 or iter_num == max_iters or (stop_signal is not None and not ddp):
            stats = torch.stack([loss_sum, torch.tensor(float(stop_signal is not None), device=device)])
            if ddp:
                dist.all_reduce(stats)
            loss_total, stop_votes = stats.tolist()  # .tolist() waits for the device
            train_loss = loss_total / (steps_since_log * gradient_accumulation_steps)
            stop_if_not_finite(train_loss, "the training loss")
            stopping = stop_votes > 0
            dt = (time.time() - t0) / steps_since_log
            if master:
                record = {"step": iter_num, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_step / dt}
                peak = peak_flops(device_type, dtype)
                if peak:  # model FLOPs per second per GPU over the GPU's peak
                    record["mfu"] = raw_model.estimate_mfu(tokens_per_step / dt / world, peak, T)
                log(record)
            loss_sum.zero_()
            steps_since_log, t0 = 0, time.time()

    if ddp:
        dist.destroy_process_group()
