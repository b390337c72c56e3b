"""train.py, run for real at tiny sizes on CPU: the loss falls, resume is exact, DDP matches one process,
the data stream neither drops nor repeats tokens, and crashes, signals, NaNs and typos end cleanly."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
from bpe import Tokenizer
from conftest import ENV, TINY, TRAIN, error_line, train
from shards import TokenStream, read_shard, write_shard
from training import get_lr

def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in records(out_dir) if "loss" in r}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_loss_falls_and_bits_per_byte_count_the_bytes(workdir):
    train(workdir, "--out_dir=out-falls", "--max_iters=60", "--eval_interval=30", "--eval_iters=4")
    evals = [r for r in records(workdir / "out-falls") if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 30, 60]
    assert abs(evals[0]["val_loss"] - math.log(512)) < 0.2  # an untrained model is ~uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.6  # it learned (the unigram level is 5.3)
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.6
    # bits per byte = nats/token / ln 2 * tokens / bytes, over the targets of the 4 val batches: 16 rows
    # of 32 tokens spread evenly over the val split (row j of 16 starts at token (j * rows // 16) * 32)
    tok = Tokenizer.load(str(workdir / "data/tiny/tokenizer.bpe"))
    val = read_shard(str(workdir / "data/tiny/tiny_val_000000.bin"))
    rows, nbytes = len(val) // 32, 0
    for j in range(16):
        start = (j * rows // 16) * 32
        targets = val[start + 1:start + 33]  # the row's targets: its inputs shifted by one
        nbytes += sum(0 if t in tok.special_tokens.values() else len(tok.decode_bytes([int(t)])) for t in targets)
    for e in evals:
        assert e["val_bpb"] == pytest.approx(e["val_loss"] / math.log(2) * 512 / nbytes, rel=1e-6)
    ckpt = load(workdir / "out-falls/best.pt")
    assert ckpt["iter_num"] == 60 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert Tokenizer.loads(ckpt["tokenizer"]).decode(tok.encode("def f(x):")) == "def f(x):"
    assert sorted(os.listdir(workdir / "out-falls")) == ["best.pt", "ckpt_000030.pt", "ckpt_000060.pt", "log.jsonl"]


def test_resume_is_exact_bit_for_bit(workdir):
    """8 steps == 4 steps + resume + 4 steps: same losses and weights to the last bit, with dropout on
    (so the RNG state must travel) and the data position restored from the checkpoint."""
    common = ["--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]
    train(workdir, "--out_dir=out-full", "--max_iters=8", *common)
    train(workdir, "--out_dir=out-half", "--max_iters=4", *common)
    train(workdir, "--out_dir=out-half", "--max_iters=8", "--init_from=resume", *common)
    full, half = step_losses(workdir / "out-full"), step_losses(workdir / "out-half")
    assert list(full) == list(half) == list(range(1, 9))
    assert full == half  # the same floats, to the last bit
    a, b = load(workdir / "out-full/ckpt_000008.pt"), load(workdir / "out-half/ckpt_000008.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] and a["data"]["row"] == 8 * 2 * 4  # steps x micro-batches x rows
    # AdamW took exactly 8 steps: saving at step 0 must not create its state with an extra (zero) step
    assert {float(v["step"]) for v in a["optimizer"]["state"].values()} == {8.0}
    # starting from scratch over a run's checkpoints would mix two runs: refused, naming the fix
    line = error_line(train(workdir, "--out_dir=out-half", "--max_iters=8", check=False))
    assert "already holds checkpoints" in line and "--init_from=resume" in line


def test_ddp_two_processes_match_one_with_twice_the_accumulation(workdir):
    """gradient_accumulation_steps is global: 2 ranks x 2 micro-steps see the same 4 micro-batches
    as 1 process x 4, so per-step losses agree up to float summation order."""
    args = ["--max_iters=5", "--eval_interval=100", "--gradient_accumulation_steps=4"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN)
    p = train(workdir, "--out_dir=out-ddp", *args, cmd=torchrun)
    assert "4 micro-batches x 4 x 32 = 512 tokens per step, 2 process(es)" in p.stdout
    train(workdir, "--out_dir=out-single", *args)
    ddp, single = step_losses(workdir / "out-ddp"), step_losses(workdir / "out-single")
    assert list(ddp) == list(single) == [1, 2, 3, 4, 5]
    for step in single:
        assert abs(ddp[step] - single[step]) < 1e-5, (step, ddp[step], single[step])
    assert single[5] < single[1]  # and they trained
    assert len(load(workdir / "out-ddp/ckpt_000005.pt")["rng"]) == 2  # each rank's RNG, for exact resume


def shards(tmp_path, lengths):
    """Shards holding the stream 0, 1, 2, ...: every token says where in the stream it is."""
    stream, files = np.arange(sum(lengths)), []
    for i, (start, n) in enumerate(zip(np.cumsum([0] + lengths), lengths)):
        files.append(str(tmp_path / f"s_train_{i:06d}.bin"))
        write_shard(files[-1], stream[start:start + n])
    return files


def read_all(ranks, steps):
    """Micro-batches in global order (step by step, rank by rank), as a list of x rows and y rows."""
    xs, ys = [], []
    for _ in range(steps):
        for ts in ranks:
            x, y = ts.next_batch()
            assert x.shape == y.shape == (ts.B, ts.T) and x.dtype == torch.int64
            xs += list(x.numpy())
            ys += list(y.numpy())
    return np.array(xs), np.array(ys)


def test_stream_in_file_order_neither_drops_nor_repeats_tokens(tmp_path):
    """Three shards of odd lengths (111 tokens) read by 3 ranks in file order: concatenated, the inputs
    of all micro-batches are the stream itself, across shard ends and around the end of the data."""
    files = shards(tmp_path, [37, 50, 24])
    B, T, world, steps = 2, 5, 3, 9  # 9 steps x 3 ranks x 10 tokens = 270: 2.4 passes over 111
    x, y = read_all([TokenStream(files, B, T, rank=r, world=world) for r in range(world)], steps)
    n = steps * world * B * T
    assert np.array_equal(x.flatten(), np.arange(n) % 111)  # every token once per pass, in order
    assert np.array_equal(y.flatten(), np.arange(1, n + 1) % 111)  # targets: the next token


def test_shuffled_stream_reads_each_row_once_per_epoch_in_a_new_order(tmp_path):
    files = shards(tmp_path, [37, 50, 24])
    B, T, world = 2, 5, 3  # 111 tokens = 22 rows of 5 per epoch (+1 token that starts the next epoch)
    ranks = [TokenStream(files, B, T, rank=r, world=world, seed=7) for r in range(world)]
    x, y = read_all(ranks, 8)  # 8 x 3 x 2 = 48 rows: two epochs and 4 rows
    assert np.array_equal(x, (x[:, :1] + np.arange(T)) % 111)  # each row is a contiguous run
    assert np.array_equal(y, (x + 1) % 111)
    epochs = [x[:22, 0], x[22:44, 0]]
    for e, starts in enumerate(epochs):  # epoch e: the 22 rows after the previous epoch, each once
        assert sorted(starts) == sorted((e * 110 + 5 * j) % 111 for j in range(22))
    orders = [(starts - e * 110) % 111 // 5 for e, starts in enumerate(epochs)]  # row j of the epoch
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], np.arange(22))
    # the position is one integer (rows read); a fresh stream set to it continues exactly
    s = ranks[1].state()
    assert s == {"epoch": 2, "row": 4, "rows_per_epoch": 22}
    again = TokenStream(files, B, T, rank=1, world=world, seed=7)
    again.load_state(s)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), ranks[1].next_batch()))
    # evaluation batches are fixed rows spread over the whole stream, whatever the training position:
    # 2 batches x 2 rows of the 22 are rows 0, 5, 11, 16 (j * 22 // 4), so batch 1 is rows 11 and 16
    assert torch.equal(ranks[0].eval_batch(1, 2)[0], torch.tensor([list(range(55, 60)), list(range(80, 85))]))
    assert torch.equal(ranks[2].eval_batch(0, 2)[0], torch.tensor([list(range(0, 5)), list(range(25, 30))]))


def test_learning_rate_schedule():
    lrs = [get_lr(it, 10, 100, 1.0, 0.1) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warmup
    assert lrs[10] == 1.0 and lrs[55] == pytest.approx(0.55)  # cosine: peak, then halfway
    assert lrs[100] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_config_and_data_errors_are_one_line(workdir, tmp_path):
    line = error_line(train(workdir, "--batch_sise=3", check=False))
    assert "unknown config key 'batch_sise'" in line and "batch_size" in line
    line = error_line(train(workdir, "--batch_size=abc", check=False))
    assert "'batch_size' expects int" in line and "'abc'" in line
    line = error_line(train(workdir, "--n_layer=2.5", check=False))  # a preset override: checked too
    assert "'n_layer' expects int" in line
    line = error_line(train(workdir, str(tmp_path / "nope.py"), check=False))
    assert "cannot read config file" in line and "nope.py" in line
    p = subprocess.run([sys.executable, TRAIN, *TINY, "--gradient_accumulation_steps=3"], cwd=workdir,
                       env={**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, capture_output=True, text=True)
    assert "gradient_accumulation_steps=3 must be divisible by the number of processes (2)" in error_line(p)
    line = error_line(train(tmp_path, check=False))  # no data/ here
    assert "python prepare.py --dataset=tiny" in line
    os.makedirs(tmp_path / "data/tiny")
    for f in ("tokenizer.bpe", "tiny_val_000000.bin", "tiny_train_000001.bin"):
        data = (workdir / "data/tiny" / f).read_bytes()
        (tmp_path / "data/tiny" / f).write_bytes(data[:-7] if "train" in f else data)  # truncate a shard
    line = error_line(train(tmp_path, check=False))
    assert "tiny_train_000001.bin" in line and "truncated" in line


KILL_DURING_SECOND_SAVE = """
import os, runpy, signal, sys
real_replace, saves = os.replace, []
def replace(src, dst):
    if os.path.basename(dst).startswith("ckpt_"):
        saves.append(dst)
        if len(saves) == 2:  # half-written temp file, then the process dies before the rename
            os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
