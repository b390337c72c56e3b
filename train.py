"""
train.py: train a GPT (model.py) on the token shards written by prepare.py, on a laptop CPU, one
GPU, or many GPUs and nodes through torchrun.

    python train.py config/quickstart.py                                   # a laptop CPU (2 cores are enough)
    python train.py config/gpt2_124m.py --batch_size=16 --gradient_accumulation_steps=32  # a 40 GB GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py  # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \
             --nproc_per_node=8 train.py config/gpt2_124m.py               # first of two nodes

The settings below are plain variables; config files, then --key=value flags, override them
(configurator.py; `--help` lists them). main() then reads in the order the run happens: setup, data,
model, optimizer, and the loop that evaluates, logs and checkpoints. Choosing the start and evaluating
are the named functions above it; what every training loop does (optimizer groups, the schedule, the
optimizer step, saving and restoring a run, stop signals) is training.py's, which finetune.py shares.

Design choices
- Data. shards.TokenStream: the train shards as one endless stream cut into rows, every token an
  input once per epoch, an epoch's rows in a seeded random order (reading sorted data in file order
  makes a model fit one region and forget the rest; the README has the measurement). Under DDP rank r
  of W reads micro-batches r, r+W, ..., so W ranks read exactly the rows one process would.
- Exact resume and crash safety (training.py). A checkpoint holds everything the next step depends
  on, RNG states and data position included: on CPU in float32, N steps + resume + N steps gives the
  same losses and weights as 2N steps, bit for bit. Saves are atomic; SIGTERM and Ctrl-C finish the
  step, save and exit, every rank at the same step.
- No host syncs in the step: the loss is summed on the device and read (.item(), which waits for the
  GPU) only every log_interval steps, so the CPU queues work ahead of the GPU. The stop vote travels
  over a separate CPU (gloo) group, so it does not wait for the GPU either.
- Bits per byte. val loss in nats per token depends on the tokenizer; loss/ln 2 * tokens / UTF-8
  bytes of the same text does not, so runs with different vocabularies compare (as nanochat reports).
- Multi-node. out_dir must be one filesystem that every node sees (rank 0 picks the checkpoint to
  resume and all ranks read it; rank 0 writes). data/ may be a copy per node, but every rank checks
  that it holds the same train tokens and tokenizer as rank 0.
"""
import glob
import hashlib
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import distill
import process
import training
from bpe import Tokenizer
from configurator import UserError, configure, run
from device import autocast, compile_problem, peak_flops, pick_device
from fsdp import ShardedInit, shard
from model import GPT, GPTConfig
from process import say
from score import bits_per_byte
from shards import TokenStream

# ----------------------------------------------------------------------------------------------
# default settings: GPT-2 124M shapes on the stdlib corpus; config/*.py hold the real recipes
# I/O
dataset = "stdlib"            # reads data/<dataset>/*_train_*.bin, *_val_*.bin and tokenizer.bpe
out_dir = "out"               # checkpoints ckpt_XXXXXX.pt, best.pt and log.jsonl go here
init_from = "scratch"         # 'scratch' | 'resume' (latest ckpt in out_dir) | 'auto' (resume if out_dir
                              # has checkpoints, else scratch) | a model to start a new run from, as other
                              # scripts' --model= names one: 'gpt2'..., a Hugging Face dir, a run dir, a .pt
