"""train.py and finetune.py on 2 CPU processes (gloo), for what only several ranks show: FSDP keeps 1/world
of the gradients through an accumulation window, builds the same initial weights as one process without
any rank holding the whole model, and saves a tied matrix once; the ranks wait for rank 0's checkpoint on
the CPU; a refusal found on one rank ends every rank at once with one line."""
import json
import sys

import torch

from conftest import TRAIN, train

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")

# Runs a script (argv[1:]) as torchrun's worker, recording in grad_bytes_<rank>.json the most gradient
# bytes the rank held after any backward: its gradient shards plus the unsharded gradients FSDP2 keeps
# between micro-steps when told not to reduce (unsharded_accumulated_grad, or the unsharded parameter's
# .grad), found through the modules train.py passes to fully_shard.
GRAD_BYTES = """
import json, os, runpy, sys
import torch
import torch.distributed.fsdp
sharded, peak, dtypes = [], [0], set()
fully_shard = torch.distributed.fsdp.fully_shard
def recording(module, **kwargs):
    sharded.append(module)
    return fully_shard(module, **kwargs)
torch.distributed.fsdp.fully_shard = recording
def held():
    n = sum(p.grad.to_local().nbytes for p in sharded[-1].parameters() if p.grad is not None)
    for m in sharded:
        for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params:
            dtypes.add((str(fp.param_dtype), str(fp.reduce_dtype)))
            unsharded = getattr(fp, "_unsharded_param", None)
            for g in (fp.unsharded_accumulated_grad, getattr(unsharded, "grad", None)):
                n += g.nbytes if g is not None else 0
    return n
backward = torch.Tensor.backward
def measured(self, *args, **kwargs):
    backward(self, *args, **kwargs)
    peak[0] = max(peak[0], held())
torch.Tensor.backward = measured
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    size = lambda m: sum(p.numel() * 4 for p in m.parameters())  # float32 bytes of the whole tensors
    json.dump({"peak": peak[0], "model": size(sharded[-1]), "block": size(sharded[0]), "dtypes": sorted(dtypes)},
              open(f"grad_bytes_{os.environ['RANK']}.json", "w"))
"""


def load(path):
    return torch.load(path, weights_only=True)


def test_fsdp_holds_a_shard_of_the_gradients_through_the_accumulation_window(workdir, tmp_path):
    """4 micro-steps per rank per step: after every backward each rank holds at most half the model's
    gradient (its shards) plus one block, not the whole model's as when reduce-scatters wait for the
    last micro-step."""
    (tmp_path / "grad_bytes.py").write_text(GRAD_BYTES)
    train(workdir, "--out_dir=out-fsdp-grads", "--parallel=fsdp", "--max_iters=2", "--eval_interval=2",
          "--gradient_accumulation_steps=8", cmd=(*TORCHRUN, str(tmp_path / "grad_bytes.py"), TRAIN))
    for rank in (0, 1):
        r = json.load(open(workdir / f"grad_bytes_{rank}.json"))
        assert r["peak"] > 0 and r["dtypes"] == [["None", "None"]]  # float32: no mixed-precision casts
        assert r["peak"] <= r["model"] / 2 + r["block"], r


def test_fsdp_in_bfloat16_gathers_bf16_and_reduces_in_float32(workdir, tmp_path):
    (tmp_path / "grad_bytes.py").write_text(GRAD_BYTES)
    train(workdir, "--out_dir=out-fsdp-bf16", "--parallel=fsdp", "--max_iters=1", "--eval_interval=1",
          "--dtype=bfloat16", cmd=(*TORCHRUN, str(tmp_path / "grad_bytes.py"), TRAIN))
    r = json.load(open(workdir / "grad_bytes_0.json"))
    assert r["dtypes"] == [["torch.bfloat16", "torch.float32"]]
    weights = load(workdir / "out-fsdp-bf16/ckpt_000001.pt")["model"]
    assert all(t.dtype == torch.float32 for t in weights.values())  # the sharded weights stay float32


def test_fsdp_builds_one_process_initial_weights_and_saves_the_tied_matrix_once(workdir):
    """Built on the meta device and initialised shard by shard, the step-0 weights equal a one-process
    CPU build's to the last bit; the checkpoint stores wte/lm_head once."""
    for out, cmd in (("out-init-one", (sys.executable, TRAIN)), ("out-init-fsdp", (*TORCHRUN, TRAIN))):
        train(workdir, f"--out_dir={out}", "--parallel=fsdp", "--max_iters=0", cmd=cmd)
    one, fsdp = (load(workdir / out / "ckpt_000000.pt")["model"] for out in ("out-init-one", "out-init-fsdp"))
    assert one.keys() == fsdp.keys() and all(torch.equal(one[k], fsdp[k]) for k in one)
    assert one["transformer.h.1.mlp.c_proj.weight"].std() < 0.02  # GPT-2's scaled init, not a default one
    wte, head = fsdp["transformer.wte.weight"], fsdp["lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


# rank 0's checkpoint writes take 3 s; every rank records when it leaves the wait for rank 0
SLOW_SAVE = """
import os, runpy, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import checkpoint, process
save_step, wait_for_rank0 = checkpoint.save_step, process.wait_for_rank0
def slow(*args, **kwargs):
    time.sleep(3)
    return save_step(*args, **kwargs)
def recorded():
    wait_for_rank0()
    open(f"saved_{os.environ['RANK']}.txt", "a").write(f"{time.time()}\\n")
checkpoint.save_step, process.wait_for_rank0 = slow, recorded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ranks_wait_on_the_cpu_until_rank_0_has_written(workdir, tmp_path):
    """While rank 0 writes a checkpoint, rank 1 waits in the save (on the CPU group), not at the next
    step's all-reduce (which under NCCL the watchdog would time): it leaves each save after rank 0 does."""
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    for r in (0, 1):
        (workdir / f"saved_{r}.txt").unlink(missing_ok=True)
    train(workdir, "--out_dir=out-slow-save", "--max_iters=2", "--eval_interval=1",
          cmd=(*TORCHRUN, str(tmp_path / "slow_save.py"), TRAIN))
    zero, one = ([float(t) for t in open(workdir / f"saved_{r}.txt")] for r in (0, 1))
    assert len(zero) == len(one) == 3
    assert all(b >= a - 0.5 for a, b in zip(zero, one)), (zero, one)  # rank 1 left after rank 0's 3 s write
    assert all(b - a > 2.5 for a, b in zip(one, one[1:]))
