"""Shared by every test: the repository's top level is importable (model, bpe, checkpoint, ...) however
pytest is started (`pytest tests/test_config.py`, `python -m pytest`, from any directory); a tiny
prepared dataset, and helpers to run the scripts as a user does."""
import importlib
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TRAIN = os.path.join(ROOT, "train.py")

# a 2-layer, 32-wide model on 32-token rows: a step takes milliseconds
TINY = ["--dataset=tiny", "--preset=gpt2", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=3e-3", "--warmup_iters=2", "--min_lr=3e-4", "--dropout=0.0", "--device=cpu",
        "--dtype=float32", "--compile=False"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 2 shared cores: 1 thread each


@pytest.fixture(scope="session")
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



def error_line(p):
    """The one line a failed script printed (asserting there was no traceback and nothing else)."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def fake_clock(module, seconds, set=setattr):
    """Give module (a script) a clock, module.time.time(), that stands still except when one of the
    functions named in seconds runs: then it moves on by that many seconds. A name is the script's own
    function, or "library.function" for one the script calls from a library module. set: how to
    replace them (pytest's monkeypatch.setattr undoes it after the test)."""
    now = [0.0]

    def taking(s, f):
        def timed(*args, **kwargs):
            now[0] += s
            return f(*args, **kwargs)
        return timed
    set(module, "time", types.SimpleNamespace(time=lambda: now[0]))
    for name, s in seconds.items():
        library, _, function = name.rpartition(".")
        owner = importlib.import_module(library) if library else module
        set(owner, function, taking(s, getattr(owner, function)))