eval_interval = 250           # steps between evaluations; each evaluation also saves a checkpoint
eval_iters = 20               # batches per split in an evaluation: fixed rows spread over the split
log_interval = 10             # steps between log lines; each waits for the GPU
keep_last = 2                 # step checkpoints to keep, besides best.pt (lowest val loss)
patience = 0                  # stop after this many evaluations without a better val loss; 0 = off
wandb_log = False             # Weights & Biases logging (works with WANDB_MODE=offline)
wandb_project = "gpt"         # with wandb_log: the wandb project
wandb_run_name = "run"        # and the run's name in it
# data
shuffle = True                # read each epoch's rows in a random (seeded) order; False: in file order
batch_size = 12               # sequences per micro-batch per process
gradient_accumulation_steps = 40  # micro-batches per optimizer step, summed over all processes
# model: a preset from model.py, plus overrides; None keeps the preset's value
preset = "gpt2"               # 'gpt1' | 'gpt2' | 'modern'
n_layer = None                # blocks (gpt1, gpt2, modern: 12)
n_head = None                 # attention heads per block (12)
n_embd = None                 # the residual stream's width (768)
block_size = None             # context length (gpt1: 512, gpt2: 1024, modern: 4096)
dropout = None                # 0 for pretraining on lots of data; 0.1+ against overfitting small data
bias = None                   # biases in Linear and LayerNorm
tie_weights = None            # the head shares the embedding matrix (all presets: True)
# modded-nanogpt's changes (Jordan et al. 2024), off in every preset; model.py says what each does
mlp = None                    # 'gelu' | 'swiglu' | 'relu2'
qk_norm = None                # True: RMSNorm on each head's queries and keys
logit_softcap = None          # > 0: logits = cap * tanh(logits / cap) (modded-nanogpt: 30, later 15)
zero_init = None              # True: the blocks' output projections start at 0
grad_checkpoint = False       # out of memory? recompute each block in backward: far less activation
                              # memory for ~1/3 more compute (applies to resumed and pretrained models too)
# optimizer: AdamW (Loshchilov & Hutter 2019), or Muon for the blocks' matrices (training.configure_optimizers)
optimizer = "adamw"           # 'adamw' | 'muon' (Jordan et al. 2024; embeddings, head, norms stay on AdamW)
learning_rate = 6e-4          # peak, reached after warmup
embedding_lr_scale = 1.0      # an untied input embedding's lr is learning_rate * this
max_iters = 5000              # optimizer steps of the whole run
weight_decay = 0.1            # AdamW's, on matrices and embeddings only
beta1 = 0.9                   # AdamW's first-moment decay
beta2 = 0.95                  # 0.95 rather than Adam's 0.999: steadier for large-batch LM training
eps = 1e-8                    # added to the second moment's root
grad_clip = 1.0               # clip the global gradient norm to this; 0 = off
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 200            # steps of linear warmup from 0 to learning_rate
lr_decay_iters = 0            # step where the decay reaches min_lr; 0 = max_iters
min_lr = 6e-5                 # ~learning_rate/10 (Chinchilla, Hoffmann et al. 2022)
# distillation (Hinton et al. 2015): learn from a trained model's distribution, not only the next token
teacher = ""                  # a run directory or checkpoint with the same tokenizer; "" = off
distill_alpha = 0.5           # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy
distill_temperature = 2.0     # T > 1 softens both distributions, so the teacher's near-misses carry signal
# system
parallel = "ddp"              # under torchrun: 'ddp' (a full copy per GPU) | 'fsdp' (FSDP2: weights, gradients
                              # and optimizer state sharded across GPUs, for models that outgrow one)
device = "auto"               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"                # 'float32' | 'bfloat16' | 'float16'; auto = bfloat16 on GPUs that have it
compile = None                # torch.compile; None = on for CUDA, off on CPU (see the note below)
seed = 1337                   # initial weights, the row order, dropout (each rank its own)
# ----------------------------------------------------------------------------------------------

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "tie_weights", "mlp", "qk_norm",
              "logit_softcap", "zero_init")  # model overrides


# ---- the steps of main that are not the loop ------------------------------------------------------

def check_settings(config, world):
    """Refuse settings that cannot work together, before anything is loaded."""
    for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if config[k] < 1:
            raise UserError(f"{k}={config[k]} must be at least 1")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"parallel={parallel!r} is not one of 'ddp', 'fsdp'")
    if parallel == "fsdp" and optimizer == "muon":  # Muon needs whole matrices; FSDP holds slices
        raise UserError("optimizer='muon' works with parallel='ddp' only: Muon needs each matrix whole")
    if not 0 <= distill_alpha <= 1 or distill_temperature <= 0:
        raise UserError(f"need 0 <= distill_alpha <= 1 and distill_temperature > 0, got {distill_alpha}, "
                        f"{distill_temperature}")
    if gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible "
                        f"by the number of processes ({world}); use a multiple of {world}")


