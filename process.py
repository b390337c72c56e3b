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

Waiting for rank 0. NCCL's watchdog times a collective from when it is queued on the GPU, not when
it starts. So the ranks that rank 0 leaves behind while it writes a checkpoint must not queue the
next step's all-reduce: they wait on a CPU (gloo) barrier instead (wait_for_rank0), whose timeout is
TIMEOUT too, and meet NCCL only once rank 0 is back. The same CPU group carries train.py's stop vote.

Refusals. A check that fails on one rank must end every rank (agree): a rank left waiting at the next
collective would hang until TIMEOUT, on another node even past torchrun's notice of the failure.
"""
import atexit
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from configurator import UserError

TIMEOUT = datetime.timedelta(minutes=30)
_cpu_group = None  # a gloo group beside NCCL; None: the default group, which is gloo already


def from_env():
    """(distributed, rank, local_rank, world) from torchrun's variables; (False, 0, 0, 1) without them."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    return "RANK" in os.environ, rank, local_rank, world


def start(dev):
    """Under torchrun, join the process group (NCCL between GPUs, gloo between CPU processes) on
    device dev, and leave it at every exit, errors included. Nothing to do for a single process."""
    if "RANK" not in os.environ:
        return
    global _cpu_group
    cuda = torch.device(dev).type == "cuda"
    nodes_apart = int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if nodes_apart and "GLOO_SOCKET_IFNAME" not in os.environ and loopback_hostname():
        say(f"warning: this host's name resolves to {loopback_hostname()}, so gloo (the CPU group that "
            f"carries the stop vote and the checkpoint barrier) would listen on loopback, out of the other "
            f"nodes' reach; set GLOO_SOCKET_IFNAME to the network interface (e.g. eth0)")
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device(dev) if cuda else None)
    atexit.register(dist.destroy_process_group)
    _cpu_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else None


def loopback_hostname():
    """The loopback address this host's name resolves to (Debian and Ubuntu map it to 127.0.1.1 in
    /etc/hosts), or None."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return address if address.startswith("127.") else None


def cpu_group():
    """The gloo group for CPU values (None: the default group, when that is gloo)."""
    return _cpu_group


def leave_together():
    """At the end of a run every rank waits for the others, on the CPU: a rank that tears its
    connections down while another is still finishing (writing its log, scoring) makes that one fail."""
    if dist.is_initialized():
        dist.barrier(group=_cpu_group)


def wait_for_rank0():
    """Every rank waits here, on the CPU, until rank 0 arrives (after writing a file the others will
    read, or a checkpoint): no GPU collective is queued meanwhile, so NCCL's watchdog does not run."""
    if dist.is_initialized():
        dist.barrier(group=_cpu_group)


def check_shared(path, files=None):
    """Every rank must see the folder rank 0 writes, path: under torchrun across nodes a folder that is
    not on a shared filesystem is refused at the start, not when a rank reads it back. Given files (what
    this rank finds in path, such as its checkpoints; path need not exist yet), every rank must find
    the same ones: train.py's rank 0 would otherwise start afresh beside a run the others resume.
    Without files, rank 0 leaves a fresh file in path (which exists on rank 0) and every rank looks
    for that file."""
    if not dist.is_initialized():
        return
    shared = "out_dir must be on a filesystem every node shares"
    rank = dist.get_rank()
    if files is not None:
        zeros = [files]
        dist.broadcast_object_list(zeros, src=0, group=_cpu_group)  # every rank gets rank 0's list
        diff = sorted(set(zeros[0]) ^ set(files))
        mine = bool(diff) and diff[-1] in files  # the newest file one side lacks: is it this rank's?
        agree(f"rank {rank} {'sees' if mine else 'cannot see'} {diff[-1]}, which rank 0 "
              f"{'cannot see' if mine else 'sees'}: {shared}" if diff else None)
        return
    probe = os.path.join(path, ".shared_check")
    token = [f"{socket.gethostname()} {os.getpid()} {time.time()}"]  # unique to this run's rank 0
    if rank == 0:
        with open(probe, "w") as f:
            f.write(token[0])
    dist.broadcast_object_list(token, src=0, group=_cpu_group)  # after rank 0's write
    try:
        with open(probe) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    try:
        agree(None if seen else f"rank {rank} cannot see {path}/, where rank 0 writes: {shared}")
    finally:
        if rank == 0:
            os.remove(probe)


def agree(problem):
    """Every rank passes the refusal it found (a message, or None); if any rank found one, every rank
    stops: rank 0 with one `error: ...` line (the lowest rank's message), the others silently with
    status 1, so the run ends at once with one line instead of leaving ranks in a collective."""
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, problem, group=_cpu_group)
        problem = next((p for p in every if p is not None), None)
    if problem is None:
        return
    if int(os.environ.get("RANK", 0)) == 0:
        raise UserError(problem)
    sys.stderr.flush()
    raise SystemExit(1)


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
