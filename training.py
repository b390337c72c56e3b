"""
training.py: what every training loop does, whatever it trains. train.py (a GPT on token shards) and
finetune.py (a GPT with a task head) both build their optimizers, follow a learning-rate schedule, take
an optimizer step, wrap the model for DDP, stop on a non-finite loss and write checkpoints with the
functions here, so the two loops differ only in what they compute.

- Optimizers. configure_optimizers: AdamW with weight decay on matrices only, or Muon for the blocks'
  matrices; every group carries an "lr_scale" that set_lr multiplies into the schedule's rate.
- Schedule. get_lr: linear warmup, then a cosine (pretraining) or linear (fine-tuning) decay.
- The step. optimizer_step: unscale the float16 loss scaling, clip the global gradient norm, step,
  zero the gradients and update the GradScaler, in that order, returning the norm for the log.
- A pretrained model, retrained. set_dropout gives it the run's dropout; reinit_blocks keeps its first k
  blocks and starts the rest as a new model would (finetune.py's transfer_layers).
- Exact resume (train.py). A checkpoint (checkpoint.py) holds everything the next step depends on:
  weights, optimizer moments, GradScaler, step, data position and every rank's RNG states (dropout
  masks); save_checkpoint writes it (rank 0, from every rank's parts), restore puts it back.
- Crash safety. Checkpoints are written atomically, so a crash or SIGKILL mid-save leaves the previous
  ones intact. StopSignals: SIGTERM (a preempted machine) and Ctrl-C finish the current step, save and
  exit cleanly; only a second Ctrl-C stops at once (a SIGTERM that arrives twice, from the scheduler and
  from torchrun, still saves). Under DDP the ranks vote every step over the CPU (gloo) group, so all of
  them save the same step well inside torchrun's 30 s grace before SIGKILL, without waiting for the GPU.
As process.py does, it prints on rank 0 only: the checkpoint it saved, what a resume restored.
"""
import dataclasses
import math
import signal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import process
from configurator import UserError
from model import GPT, CausalSelfAttention
from process import say


# ---- optimizers and the learning rate --------------------------------------------------------------

def configure_optimizers(model, weight_decay, learning_rate, betas, eps, device_type, optimizer="adamw",
                         embedding_lr_scale=1.0):
    """Optimizers covering every trainable parameter of model once; set_lr multiplies each group's
    "lr_scale" into get_lr's rate. AdamW decays matrices only: decaying a norm gain or bias shrinks a
    scale, not a feature (GPT-1). optimizer="muon" (Jordan et al. 2024) orthogonalises the blocks'
    matrix updates so every direction learns alike, sized as AdamW's (match_rms_adamw, Liu et al. 2025).
    An untied input embedding's rows move only when their token occurs: lr * embedding_lr_scale, no
    decay (modded-nanogpt). Those last two rules go by a GPT's own parameter names; a module around a
    GPT (finetune.py's TaskModel, whose names start "gpt.") gets the first alone: AdamW, decay on matrices."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer={optimizer!r} is not one of 'adamw', 'muon'")
    if embedding_lr_scale != 1.0 and model.config.tie_weights:
        raise ValueError(f"embedding_lr_scale={embedding_lr_scale} needs an untied head (tie_weights=False): "
                         f"a tied embedding is also the output layer, which a large lr would wreck")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in params if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
    table = [p for n, p in params if n == "transformer.wte.weight" and not model.config.tie_weights]
    rest = [p for _, p in params if not any(p is q for q in hidden + table)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if table:
        groups.append({"params": table, "weight_decay": 0.0, "lr_scale": embedding_lr_scale,
                       "lr": learning_rate * embedding_lr_scale})
    optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")]
    if hidden:
        optimizers.append(torch.optim.Muon([{"params": hidden, "lr_scale": 1.0}], lr=learning_rate,
                                           weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def describe(optimizers, learning_rate):
    """A line per parameter group for the run's log: its tensors, parameters, peak lr and weight decay."""
    return [f"optimizer {type(opt).__name__}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} "
            f"parameters, peak lr {learning_rate * g['lr_scale']:.2e}, weight_decay {g['weight_decay']}"
            for opt in optimizers for g in opt.param_groups]