def find_data(data_dir):
    """(tokenizer, train shards, val shards) of data_dir, or a UserError with the command that makes them."""
    command_file = os.path.join(data_dir, "command.txt")  # prepare.py records how it made the folder
    remake = open(command_file).read().strip() if os.path.exists(command_file) else \
        f"python prepare.py --dataset={dataset}"
    tok_path = os.path.join(data_dir, "tokenizer.bpe")
    train_files = sorted(glob.glob(os.path.join(data_dir, "*_train_*.bin")))
    val_files = sorted(glob.glob(os.path.join(data_dir, "*_val_*.bin")))
    if not (train_files and val_files and os.path.exists(tok_path)):
        raise UserError(f"{data_dir}/ lacks train shards, val shards or tokenizer.bpe; run: {remake}")
    try:
        return Tokenizer.load(tok_path), train_files, val_files
    except ValueError as e:
        raise UserError(f"{e}; re-run: {remake}")


def choose_start(config, tokenizer, tok_path, rank, world, fsdp):
    """The model the run starts from, per init_from: 'scratch' builds the preset with the overrides,
    'resume' reads out_dir's newest checkpoint, 'auto' resumes if there is one and else starts from
    scratch, anything else names weights to start from (checkpoint.open_model: GPT-2 by name, a
    Hugging Face directory, a run directory or checkpoint), which must use the data's tokenizer.
    Returns (model on the CPU, its weights for shard() or None, the checkpoint dict or None, its path
    or None); the model is None when the run to resume has already reached max_iters. Under FSDP a new
    or resumed model is built on the meta device and its weights are this rank's slices (ShardedInit)
    or the memory-mapped checkpoint's, which shard() puts in place."""
    found = checkpoint.step_checkpoints(out_dir)
    process.check_shared(out_dir, found)  # every rank sees the same checkpoints (the docstring's multi-node)
    found = found[-1] if found else None
    overrides = {k: config[k] for k in SHAPE_KEYS if config[k] is not None}
    if init_from == "resume" and not found:
        raise UserError(f"init_from='resume' but {out_dir}/ has no ckpt_*.pt; start with "
                        f"--init_from=scratch (or auto) or point --out_dir at a run")
    if init_from in ("resume", "auto") and found:
        ckpt = checkpoint.load(found)
        if ckpt["tokenizer"] != tokenizer.dumps():
            raise UserError(f"{tok_path} differs from the tokenizer {found} was trained with; resume with "
                            f"--dataset={ckpt.get('config', {}).get('dataset', '?')}, as that run had")
        saved = GPTConfig(**ckpt["model_args"])  # fields newer than the checkpoint take their defaults
        for k, v in overrides.items():  # a resumed run has the checkpoint's shape: say so, do not ignore
            if getattr(saved, k) != v:
                raise UserError(f"{k}={v!r} but the checkpoint {found} has {k}={getattr(saved, k)!r}; a "
                                f"resumed run keeps its shape: drop --{k}, or start a new --out_dir")
        if ckpt["iter_num"] >= max_iters:  # nothing to do; not an error (a re-run of the quick start)
            say(f"{out_dir}/ is already at step {ckpt['iter_num']}, max_iters={max_iters}: nothing to "
                f"train; raise --max_iters to continue the run")
            return None, None, None, found
        if fsdp:
            with torch.device("meta"):
                return GPT(GPTConfig(**ckpt["model_args"])), ckpt["model"], ckpt, found
        return checkpoint.build_model(ckpt), None, ckpt, found
    if found:  # a new run would interleave its checkpoints with the old run's
        raise UserError(f"{out_dir}/ already holds checkpoints of another run; continue it with "
                        f"--init_from=resume, or use a new --out_dir (or delete the old one)")
    if init_from in ("scratch", "auto"):
        base = GPTConfig.preset(preset)
        for k, v in overrides.items():  # None defaults accept any type, so check against the preset's
            want = type(getattr(base, k))
            if not (isinstance(v, want) or want is float and type(v) is int):
                raise UserError(f"config key '{k}' expects {want.__name__}, got {v!r}")
        new = GPTConfig.preset(preset, vocab_size=tokenizer.vocab_size, **overrides)
        if fsdp:
            with torch.device("meta"), ShardedInit(rank, world) as init:
                model = GPT(new)
            return model, init.weights(model), None, None
        return GPT(new), None, None, None
    try:
        opened = checkpoint.open_model(init_from)
    except ValueError as e:
        raise UserError(f"init_from={init_from!r}: {e}")
    if opened.tokenizer.dumps() != tokenizer.dumps():  # the same text must be the same ids
        raise UserError(f"init_from={init_from!r} uses the {opened.tokenizer.name} tokenizer, not this run's "
                        f"{tok_path}; prepare the data with its tokenizer (GPT-2's weights: --tokenizer=gpt2)")
    if getattr(opened.model, "quantization", None):
        raise UserError(f"init_from={init_from!r} holds {opened.model.quantization['mode']} weights, which do not "
                        f"train; start from the float checkpoint it was quantized from")
    if dropout is not None:
        training.set_dropout(opened.model, dropout)
    return opened.model.train(), None, None, None


