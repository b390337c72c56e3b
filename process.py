"""
process.py: this process's place in a run, and what it prints: what train.py and finetune.py share.

torchrun starts one process per GPU and tells each where it stands through the environment: RANK
(0..WORLD_SIZE-1 over all nodes), LOCAL_RANK (which GPU of this node) and WORLD_SIZE. A plain
`python script.py` sets none of them and is rank 0 of 1. from_env reads them; start joins the
process group when there is one and leaves it at exit. Rank 0 alone prints (say) and keeps the run's
log (Log): every rank computes the same numbers, and eight copies of each line help nobody.

Timeout. A collective that waits longer than TIMEOUT fails the run instead of hanging it. NCCL's
default watchdog is 10 minutes, which legitimate waits can exceed: every rank waits at its next
collective while rank 0 alone writes a checkpoint (a 1.5B-parameter one with AdamW's moments is
18 GB, minutes on a network filesystem), or while one rank finishes a slower first torch.compile or
a dataset download. 30 minutes (gloo's default, and PyTorch's for every other backend) covers those;
a crashed rank does not wait for it, since torchrun stops the other workers within seconds, so the
timeout only bounds a true hang.
"""
import atexit
import datetime
import json
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)


def from_env():
    """(distributed, rank, local_rank, world) from torchrun's variables; (False, 0, 0, 1) without them."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    return "RANK" in os.environ, rank, local_rank, world


def start(dev):
    """Under torchrun, join the process group (NCCL between GPUs, gloo between CPU processes) on
    device dev, and leave it at every exit, errors included. Nothing to do for a single process."""
    if "RANK" not in os.environ:
        return
    cuda = torch.device(dev).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device(dev) if cuda else None)
    atexit.register(dist.destroy_process_group)


def say(*args):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def duration(seconds):
    """4m10s, 2h05m: an ETA to read at a glance."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# how each logged number is printed, the same on every line so columns compare; other floats get 4 decimals
FORMATS = {"lr": ".2e", "grad_norm": ".3f", "ms_per_step": ".0f", "tokens_per_s": ",.0f", "examples_per_s": ",.1f",
           "mfu": ".1%"}


class Log:
    """Rank 0's record of a run: each record (a dict with a "step") becomes one line for people on
    stdout, `step 40/200 | loss 2.3456 | lr 6.00e-04 | eta 1m05s`, and one JSON line for programs in
    path (and a wandb point, given the wandb module). An "eta" is printed, not stored."""

    def __init__(self, path, total, append=False, wandb=None):
        self.file, self.total, self.wandb = open(path, "a" if append else "w"), total, wandb

    def __call__(self, record, prefix=""):
        eta = record.pop("eta", None)
        parts = [f"{k} {v:{FORMATS.get(k, '.4f' if isinstance(v, float) else '')}}" for k, v in record.items()
                 if k != "step"]
        print(" | ".join([f"{prefix}step {record['step']}/{self.total}", *parts] + ([f"eta {eta}"] if eta else [])),
              flush=True)
        self.write(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
