"""The README's quick start, end to end at a tiny size: its first command's three steps, as written
there (prepare the offline stdlib corpus, train with config/quickstart.py, sample), each with a few
settings appended that make it small. Every artefact a user relies on is checked, and the README's
two commands are the ones CI and a newcomer run."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np

from conftest import ROOT


def run(args, cwd):
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout, p.stderr


def readme_steps():
    """{script: its arguments} of the README's first command, after the lines that set up the venv."""
    block = open(os.path.join(ROOT, "README.md")).read().split("```bash")[1].split("```")[0]
    steps = {}
    for part in block.replace("\\\n", " ").split("&&"):
        words = shlex.split(part)
        if words[0].endswith("python") and words[1].endswith(".py"):
            steps[words[1]] = [os.path.join(ROOT, w) if w.startswith("config/") else w for w in words[2:]]
    return steps


def test_quickstart_end_to_end(tmp_path):
    steps = readme_steps()
    assert list(steps) == ["prepare.py", "train.py", "sample.py"]
    # 1. prepare: the real stdlib corpus with a small vocabulary, so the test stays quick
    run([os.path.join(ROOT, "prepare.py"), *steps["prepare.py"], "--vocab_size=512", "--num_proc=1"], tmp_path)
    data = tmp_path / "data" / "stdlib"
    assert {"stdlib_val_000000.bin", "stdlib_train_000001.bin", "tokenizer.bpe", "card.json",
            "README.md"} <= set(os.listdir(data))
    card = json.loads((data / "card.json").read_text())
    assert card["documents"]["kept"] > 500  # the stdlib has hundreds of modules
    from bpe import Tokenizer
    from shards import read_shard
    tok = Tokenizer.load(str(data / "tokenizer.bpe"))
    assert tok.vocab_size == 512
    val = read_shard(str(data / "stdlib_val_000000.bin"))
    assert val[0] == tok.eot_token and "import" in tok.decode(np.asarray(val[:5000]).tolist())

    # 2. train: the quick start's config, a few steps, one evaluation at the end
    out, _ = run([os.path.join(ROOT, "train.py"), *steps["train.py"], "--max_iters=30", "--eval_interval=30",
                  "--eval_iters=2", "--log_interval=10", "--grad_checkpoint=True"], tmp_path)  # the OOM knob, too
    assert "val_bpb" in out
    ckpts = sorted(os.listdir(tmp_path / "out-quickstart"))
    assert "best.pt" in ckpts and "ckpt_000030.pt" in ckpts, ckpts

    # 3. sample: loads the checkpoint and its embedded tokenizer with nothing else to point at
    text, err = run([os.path.join(ROOT, "sample.py"), *steps["sample.py"], "--max_new_tokens=40",
                     "--start=import ", "--seed=1"], tmp_path)
    assert text.startswith("import ") and len(text) > len("import ") + 10
    assert "tokens/s" in err
    again, _ = run([os.path.join(ROOT, "sample.py"), "--model=out-quickstart", "--max_new_tokens=40",
                    "--start=import ", "--seed=1"], tmp_path)
    assert again == text  # same seed, same text

    # a prompt longer than the context is cropped with a warning; a missing run is a one-line error
    (tmp_path / "long.txt").write_text("x = 1\n" * 300)
    text, err = run([os.path.join(ROOT, "sample.py"), "--model=out-quickstart", "--max_new_tokens=5",
                     "--start=FILE:long.txt"], tmp_path)
    assert "warning: the prompt is" in err and "keeping its last 127 tokens" in err
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model=nope"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "error: no model at 'nope': --model takes a run directory (train one first: python train.py ...), a "
        "checkpoint file, a Hugging Face directory or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"]
    import torch
    torch.save({"version": 99}, tmp_path / "old.pt")  # a checkpoint of another layout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model=old.pt"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "old.pt is checkpoint version 99, this code reads version 2" in p.stderr


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:3]]
    assert "prepare.py --dataset=stdlib" in blocks[0] and "config/quickstart.py" in blocks[0]
    assert "sample.py" in blocks[0]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert blocks[1] in ci  # CI runs exactly the README's test command
    assert "pytest" in blocks[1]
