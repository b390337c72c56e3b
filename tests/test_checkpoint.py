"""checkpoint.py: every checkpoint loads with weights_only=True (nothing in it can run code), one that
carries code is refused in one line, the RNG states round-trip, and loading maps the file rather than
reading it into memory."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
from conftest import ROOT


def test_rng_states_are_plain_values_and_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached Gaussian: part of NumPy's state too
    saved = checkpoint.rng_state("cpu")
    torch.save({"rng": saved}, tmp_path / "r.pt")
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)["rng"]  # plain values only: no pickle
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(loaded, "cpu")
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_a_training_checkpoint_loads_with_weights_only(workdir):
    from conftest import train
    train(workdir, "--out_dir=out-safe", "--max_iters=2", "--eval_interval=2", "--dropout=0.1")
    path = workdir / "out-safe" / "ckpt_000002.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)  # what a user's own torch.load does
    assert state["version"] == checkpoint.VERSION and state["iter_num"] == 2
    model, tok, where = checkpoint.load_model(str(workdir / "out-safe"), "last")
    assert where.endswith("ckpt_000002.pt (step 2)") and not model.training
    assert tok.dumps() == state["tokenizer"]


class Payload:
    def __reduce__(self):
        return os.system, ("echo ran > ran.txt",)


def test_a_checkpoint_that_carries_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"version": checkpoint.VERSION, "model": {}, "x": Payload()}, "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: refused: it holds pickled Python objects"):
        checkpoint.load("evil.pt")
    assert not os.path.exists("ran.txt")
    torch.save({"version": 1}, "old.pt")
    with pytest.raises(ValueError, match="old.pt is checkpoint version 1, this code reads version 2"):
        checkpoint.load("old.pt")
    open("junk.pt", "wb").write(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read checkpoint junk.pt"):
        checkpoint.load("junk.pt")


MEASURE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import checkpoint
def rss_mb():  # resident now (not the peak: a forked child's peak starts at its parent's)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
before = rss_mb()
state = checkpoint.load(sys.argv[2])
print(rss_mb() - before)
"""


def test_loading_maps_the_file_instead_of_reading_it(tmp_path):
    """Eight ranks resuming a large run each load the whole checkpoint: mapped, they share the page
    cache and touch only what they use. A 200 MB checkpoint adds far less than 200 MB to the process.
    (Random values: a file of zeros would not show the difference.)"""
    torch.save({"version": checkpoint.VERSION, "big": torch.randn(50_000_000)}, tmp_path / "big.pt")
    grown = int(subprocess.run([sys.executable, "-c", MEASURE, ROOT, str(tmp_path / "big.pt")], check=True,
                               capture_output=True, text=True).stdout)
    assert grown < 50, f"loading grew the process by {grown} MB"