sys.path.insert(0, os.path.dirname(sys.argv[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_save_keeps_previous_checkpoint(workdir, tmp_path):
    hook = tmp_path / "kill_on_save.py"
    hook.write_text(KILL_DURING_SECOND_SAVE)
    p = train(workdir, "--out_dir=out-kill", "--max_iters=6", "--eval_interval=3", check=False,
              cmd=(sys.executable, str(hook), TRAIN))
    assert p.returncode == -signal.SIGKILL
    out = workdir / "out-kill"
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == ["best.pt", "ckpt_000000.pt"]
    assert load(out / "ckpt_000000.pt")["iter_num"] == 0  # intact; the torn file is only a .tmp
    p = train(workdir, "--out_dir=out-kill", "--max_iters=6", "--eval_interval=3", "--init_from=resume")
    assert "resumed from" in p.stdout and load(out / "ckpt_000006.pt")["iter_num"] == 6


FAKE_CLOCK = """
import os, sys
root = os.path.dirname(sys.argv[1])
sys.path[:0] = [root, os.path.join(root, "tests")]
import train
from conftest import fake_clock
fake_clock(train, {"training.get_lr": 1.0, "evaluate": 100.0})  # get_lr runs once a step: a step takes 1 s
sys.argv = sys.argv[1:]
train.run(train.main)
"""


def test_step_time_leaves_out_evaluations_between_log_lines(workdir, tmp_path):
    """On a clock where a step takes 1 s and an evaluation 100 s, every log line says 1000 ms per step,
    also when an evaluation falls between two log lines (eval_interval 3, log_interval 2), and the ETA
    is the remaining steps at 1 s each."""
    hook = tmp_path / "fake_clock.py"
    hook.write_text(FAKE_CLOCK)
    p = train(workdir, "--out_dir=out-clock", "--max_iters=8", "--eval_interval=3", "--log_interval=2",
              cmd=(sys.executable, str(hook), TRAIN))
    steps = [r for r in records(workdir / "out-clock") if "ms_per_step" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert [r["ms_per_step"] for r in steps] == [1000.0] * 4
    etas = [line.split(" | eta ")[1] for line in p.stdout.splitlines() if line.startswith("step ")]
    assert etas == ["0m06s", "0m04s", "0m02s", "0m00s"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(workdir):
    p = train(workdir, "--out_dir=out-nan", "--max_iters=50", "--eval_interval=25", "--learning_rate=1e30",
              "--warmup_iters=0", check=False)
    line = error_line(p)
    assert "the training loss is nan" in line or "the training loss is inf" in line
    assert "ckpt_000000.pt" in line and "learning_rate" in line
    ckpt = load(workdir / "out-nan/ckpt_000000.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert sorted(os.listdir(workdir / "out-nan")) == ["best.pt", "ckpt_000000.pt", "log.jsonl"]


def test_sigterm_saves_and_exits_cleanly(workdir):
    out = workdir / "out-term"
    p = subprocess.Popen([sys.executable, TRAIN, *TINY, f"--out_dir={out}", "--max_iters=100000",
                          "--eval_interval=100000"], cwd=workdir, env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len(step_losses(out)) < 3:
        assert time.time() < deadline and p.poll() is None, "training did not start"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "received SIGTERM" in stdout
    last = max(step_losses(out))
    assert load(out / f"ckpt_{last:06d}.pt")["iter_num"] == last >= 3  # saved the step it stopped at


def test_finetune_from_local_hf_dir_with_early_stopping(workdir, tmp_path):
    """init_from=<a save_pretrained directory> loads GPT-2-format weights; with learning_rate 0 the val
    loss never improves, so patience=1 ends the run at the second evaluation. The weights come through
    checkpoint.open_model, as every script's --model does: a directory whose tokenizer is not the
    data's is refused, and a run directory starts a new run from its weights."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=32,
                                                              n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    line = error_line(train(workdir, "--out_dir=out-ft-x", f"--init_from={tmp_path / 'hf'}", check=False))
    assert "its tokenizer (gpt2) 50257; put the matching tokenizer.bpe beside config.json" in line  # 512 tokens
    shutil.copy(workdir / "data/tiny/tokenizer.bpe", tmp_path / "hf")  # the data's own tokenizer
    p = train(workdir, "--out_dir=out-ft", f"--init_from={tmp_path / 'hf'}", "--learning_rate=0.0",
              "--warmup_iters=0", "--min_lr=0.0", "--patience=1", "--eval_interval=2", "--max_iters=50")
    assert "early stop" in p.stdout
    evals = [r for r in records(workdir / "out-ft") if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["val_loss"] == evals[1]["val_loss"]
    best = load(workdir / "out-ft/best.pt")
    assert best["iter_num"] == 0 and best["model_args"]["block_size"] == 64
    assert torch.equal(best["model"]["transformer.wpe.weight"], hf.transformer.wpe.weight.detach())
    train(workdir, "--out_dir=out-ft-run", "--init_from=out-ft", "--max_iters=0")  # a run's best.pt, step 0 again
    start = load(workdir / "out-ft-run/ckpt_000000.pt")
    assert start["config"]["init_from"] == "out-ft" and all(torch.equal(w, best["model"][k])
                                                            for k, w in start["model"].items())
    import quantize  # a quantized copy reads like any model, but its int8 weights cannot train
    model, tok, _ = checkpoint.load_model(str(workdir / "out-ft"))
    quantize.save_quantized(quantize.quantize(model, "int8"), str(tmp_path / "q8.pt"), tok)
    line = error_line(train(workdir, "--out_dir=out-ft-x", f"--init_from={tmp_path / 'q8.pt'}", check=False))
    assert "holds int8 weights, which do not train; start from the float checkpoint" in line
    assert not (workdir / "out-ft-x").exists()


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_ddp_evaluation_with_fewer_batches_than_ranks_does_not_hang(workdir):
    """eval_iters=1 on 2 ranks: rank 1 has no eval batch. The modern preset has buffers (RoPE tables),
    which DDP would broadcast at the start of every forward; rank 0's eval forward then waited for a
    rank that was already in the all_reduce, and the run hung."""
    p = subprocess.run([*TORCHRUN, TRAIN, *TINY, "--preset=modern", "--out_dir=out-ddp-eval", "--eval_iters=1",
                        "--max_iters=2", "--eval_interval=1", "--gradient_accumulation_steps=2"],
                       cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in records(workdir / "out-ddp-eval") if "val_loss" in r] == [0, 1, 2]


def test_resume_in_float16_from_a_float32_checkpoint(workdir):
    """A float32 run saves an empty GradScaler state; resuming it with dtype=float16 (which turns the
    scaler on) must start a fresh scaler, not fail on the empty state."""
    train(workdir, "--out_dir=out-fp16", "--max_iters=2", "--eval_interval=2")
    p = train(workdir, "--out_dir=out-fp16", "--max_iters=4", "--eval_interval=2", "--init_from=resume",
              "--dtype=float16")
    assert "resumed from" in p.stdout and "step 4/4" in p.stdout
    assert load(workdir / "out-fp16/ckpt_000004.pt")["scaler"]["scale"] > 0  # a live scaler was saved


def test_resume_takes_optimizer_settings_from_the_config_and_says_so(workdir):
    train(workdir, "--out_dir=out-opt", "--max_iters=2", "--eval_interval=2")
    p = train(workdir, "--out_dir=out-opt", "--max_iters=3", "--eval_interval=3", "--init_from=resume",
              "--weight_decay=0.0", "--beta2=0.9", "--eps=1e-6")
    assert ("optimizer settings from the config, not the checkpoint: betas (0.9, 0.95) -> (0.9, 0.9), "
            "eps 1e-08 -> 1e-06, weight_decay 0.1 -> 0.0") in p.stdout
    groups = load(workdir / "out-opt/ckpt_000003.pt")["optimizer"]["param_groups"]
    assert [(tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in groups] == [((0.9, 0.9), 1e-6, 0.0)] * 2
    again = train(workdir, "--out_dir=out-opt", "--max_iters=4", "--eval_interval=4", "--init_from=resume",
                  "--weight_decay=0.0", "--beta2=0.9", "--eps=1e-6")
    assert "optimizer settings from the config" not in again.stdout  # nothing changed, nothing said


def wait_for(path, p, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline and p.poll() is None, "training did not start"
        time.sleep(0.1)


def test_sigterm_delivered_twice_still_saves(workdir):
    """Under SLURM a worker can get SIGTERM from the scheduler and again from torchrun: the second must
    not turn into an unsaved exit (only a second Ctrl-C stops at once)."""
    out = workdir / "out-term2"
    p = subprocess.Popen([sys.executable, TRAIN, *TINY, f"--out_dir={out}", "--max_iters=100000",
                          "--eval_interval=100000"], cwd=workdir, env=ENV, stdout=subprocess.PIPE, text=True)
    wait_for(out / "ckpt_000000.pt", p)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # two deliveries, not one: signals sent back to back reach Python's handler once
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "received SIGTERM" in stdout
    last = max(int(f[5:11]) for f in os.listdir(out) if f.startswith("ckpt_"))
    assert last > 0 and load(out / f"ckpt_{last:06d}.pt")["iter_num"] == last


def test_ddp_ranks_stop_together_at_once_not_at_the_next_log_step(workdir):
    """torchrun forwards SIGTERM to its workers and kills them 30 s later. With log_interval=100000 the
    ranks would only agree to stop at step 100000; they vote every step, so they save within a step."""
    out = workdir / "out-ddp-term"
    p = subprocess.Popen([*TORCHRUN, TRAIN, *TINY, f"--out_dir={out}", "--max_iters=100000",
                          "--eval_interval=100000", "--log_interval=100000"], cwd=workdir, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "ckpt_000000.pt", p)
    time.sleep(1)  # a few steps (not needed for the assertions, which hold for any step)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert "received SIGTERM" in stdout, stderr[-2000:]
    saved = [f for f in os.listdir(out) if f.startswith("ckpt_") and f != "ckpt_000000.pt"]
    assert len(saved) == 1 and 0 < load(out / saved[0])["iter_num"] < 100000
    assert len(load(out / saved[0])["rng"]) == 2  # both ranks took part in the save


PER_RANK_DIR = """
import os, runpy, sys
os.chdir(os.environ["RANK"])  # each rank in its own folder: as if each node had its own disk
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ranks_on_separate_disks_are_caught(workdir, tmp_path):
    """Multi-node without a shared filesystem: a rank whose data/ differs, or that sees other checkpoints
    than rank 0 (it cannot see the one rank 0 resumes from, or rank 0 would start afresh beside a run),
    stops the run with one line instead of training on other data."""
    (tmp_path / "per_rank.py").write_text(PER_RANK_DIR)
    for r in ("0", "1"):
        shutil.copytree(workdir / "data", tmp_path / r / "data")
    shard = tmp_path / "1" / "data" / "tiny" / "tiny_train_000001.bin"
    write_shard(str(shard), read_shard(str(shard))[:-1000])  # rank 1's copy is shorter
    cmd = [*TORCHRUN, str(tmp_path / "per_rank.py"), TRAIN, *TINY, "--max_iters=2", "--eval_interval=2"]
    p = subprocess.run([*cmd, "--out_dir=out"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "error: rank 1 has" in p.stderr and "every node needs the same data/tiny/" in p.stderr
    shutil.copy(tmp_path / "0" / "data" / "tiny" / "tiny_train_000001.bin", shard)
    train(tmp_path / "0", "--out_dir=out", "--max_iters=2", "--eval_interval=2")  # a run on node 0's disk only
    p = subprocess.run([*cmd, "--out_dir=out", "--init_from=resume", "--max_iters=4"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "error: rank 1 cannot see out/ckpt_000002.pt, which rank 0 sees" in p.stderr, \
        p.stderr[-2000:]
    # init_from=auto with rank 0 on the node without the checkpoints: refused, not a silent fresh start
    shutil.move(tmp_path / "0" / "out", tmp_path / "1" / "out")
    p = subprocess.run([*cmd, "--out_dir=out", "--init_from=auto", "--max_iters=4"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and [line for line in p.stderr.splitlines() if "error:" in line] == [
        "error: rank 1 sees out/ckpt_000002.pt, which rank 0 cannot see: out_dir must be on a filesystem every "
        "node shares"], p.stderr[-2000:]
    assert not (tmp_path / "0" / "out").exists()


def test_muon_resume_is_exact_bit_for_bit(workdir):
    """optimizer=muon: Muon for the blocks' matrices, AdamW for the rest; both states travel in the
    checkpoint, so 3 + resume + 3 steps equal 6 steps to the last bit."""
    common = ["--optimizer=muon", "--dropout=0.1", "--eval_interval=3", "--lr_decay_iters=6"]
    p = train(workdir, "--out_dir=out-muon-full", "--max_iters=6", *common)
    assert "optimizer Muon: 8 tensors" in p.stdout and "optimizer AdamW" in p.stdout
    train(workdir, "--out_dir=out-muon-half", "--max_iters=3", *common)
    train(workdir, "--out_dir=out-muon-half", "--max_iters=6", "--init_from=resume", *common)
    full, half = step_losses(workdir / "out-muon-full"), step_losses(workdir / "out-muon-half")
    assert list(full) == list(range(1, 7)) and full == half
    assert full[6] < full[1]  # and it trains
    a, b = load(workdir / "out-muon-full/ckpt_000006.pt"), load(workdir / "out-muon-half/ckpt_000006.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any("momentum_buffer" in s for s in a["optimizer"]["state"].values())  # Muon's state is saved


def test_modded_switches_train_and_are_kept_on_resume(workdir):
    """--mlp/--qk_norm/--logit_softcap/--zero_init reach the model, travel in the checkpoint's model_args
    (so sample.py, eval.py and serve.py rebuild the same model), and a resume that contradicts them is refused."""
    flags = ["--mlp=relu2", "--qk_norm=True", "--logit_softcap=30", "--zero_init=True", "--eval_interval=4",
             "--tie_weights=False", "--embedding_lr_scale=10"]
    train(workdir, "--out_dir=out-modded", "--max_iters=4", *flags)
    ckpt = load(workdir / "out-modded/ckpt_000004.pt")
    args, groups = ckpt["model_args"], ckpt["optimizer"]["param_groups"]
    # the schedule scales every group's lr: the untied embedding's stays 10x the others', step by step
    assert [g["lr"] / groups[0]["lr"] for g in groups] == pytest.approx([1, 1, 10])
    assert groups[2]["params"] == ["transformer.wte.weight"]
    assert (args["mlp"], args["qk_norm"], args["logit_softcap"], args["zero_init"]) == ("relu2", True, 30, True)
    losses = step_losses(workdir / "out-modded")
    assert losses[4] < losses[1]
    p = train(workdir, "--out_dir=out-modded", "--max_iters=8", "--init_from=resume", "--qk_norm=False", check=False)
    assert error_line(p) == ("error: qk_norm=False but the checkpoint out-modded/ckpt_000004.pt has qk_norm=True; "
                             "a resumed run keeps its shape: drop --qk_norm, or start a new --out_dir")
    p = train(workdir, "--out_dir=out-tied-scaled", "--max_iters=1", "--embedding_lr_scale=10", check=False)
    assert error_line(p).startswith("error: embedding_lr_scale=10.0 needs an untied head (tie_weights=False)")


def test_distillation_loss_is_hintons():
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, computed here from the definitions."""
    from distill import distill_loss
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    y = torch.tensor([[1, 2, -1], [0, -1, 6]])
    T, alpha = 2.0, 0.3
    kl, ce, n = 0.0, 0.0, 0
    for b in range(2):
        for i in range(3):
            if y[b, i] < 0:
                continue
            p, q = torch.softmax(t[b, i] / T, 0), torch.softmax(s[b, i] / T, 0)
            kl += float((p * (p.log() - q.log())).sum())
            ce += -float(torch.log_softmax(s[b, i], 0)[y[b, i]])
            n += 1
    expected = alpha * T * T * kl / n + (1 - alpha) * ce / n
    assert distill_loss(s, t, y, alpha, T).item() == pytest.approx(expected, rel=1e-6)
    assert distill_loss(s, s, y, 1.0, T).item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher


def distill_loss_written_out(logits, teacher_logits, targets, alpha, temperature):
    """The definition as the loss was first written, with log_softmax, kl_div and autograd."""
    import torch.nn.functional as F
    V = logits.size(-1)
    scored = targets.flatten() != -1
    student = F.log_softmax(logits.float().view(-1, V)[scored] / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().view(-1, V)[scored] / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(logits.float().view(-1, V), targets.flatten(), ignore_index=-1)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def test_chunked_distillation_equals_the_written_out_loss_and_its_gradient():
    """Over several chunks (2**22 // V rows each) with unscored rows: the same loss and the same gradient
    with respect to the student's logits as autograd through the written-out definition; with
    reuse_teacher (step_loss's way) the same gradient again, written over the teacher's logits."""
    from distill import distill_loss
    torch.manual_seed(0)
    B, T, V = 3, 700, 4096  # 2,100 rows: chunks of 1,024, the last one short
    s, t = (3 * torch.randn(B, T, V, dtype=torch.float64)).float(), 3 * torch.randn(B, T, V)
    y = torch.randint(0, V, (B, T))
    y[0, :50] = y[2, -7:] = -1
    for alpha, temp in ((0.5, 2.0), (0.9, 1.0), (0.0, 3.0)):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        ours, ref = distill_loss(a, t, y, alpha, temp), distill_loss_written_out(b, t, y, alpha, temp)
        (2.5 * ours).backward()
        (2.5 * ref).backward()
        assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item()) and ref.item() > 1
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)
        assert a.grad[0, :50].abs().max() == 0 and a.grad[1].abs().max() > 0  # unscored rows get none
        c, spent = s.clone().requires_grad_(), t.clone()
        (2.5 * distill_loss(c, spent, y, alpha, temp, reuse_teacher=True)).backward()
        assert torch.equal(c.grad, a.grad) and torch.equal(spent, c.grad)  # computed in the teacher's storage


def tensor_peak(fn):
    """The most bytes torch's tensors hold at once while fn() runs, above what they held before: the running
    sum of the allocations and frees torch's allocator reports to the profiler. Unlike the process's peak
    RSS, it does not depend on what the allocator beneath kept from earlier work or on the machine's load."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()  # negative for a free
        peak = max(peak, now)
    return peak


def test_distillation_adds_little_memory_over_cross_entropy():
    """One micro-step at batch 32, T 256, a 4,096-token vocabulary (one float32 (B, T, V) tensor is
    134 MB): the peak tensor memory distillation adds is at most 1.35x what cross-entropy adds (it is
    0.88x: two (B, T, V) tensors against cross-entropy's three; written out with log_softmax and kl_div
    it was 2.27x)."""
    from distill import step_loss
    from model import GPT, GPTConfig
    config = GPTConfig.preset("gpt2", vocab_size=4096, n_layer=1, n_head=2, n_embd=32, block_size=256, dropout=0.0)
    torch.manual_seed(0)
    student, teacher = GPT(config), GPT(config).eval().requires_grad_(False)
    x, y = torch.randint(0, 4096, (2, 32, 256))
    added = {}
    for mode in ("plain", "distil"):
        student.zero_grad()  # each step allocates its own parameter gradients
        added[mode] = tensor_peak(lambda: step_loss(student, teacher if mode == "distil" else None, x, y).backward())
    one = 32 * 256 * 4096 * 4
    assert added["plain"] > 2 * one, added  # the measurement sees the logits
    assert added["distil"] <= 1.35 * added["plain"], (added, added["distil"] / added["plain"])


def test_distillation_trains_from_a_teacher_run_and_refuses_another_tokenizer(workdir, tmp_path):
    train(workdir, "--out_dir=out-teacher", "--max_iters=4", "--eval_interval=4", "--n_embd=64", "--n_head=4")
    p = train(workdir, "--out_dir=out-student", "--max_iters=4", "--eval_interval=4",
              "--teacher=out-teacher", "--distill_alpha=0.5", "--distill_temperature=2.0")
    assert "distilling from out-teacher/best.pt (step 4)" in p.stdout
    assert step_losses(workdir / "out-student")[4] < step_losses(workdir / "out-student")[1]
    transformers = pytest.importorskip("transformers")  # a teacher with GPT-2's tokenizer: refused
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=32)
                                 ).save_pretrained(tmp_path / "gpt2-like")
    line = error_line(train(workdir, "--out_dir=out-student2", f"--teacher={tmp_path / 'gpt2-like'}", check=False))
    assert "uses the gpt2 tokenizer, not this run's data/tiny/tokenizer.bpe" in line
    assert not (workdir / "out-student2").exists()


def test_fsdp_matches_ddp_and_resumes_exactly(workdir):
    """FSDP2 on 2 CPU processes (gloo): the same losses as DDP over 20 steps, checkpoints in the one
    format (full weights, gathered on rank 0), and 10 + resume + 10 steps equal to 20."""
    args = ["--max_iters=20", "--eval_interval=10", "--gradient_accumulation_steps=4", "--lr_decay_iters=20"]
    for par in ("ddp", "fsdp"):
        train(workdir, f"--out_dir=out-par-{par}", f"--parallel={par}", *args, cmd=(*TORCHRUN, TRAIN))
    ddp, fsdp = step_losses(workdir / "out-par-ddp"), step_losses(workdir / "out-par-fsdp")
    assert list(ddp) == list(fsdp) == list(range(1, 21))
    assert max(abs(ddp[s] - fsdp[s]) for s in ddp) < 1e-5 and fsdp[20] < fsdp[1] - 0.3
    ckpt = load(workdir / "out-par-fsdp/ckpt_000020.pt")
    assert ckpt["model"]["transformer.wte.weight"].shape == (512, 32)  # whole tensors, not shards
    train(workdir, "--out_dir=out-par-half", "--parallel=fsdp", *args[1:], "--max_iters=10", cmd=(*TORCHRUN, TRAIN))
    train(workdir, "--out_dir=out-par-half", "--parallel=fsdp", *args, "--init_from=resume", cmd=(*TORCHRUN, TRAIN))
    assert step_losses(workdir / "out-par-half") == fsdp
    p = train(workdir, "--out_dir=out-par-x", "--parallel=fsdp", "--optimizer=muon", check=False)
    assert "Muon needs each matrix whole" in error_line(p)


def test_resume_with_another_tokenizer_names_the_dataset_to_use(workdir, tmp_path):
    """A run resumed on a dataset whose tokenizer is not the checkpoint's: one line that names the
    dataset the run was trained on."""
    shutil.copytree(workdir / "data", tmp_path / "data")
    train(tmp_path, "--max_iters=2", "--eval_interval=2", "--out_dir=out")
    shutil.copytree(tmp_path / "data" / "tiny", tmp_path / "data" / "other")
    import textwrap  # noqa: E401  another text, the same vocabulary size: another tokenizer
    Tokenizer.train([open(textwrap.__file__).read()], 512).save(str(tmp_path / "data" / "other" / "tokenizer.bpe"))
    line = error_line(train(tmp_path, "--max_iters=4", "--out_dir=out", "--init_from=resume", "--dataset=other",
                            check=False))
    assert "differs from the tokenizer out/ckpt_000002.pt was trained with; resume with --dataset=tiny" in line