def get_lr(it, warmup, decay_iters, lr, lr_min, decay="cosine"):
    """Linear warmup from ~0 to lr over `warmup` steps, then down to lr_min at decay_iters, flat after:
    half a cosine (the GPT-2 / Chinchilla schedule) or, with decay="linear", a straight line (GPT-1's
    fine-tuning: "annealed to 0 using a linear schedule")."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return lr_min
    progress = (it - warmup) / max(1, decay_iters - warmup)  # 0 -> 1
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress  # 1 -> 0
    return lr_min + shape * (lr - lr_min)


def set_lr(optimizers, lr):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]


def optimizer_step(optimizers, scaler, params, grad_clip):
    """One step of every optimizer on the accumulated gradients of params; returns the gradient norm
    before clipping. grad_clip = 0: no clipping."""
    for opt in optimizers:
        scaler.unscale_(opt)  # true gradients, for clipping and the norm we log
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    for opt in optimizers:
        scaler.step(opt)  # skipped by the scaler if float16 gradients overflowed
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return grad_norm


# ---- the model, the run's guards ---------------------------------------------------------------------

def wrap_ddp(model, local_rank, device_type, find_unused=False):
    """model in DDP, which all-reduces the gradients in backward. broadcast_buffers=False: the only
    buffers (RoPE tables) are computed identically on every rank, so broadcasting them each forward is
    wasted work, and a collective inside forward would hang an evaluation in which some ranks have no
    batch. find_unused: some parameters get no gradient (finetune.py's unused LM head)."""
    return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False,
               find_unused_parameters=find_unused)


def set_dropout(gpt, p):
    """Train a model built elsewhere (a pretrained one) with dropout p."""
    gpt.config.dropout = p
    for m in gpt.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if isinstance(m, CausalSelfAttention):
            m.dropout = p  # the attention's own dropout, passed to scaled_dot_product_attention


def reinit_blocks(gpt, keep, seed):
    """Keep gpt's embeddings, final norm, head and first `keep` blocks; give blocks keep.. the weights a new
    GPT of the same config gets from its own init with torch seed `seed` (a whole one is built, so every
    draw before those blocks' is the same: the model's init stays the one definition of a fresh block).
    The global RNG is left as it was. Which pretrained layers help a task is GPT-1's figure 2 (left)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = GPT(gpt.config)
    like = gpt.transformer.wte.weight
    for i in range(keep, len(gpt.transformer.h)):
        gpt.transformer.h[i] = fresh.transformer.h[i].to(like.device, like.dtype)
    return gpt


def stop_if_not_finite(value, what, step, out_dir):
    if not math.isfinite(value):
        kept = checkpoint.step_checkpoints(out_dir)
        raise UserError(f"{what} is {value} at step {step}; stopped without saving (last good checkpoint: "
                        f"{kept[-1] if kept else 'none'}). Lower learning_rate, keep grad_clip on, or use "
                        f"bfloat16/float32 instead of float16")


def print_config(config):
    print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.items()))


def open_wandb(project, name, config):
    try:
        import wandb  # imported only when asked for: never a requirement
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb") from None
    wandb.init(project=project, name=name, config=config)
    return wandb


class StopSignals:
    """SIGTERM (a preempted machine) and Ctrl-C ask the loop to finish its step, save and exit: the
    handler records the signal, which requested() reads. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal, self.sigints = None, 0
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum, frame):
        self.sigints += signum == signal.SIGINT
        if self.sigints >= 2:
            raise KeyboardInterrupt  # Ctrl-C twice: stop at once, without saving
        self.signal = self.signal or signum

    def requested(self):
        """Whether any rank caught a signal, which may reach one rank only: the ranks vote (a CPU flag,
        summed over the gloo group without waiting for the GPU), so that all of them save the same step."""
        votes = torch.tensor([float(self.signal is not None)])
        if dist.is_initialized():
            dist.all_reduce(votes, group=process.cpu_group())
        return votes.item() > 0

    @property
    def name(self):
        return signal.Signals(self.signal or signal.SIGTERM).name  # SIGTERM too where another rank caught it

    def saved(self):
        """The loop has saved: a repeated SIGTERM must not kill the exit (Python resets handlers at exit)."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- checkpoints --------------------------------------------------------------------------------------

def checkpoint_entries(gpt_config, step, tokenizer, config, **entries):
    """The entries every checkpoint holds, whichever script trained it (checkpoint.py lists them), and
    the script's own `entries`."""
    return {"version": checkpoint.VERSION, "iter_num": step, "model_args": dataclasses.asdict(gpt_config),
            "tokenizer": tokenizer.dumps(), "config": config, **entries}


