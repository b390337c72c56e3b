"""train.py, run for real at tiny sizes on CPU: the loss falls, resume is exact, DDP matches one process,
the data stream neither drops nor repeats tokens, and crashes, signals, NaNs and typos end cleanly."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
sys.path.insert(0, ROOT)

from bpe import Tokenizer  # noqa: E402
from prepare import read_shard, write_shard  # noqa: E402
from train import TokenStream, get_lr  # noqa: E402

# a 2-layer, 32-wide model on 32-token rows: a step takes milliseconds
TINY = ["--dataset=tiny", "--preset=gpt2", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=3e-3", "--warmup_iters=2", "--min_lr=3e-4", "--dropout=0.0", "--device=cpu",
        "--dtype=float32", "--compile=False"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 2 shared cores: 1 thread each


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding data/tiny/: ~270 KB of stdlib source prepared by prepare.py with a
    512-token BPE it trains itself (the same path a user's --input corpus takes)."""
    import argparse, inspect, json as json_mod, textwrap  # noqa: E401  real text nobody here wrote
    d = tmp_path_factory.mktemp("train")
    (d / "corpus").mkdir()
    for m in (argparse, inspect, json_mod.decoder, json_mod.encoder, textwrap):
        (d / "corpus" / (m.__name__ + ".txt")).write_text(open(m.__file__).read())
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--input=corpus/*.txt", "--name=tiny",
                    "--tokenizer=train", "--vocab_size=512", "--separator=\ndef "],
                   cwd=d, env=ENV, check=True, capture_output=True)
    return d


def train(cwd, *args, check=True, cmd=(sys.executable, TRAIN)):
    p = subprocess.run([*cmd, *TINY, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


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
    # bits per byte = nats/token / ln 2 * tokens / bytes, over the targets of the first 4 val batches
    tok = Tokenizer.load(str(workdir / "data/tiny/tokenizer.bpe"))
    val = read_shard(str(workdir / "data/tiny/tiny_val_000000.bin"))
    nbytes = 0
    for k in range(4):
        targets = val[k * 128 + 1:(k + 1) * 128 + 1]  # batch k: 4 rows x 32 tokens, shifted by one
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
    # evaluation batches are fixed: the first rows in file order, whatever the training position
    assert torch.equal(ranks[0].eval_batch(1)[0], torch.arange(10, 20).view(2, 5))


def test_learning_rate_schedule():
    lrs = [get_lr(it, 10, 100, 1.0, 0.1) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warmup
    assert lrs[10] == 1.0 and lrs[55] == pytest.approx(0.55)  # cosine: peak, then halfway
    assert lrs[100] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def error_line(p):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    return p.stderr.strip().splitlines()[-1]


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
    loss never improves, so patience=1 ends the run at the second evaluation."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=32,
                                                              n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    p = train(workdir, "--out_dir=out-ft", f"--init_from={tmp_path / 'hf'}", "--learning_rate=0.0",
              "--warmup_iters=0", "--min_lr=0.0", "--patience=1", "--eval_interval=2", "--max_iters=50")
    assert "early stop" in p.stdout
    evals = [r for r in records(workdir / "out-ft") if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["val_loss"] == evals[1]["val_loss"]
    best = load(workdir / "out-ft/best.pt")
    assert best["iter_num"] == 0 and best["model_args"]["block_size"] == 64
    assert torch.equal(best["model"]["transformer.wpe.weight"], hf.transformer.wpe.weight.detach())
