"""Hostile input to train.py and sample.py, as a new user would type it: each case must end as one line
`error: ...` on stderr naming the problem and the fix, with exit status 1, no traceback, nothing on
stdout, and no file created or changed (nothing half-written). prepare.py's cases are in test_prepare.py.
Then the misleading-but-successful cases: a finished run, a re-run quick start, a bare checkpoint name."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, TINY, error_line, train


@pytest.fixture(scope="module")
def run_dir(workdir):
    """out-base/: 4 steps of a tiny gpt2 model, one checkpoint at step 4 (best.pt too)."""
    if not (workdir / "out-base" / "ckpt_000004.pt").exists():
        train(workdir, "--out_dir=out-base", "--max_iters=4", "--eval_interval=4")
    return workdir / "out-base"


def snapshot(d):
    """Every file under d with its size and modification time: any write shows up."""
    return {os.path.join(r, f): (os.stat(os.path.join(r, f)).st_size, os.stat(os.path.join(r, f)).st_mtime_ns)
            for r, _, fs in os.walk(d) for f in fs}


def script(name, *args, cwd, env=None, prefix=()):
    return subprocess.run([*prefix, sys.executable, os.path.join(ROOT, name), *args], cwd=cwd,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


class Evil:  # what a malicious checkpoint carries: unpickling it would run a command
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def setup_cases(d):
    """Files the cases below point at, made once."""
    (d / "a_file").write_text("not a folder\n")
    hf = d / "llama_dir"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (d / "nohf").mkdir(exist_ok=True)
    (d / "nohf" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, '
                                            '"n_positions": 8, "vocab_size": 10}')
    torch.save({"version": 2, "model": Evil()}, d / "evil.pt")
    bad = d / "data" / "badtok"
    bad.mkdir(parents=True, exist_ok=True)
    for f in os.listdir(d / "data" / "tiny"):
        if f.endswith(".bin"):
            shutil.copy(d / "data" / "tiny" / f, bad / f.replace("tiny", "badtok"))
    (bad / "tokenizer.bpe").write_text("")  # empty: an interrupted copy
    half = d / "data" / "half"  # an interrupted prepare.py of a local corpus: the command, no shards
    half.mkdir(parents=True, exist_ok=True)
    (half / "command.txt").write_text("python prepare.py --input=corpus/*.txt --name=half\n")


# a hub that refuses connections, as an offline machine's does (never a faked download)
REFUSING_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
# (script, flags, extra env, what the one line must say)
CASES = [
    ("sample.py", ["--model=out-base", "--temperature=-1"], {}, "need temperature >= 0"),
    ("sample.py", ["--model=out-base", "--top_k=0"], {}, "top_k None or an int >= 1"),
    ("sample.py", ["--model=out-base", "--top_p=1.5"], {}, "top_p None or in (0, 1]"),
    ("sample.py", ["--model=out-base", "--max_new_tokens=0"], {}, "max_new_tokens=0 must be at least 1"),
    ("sample.py", ["--model=gpt2"], {"HF_HUB_OFFLINE": "1"}, "could not download gpt2"),
    ("sample.py", ["--model=gpt2"], REFUSING_HUB, "could not download gpt2"),
    ("finetune.py", ["--data=a_file", "--device=cpu"], REFUSING_HUB, "model='gpt2': could not download gpt2"),
    ("sample.py", ["--model=a_file"], {}, "cannot read checkpoint a_file: it is not a checkpoint, not a file torch.save wrote"),
    ("sample.py", ["--model=llama_dir"], {}, "holds a llama model; only GPT-2"),
    ("sample.py", ["--model=nohf"], {}, "no model.safetensors or pytorch_model.bin in nohf"),
    ("sample.py", ["--model=out-base", "--ckpt=ckpt_999999.pt"], {}, "checkpoint ckpt_999999.pt is neither in out-base/"),
    ("sample.py", ["--model=evil.pt"], {}, "evil.pt: refused: it holds pickled Python objects"),
    ("sample.py", ["--model=nope"], {}, "no model at 'nope'"),
    ("train.py", [*TINY, "--out_dir=a_file"], {}, "a_file; a file stands where a folder is needed"),
    ("train.py", [*TINY, "--out_dir=a_file/run"], {}, "a_file/run; a file stands where a folder is needed"),
    ("train.py", [*TINY, "--dataset=badtok", "--out_dir=out-x"], {},
     "data/badtok/tokenizer.bpe: not a bpe.py tokenizer file (first line ''); re-run: python prepare.py --dataset=badtok"),
    ("train.py", [*TINY, "--dataset=half", "--out_dir=out-x"], {},
     "lacks train shards, val shards or tokenizer.bpe; run: python prepare.py --input=corpus/*.txt --name=half"),
    ("train.py", [*TINY, "--out_dir=out-base", "--init_from=resume", "--n_layer=3", "--max_iters=8"], {},
     "n_layer=3 but the checkpoint out-base/ckpt_000004.pt has n_layer=2; a resumed run keeps its shape"),
    ("train.py", [*TINY, "--out_dir=out-base", "--init_from=resume", "--block_size=16", "--max_iters=8"], {},
     "block_size=16 but the checkpoint out-base/ckpt_000004.pt has block_size=32"),
    ("train.py", [*TINY, "--device=cuda"], {}, "device='cuda' but torch sees no CUDA GPU; use --device=cpu"),
    ("train.py", [*TINY, "--dtype=fp16"], {}, "dtype='fp16' is not one of"),
]


@pytest.mark.parametrize("name, flags, env, message", CASES, ids=[f"{c[0]} {' '.join(c[1][-2:])}" for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(workdir, run_dir, name, flags, env, message):
    setup_cases(workdir)
    before = snapshot(workdir)
    p = script(name, *flags, cwd=workdir, env=env)
    line = error_line(p)
    assert message in line, line
    assert p.stdout == ""  # the settings are checked before anything else happens
    assert snapshot(workdir) == before  # nothing written, nothing half-written
    assert not (workdir / "pwned.txt").exists()


def test_read_only_run_directory_is_one_line(workdir, tmp_path):
    """A folder the user cannot write to. Root writes anywhere, so as root the script runs with the
    capability that overrides permissions dropped (setpriv), as for an ordinary user."""
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = script("train.py", *TINY, f"--out_dir={ro}/run", cwd=workdir, prefix=prefix)
        assert "Permission denied" in error_line(p) and "choose a folder you can write to" in error_line(p)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_finished_run_says_so_and_quickstart_runs_again(workdir, run_dir):
    """Resuming a run that already reached max_iters trains nothing and says why (exit 0), and
    init_from='auto' (the quick start's setting) makes the same command work a second time."""
    before = snapshot(run_dir)
    p = train(workdir, "--out_dir=out-base", "--init_from=resume", "--max_iters=4")
    assert "out-base/ is already at step 4, max_iters=4: nothing to train; raise --max_iters" in p.stdout
    assert snapshot(run_dir) == before
    first = train(workdir, "--out_dir=out-auto", "--init_from=auto", "--max_iters=2", "--eval_interval=2")
    again = train(workdir, "--out_dir=out-auto", "--init_from=auto", "--max_iters=2", "--eval_interval=2")
    assert "eval step 2/2" in first.stdout and "nothing to train" in again.stdout
    more = train(workdir, "--out_dir=out-auto", "--init_from=auto", "--max_iters=4", "--eval_interval=2")
    assert "resumed from out-auto/ckpt_000002.pt at step 2" in more.stdout and "eval step 4/4" in more.stdout


def test_progress_lines_show_the_total_and_an_eta(workdir):
    p = train(workdir, "--out_dir=out-progress", "--max_iters=6", "--eval_interval=6", "--log_interval=3")
    steps = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(" | ")[0] for s in steps] == ["step 3/6", "step 6/6"]
    assert "| eta " in steps[0] and steps[1].endswith("eta 0m00s")
    # one format per number, the same on every line: 4 decimals for losses, lr in e-notation
    assert all(" | loss " in s and " | lr " in s and "e-0" in s.split(" | lr ")[1].split(" | ")[0] for s in steps)


def test_sample_finds_a_bare_checkpoint_name_in_the_run(workdir, run_dir):
    p = script("sample.py", "--model=out-base", "--ckpt=ckpt_000004.pt", "--max_new_tokens=5", cwd=workdir)
    assert p.returncode == 0 and "sampling out-base/ckpt_000004.pt (step 4)" in p.stderr, p.stderr