def save_checkpoint(raw_model, optimizers, fsdp, device_type, out_dir, keep_last, is_best, step, tokenizer, config,
                    **entries):
    """Write a checkpoint of the weights, the optimizer state, every rank's RNG states and `entries`
    (the losses, the data position...). Every rank contributes its RNG state (and, under FSDP, its
    shards); rank 0 writes. FSDP's shards are gathered into one full state dict on rank 0's CPU, so
    every checkpoint has one format, which sample.py, eval.py and export.py read without knowing how it
    was trained (at 1.5B parameters the gather costs seconds per save; sharded files through
    torch.distributed.checkpoint would save faster but need a converter for every reader)."""
    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    rngs = [checkpoint.rng_state(device_type)]
    if distributed:
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, checkpoint.rng_state(device_type))
    if master or fsdp:  # under DDP the other ranks hold copies of rank 0's state
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP: every rank sends its shards
        weights = get_model_state_dict(raw_model, options=full) if fsdp else raw_model.state_dict()
        if fsdp and master and raw_model.config.tie_weights:  # gathered as two tensors: save it once
            weights["lm_head.weight"] = weights["transformer.wte.weight"]
        # a fresh optimizer (the save at step 0) has no state; DCP would create it by taking a step with
        # zero gradients, which leaves AdamW's step count at 1 and so changes the run that saved
        moments = get_optimizer_state_dict(raw_model, optimizers, options=full) \
            if all(opt.state for opt in optimizers) else {"state": {}, "param_groups": []}
    if master:
        state = checkpoint_entries(raw_model.config, step, tokenizer, config, model=weights, optimizer=moments,
                                   rng=rngs, **entries)
        path = checkpoint.save_step(state, out_dir, is_best, keep_last)
        print(f"saved {path}" + (" (best so far)" if is_best else ""), flush=True)
    # the others wait on the CPU while rank 0 writes (minutes for a large model on a network disk):
    # queued on the GPU, their next all-reduce would be timed by NCCL's watchdog (process.py)
    process.wait_for_rank0()


def restore(ckpt, found, raw_model, optimizers, scaler, train_data, rank, world, device_type):
    """Continue a run where its checkpoint stopped: optimizer state, GradScaler, data position and this
    rank's RNG states. Returns (iter_num, best_val_loss, evals_since_best).
    The saved groups carry the old run's settings (fused=False from a CPU run, old betas, eps,
    weight_decay): the config's win, and what changed is said. The optimizer state is keyed by
    parameter name (torch.distributed.checkpoint's full state dict), the same under DDP, FSDP or one
    process, so a run can resume in another of them."""
    saved, changed = ckpt["optimizer"], set()
    for g_saved, g_now in zip(saved["param_groups"], [g for opt in optimizers for g in opt.param_groups]):
        for k, v in g_now.items():
            was = g_saved.get(k)
            was = tuple(was) if isinstance(v, tuple) and was is not None else was  # betas: saved as a list
            if k not in ("params", "lr", "initial_lr") and was != v:
                changed.add(f"{k} {was} -> {v}")
                g_saved[k] = v
    if saved["state"]:  # a step-0 checkpoint has none, and the fresh optimizer already matches it
        set_optimizer_state_dict(raw_model, optimizers, saved, options=StateDictOptions(full_state_dict=True))
    if changed:
        say(f"optimizer settings from the config, not the checkpoint: {', '.join(sorted(changed))}")
    if scaler.is_enabled() and ckpt["scaler"]:  # a float32/bfloat16 run saved an empty scaler
        scaler.load_state_dict(ckpt["scaler"])
    if not train_data.load_state(ckpt["data"]):
        say(f"warning: the train shards changed since the checkpoint ({ckpt['data']['rows_per_epoch']} -> "
            f"{train_data.rows} rows per epoch); reading them from the start")
    rngs = ckpt["rng"]
    if len(rngs) == world:  # restored after the model was built, since init drew from the RNG
        checkpoint.set_rng_state(rngs[rank], device_type)
    else:
        say(f"warning: checkpoint has RNG states of {len(rngs)} processes, this run has {world}; "
            f"dropout masks will differ from an uninterrupted run")
    say(f"resumed from {found} at step {ckpt['iter_num']}")
    return ckpt["iter_num"], ckpt["best_val_loss"], ckpt["evals_since_best"]