def check_same_data(train_data, tokenizer, data_dir, world):
    """Multi-node: data/ may be a copy per node, but it must be the same copy on every rank."""
    mine = (train_data.total, hashlib.sha256(tokenizer.dumps().encode()).hexdigest()[:16])
    every = [None] * world
    dist.all_gather_object(every, mine)
    if any(other != every[0] for other in every):
        bad = next(r for r, other in enumerate(every) if other != every[0])
        raise UserError(f"rank {bad} has {every[bad][0]:,} train tokens and tokenizer {every[bad][1]}, rank 0 "
                        f"{every[0][0]:,} and {every[0][1]}: every node needs the same {data_dir}/")


@torch.no_grad()
def evaluate(model, train_data, val_data, token_bytes, ctx, fsdp, rank, world):
    """Mean loss over eval_iters fixed batches of each split (rows spread over the whole split, the
    same rows every time, so evaluations compare), and val bits per byte. Ranks split the batches.
    Under FSDP every forward is a collective (it gathers the weights), so every rank runs the same
    number of them: a rank short of a batch runs one that is not counted."""
    net = model.module if isinstance(model, DDP) else model  # no DDP hooks for forward-only passes
    model.eval()
    out = {}
    rounds = -(-eval_iters // world) * world if fsdp else eval_iters
    for split, stream in (("train", train_data), ("val", val_data)):
        stats = torch.zeros(3, device=token_bytes.device)  # sum of mean batch losses, batches, bytes
        for k in range(rank, rounds, world):
            x, y = stream.eval_batch(k % eval_iters, eval_iters)
            with ctx:
                _, loss = net(x, y)
            if k < eval_iters:
                stats += torch.stack([loss.float(), torch.ones((), device=stats.device), token_bytes[y].sum().float()])
        if dist.is_initialized():
            dist.all_reduce(stats)
        loss_sum, n, nbytes = stats.tolist()
        out[split] = loss_sum / n
        if split == "val":  # the mean batch loss times tokens per batch: the batches' total nats
            out["val_bpb"] = bits_per_byte(loss_sum * stream.B * stream.T, nbytes)
    model.train()
    return out


# ---- the run ---------------------------------------------------------------------------------------

def main(argv=None):
    config = configure(globals(), argv)

    # ---- setup: processes, device, precision --------------------------------------------------
    distributed, rank, local_rank, world = process.from_env()  # under torchrun, or one process
    master = rank == 0  # only rank 0 prints, logs and writes checkpoints
    check_settings(config, world)
    fsdp = distributed and parallel == "fsdp"
    ddp = distributed and not fsdp
    accum = gradient_accumulation_steps // world  # micro-steps per process per optimizer step
    dev, device_type, ptdtype = pick_device(device, dtype)  # under torchrun, cuda:LOCAL_RANK
    dtype_name = str(ptdtype).removeprefix("torch.")
    if fsdp and dtype_name == "float16":  # the GradScaler does not take sharded gradients
        # V100 and T4 (before compute capability 8.0) only emulate bf16, slowly: float32 there
        native = device_type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0)
        raise UserError(f"parallel='fsdp' trains in bfloat16 or float32; use --dtype="
                        f"{'bfloat16' if native else 'float32 (this GPU has no bfloat16 tensor cores)'}")
    process.start(dev)
    ctx = autocast(device_type, ptdtype)
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for float32 matmuls on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
    # torch.compile on CUDA: fused kernels, the usual large speedup. CPU: measured slower for the quickstart
    # model, compile time included (bench/README.md), so off unless asked for.
    use_compile = device_type == "cuda" if compile is None else compile
    if use_compile and compile_problem(device_type):
        say(f"warning: {compile_problem(device_type)}; running without torch.compile")
        use_compile = False

    # ---- data and model -------------------------------------------------------------------------
    data_dir = os.path.join("data", dataset)
    tok_path = os.path.join(data_dir, "tokenizer.bpe")
    tokenizer, train_files, val_files = find_data(data_dir)
    model, weights, ckpt, found = choose_start(config, tokenizer, tok_path, rank, world, fsdp)
    if model is None:  # the run is already at max_iters
        return
    if rank:  # from here on ranks draw different dropout masks
        torch.manual_seed(seed + rank)
    T = block_size if (block_size and init_from not in ("scratch", "resume", "auto")) else model.config.block_size
    if T > model.config.block_size:
        raise UserError(f"block_size={T} exceeds the model's context {model.config.block_size}")
    model.config.grad_checkpoint = grad_checkpoint  # a memory/compute trade, not part of the model
    model = shard(model, weights, dev, ptdtype, rank, world) if fsdp else model.to(dev)
    weights = None  # FSDP: the slices are in place
    raw_model = model  # the uncompiled, unwrapped module: its state_dict has clean keys (no _orig_mod.)
    tokens_per_step = gradient_accumulation_steps * batch_size * T
    train_data = TokenStream(train_files, batch_size, T, rank, world, dev, seed if shuffle else None)
    val_data = TokenStream(val_files, batch_size, T, device=dev)
    if distributed:
        check_same_data(train_data, tokenizer, data_dir, world)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=dev)  # for bits per byte
    peak = peak_flops(torch.cuda.get_device_name(dev), dtype_name) if device_type == "cuda" else None
    teacher_model, teacher_where = distill.load_teacher(teacher, tokenizer, tok_path, T, dev, device_type, ptdtype,
                                                        use_compile) if teacher else (None, None)

    # everything is checked: now the run directory may be written (by rank 0 only)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        log = process.Log(os.path.join(out_dir, "log.jsonl"), max_iters, append=ckpt is not None,
                          wandb=training.open_wandb(wandb_project, wandb_run_name, config) if wandb_log else None)
        training.print_config(config)
        print(f"model: {raw_model.num_params(non_embedding=False):,} parameters "
              f"({raw_model.num_params():,} non-embedding), {model.config}")
        print(f"global batch: {gradient_accumulation_steps} micro-batches x {batch_size} x {T} = "
              f"{tokens_per_step:,} tokens per step, {world} process(es); {train_data.total:,} train tokens "
              f"= {train_data.total / tokens_per_step:.1f} steps per epoch")
        if teacher_model is not None:
            print(f"distilling from {teacher_where}: {teacher_model.num_params(non_embedding=False):,} "
                  f"parameters, alpha {distill_alpha}, temperature {distill_temperature}")

    # ---- optimizer --------------------------------------------------------------------------------
    optimizers = training.configure_optimizers(raw_model, weight_decay, learning_rate, (beta1, beta2), eps, device_type,
                                               optimizer, embedding_lr_scale)  # a ValueError is one line (run)
    say("\n".join(training.describe(optimizers, learning_rate)))
    # float16 has a narrow range: scale the loss up so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")
    iter_num, best_val_loss, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        iter_num, best_val_loss, evals_since_best = training.restore(ckpt, found, raw_model, optimizers, scaler,
                                                                     train_data, rank, world, device_type)
        ckpt = None  # free the memory
    if use_compile:
        model = torch.compile(model)
    if ddp:
        model = training.wrap_ddp(model, local_rank, device_type)
    decay_iters = lr_decay_iters or max_iters

    def save(is_best):  # the checkpoint's plain entries, as they stand now
        training.save_checkpoint(raw_model, optimizers, fsdp, device_type, out_dir, keep_last, is_best, iter_num,
                                 tokenizer, config, scaler=scaler.state_dict(), best_val_loss=best_val_loss,
                                 evals_since_best=evals_since_best, data=train_data.state())

    # ---- the loop -----------------------------------------------------------------------------
    stop = training.StopSignals()
    start_iter = iter_num
    resumed = start_iter > 0
    loss_sum = torch.zeros((), device=dev)  # summed on the device between log lines: no sync
    steps_since_log, t0, train_time, stopping = 0, time.time(), 0.0, False
    while True:
        if stopping:  # a signal arrived: the step in flight has finished
            say(f"received {stop.name} at step {iter_num}: saving and exiting")
            save(False)
            stop.saved()
            break
        # evaluate and checkpoint every eval_interval steps and at the end (not again right after a resume)
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not (resumed and iter_num == start_iter):
            t_eval = time.time()
            losses = evaluate(model, train_data, val_data, token_bytes, ctx, fsdp, rank, world)
            training.stop_if_not_finite(losses["val"], "the val loss", iter_num, out_dir)
            is_best = losses["val"] < best_val_loss
            best_val_loss, evals_since_best = (losses["val"], 0) if is_best else (best_val_loss, evals_since_best + 1)
            if master:
                log({"step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     "val_bpb": losses["val_bpb"]}, prefix="eval ")
            save(is_best)
            if patience and evals_since_best >= patience:
                say(f"early stop: {patience} evaluations without a better val loss; best is {out_dir}/best.pt")
                break
            t0 += time.time() - t_eval  # evaluating and saving do not count against tokens/s
        if iter_num >= max_iters:
            break

        lr = training.get_lr(iter_num, warmup_iters, decay_iters, learning_rate, min_lr)
        training.set_lr(optimizers, lr)
        for micro in range(accum):
            x, y = train_data.next_batch()
            # DDP all-reduces the gradients on the last micro-step only; the others accumulate locally,
            # in the full gradient each DDP rank holds anyway. FSDP reduce-scatters after every
            # micro-step (torchtitan's default): skipping it (set_requires_gradient_sync(False)) would
            # keep the whole unsharded float32 gradient on every rank until the last micro-step,
            # undoing FSDP's saving, for accum reduce-scatters per step instead of one
            last = micro == accum - 1
            with model.no_sync() if ddp and not last else nullcontext():
                with ctx:
                    loss = distill.step_loss(model, teacher_model, x, y, distill_alpha, distill_temperature)
                loss_sum += loss.detach()
                scaler.scale(loss / accum).backward()  # / accum: the step's gradient is the mean
        grad_norm = training.optimizer_step(optimizers, scaler, raw_model.parameters(), grad_clip)
        iter_num += 1
        steps_since_log += 1
        stopping = stop.requested()  # on any rank: every rank votes, so all of them save this step
        # a log step is the one place the loop waits for the device
        if iter_num % log_interval == 0 or iter_num == max_iters or stopping:
            if distributed:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / (steps_since_log * gradient_accumulation_steps)
            training.stop_if_not_finite(train_loss, "the training loss", iter_num, out_dir)
            dt = (time.time() - t0) / steps_since_log
            train_time += dt * steps_since_log
            if master:
                if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards, as one number
                    grad_norm = grad_norm.full_tensor()
                record = {"step": iter_num, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_step / dt}
                if peak:  # model FLOPs per second per GPU over the GPU's peak
                    record["mfu"] = raw_model.estimate_mfu(tokens_per_step / dt / world, peak, T)
                # the remaining steps at the mean step time so far (evaluations not counted)
                record["eta"] = process.duration((max_iters - iter_num) * train_time / (iter_num - start_iter))
                log(record)
            loss_sum.zero_()
            steps_since_log, t0 = 0, time.time()
    process.leave_together()


if __name__ == "__main__":
    run(main)
