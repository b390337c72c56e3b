"""The four scripts that read a model (sample.py, eval.py, export.py, serve.py) take it the same way:
--model=a run directory, a .pt file or a Hugging Face directory, through checkpoint.open_model, which
reads a checkpoint file once. The old flags (--out_dir, --init_from) still work, with one note each."""
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from bpe import Tokenizer
from conftest import ENV, ROOT, error_line
from model import GPT, GPTConfig

READERS = ("sample", "eval", "export", "serve")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: (what --model gets, the description the script prints)} for one tiny random GPT saved as
    a run directory, a .pt file outside it, and a Hugging Face directory exported from it."""
    d = tmp_path_factory.mktemp("readers")
    tok = Tokenizer.train([open(os.path.join(ROOT, "model.py")).read()], 300)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size))
    state = {"version": checkpoint.VERSION, "model": gpt.state_dict(), "tokenizer": tok.dumps(),
             "model_args": dataclasses.asdict(gpt.config), "iter_num": 3, "config": {}}
    (d / "run").mkdir()
    torch.save(state, d / "run" / "ckpt_000003.pt")
    torch.save(state, d / "m.pt")
    importlib.import_module("export").main([f"--model={d / 'm.pt'}", f"--hf_dir={d / 'hf'}", "--check=False"])
    (d / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 4)
    return d, {"run": (str(d / "run"), f"{d / 'run' / 'ckpt_000003.pt'} (step 3)"),
               "pt": (str(d / "m.pt"), f"{d / 'm.pt'} (step 3)"),
               "hf": (str(d / "hf"), str(d / "hf"))}


def read(script, flags, d, capsys):
    """Run a reader on flags as a user would; returns its stderr and stdout together. sample, eval and
    export run in this process; serve in its own, stopped once it says it is listening (the model loaded)."""
    if script == "serve":
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port=0", "--device=cpu", *flags],
                             cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.monotonic() + 120
        for line in p.stdout:  # the server prints "listening on ..." once the model is loaded
            lines.append(line)
            if line.startswith("listening on") or time.monotonic() > deadline:
                break
        p.kill()
        p.wait(timeout=60)
        p.stdout.close()
        return "".join(lines)
    common = {"sample": ["--max_new_tokens=2", "--device=cpu"],
              "eval": [f"--data={d / 'doc.txt'}", f"--out={d / 'r.json'}", "--device=cpu"],
              "export": [f"--hf_dir={d / 'out-hf'}", "--check=False"]}[script]
    importlib.import_module(script).main([*flags, *common])
    out, err = capsys.readouterr()
    return err + out


@pytest.mark.parametrize("kind", ["run", "pt", "hf"])
@pytest.mark.parametrize("script", READERS)
def test_every_reader_takes_every_source(sources, script, kind, capsys):
    d, found = sources
    source, description = found[kind]
    text = read(script, [f"--model={source}"], d, capsys)
    verb = {"sample": "sampling", "eval": "evaluating", "export": "exported", "serve": "serving"}[script]
    assert f"{verb} {description}" in text, text
    assert "note:" not in text
    if script == "serve":  # clients call it by the source's last part: the run's folder name
        assert f"as {os.path.basename(source)!r}" in text


@pytest.mark.parametrize("script", READERS)
def test_old_flags_work_with_one_note_each(sources, script, capsys):
    d, found = sources
    run_dir, description = found["run"]
    text = read(script, [f"--out_dir={run_dir}"], d, capsys)
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --out_dir is deprecated in {script}.py; use --model={run_dir}"]
    assert description in text
    if script != "serve":  # the same mechanism: --init_from=PATH; its old default 'resume' changes nothing
        pt, description = found["pt"]
        text = read(script, [f"--init_from={pt}"], d, capsys)
        assert [line for line in text.splitlines() if line.startswith("note:")] == \
            [f"note: --init_from is deprecated in {script}.py; use --model={pt}"] and description in text
        text = read(script, [f"--model={pt}", "--init_from=resume"], d, capsys)
        assert description in text and [line for line in text.splitlines() if line.startswith("note:")] == \
            [f"note: --init_from=resume is deprecated in {script}.py and changes nothing: drop it"]


def test_export_renames_dtype_and_license(sources, capsys):
    d, found = sources
    text = read("export", [f"--model={found['pt'][0]}", "--dtype=float16", "--license=mit"], d, capsys)
    assert re.findall(r"^note: .*$", text, re.M) == ["note: --dtype is deprecated in export.py; use --save_dtype=float16",
                                                      "note: --license is deprecated in export.py; use --license_id=mit"]
    assert "float16) to" in text and "license: \"mit\"" in (d / "out-hf" / "README.md").read_text()


def test_old_and_new_flag_together_is_one_line(sources):
    d, found = sources
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--model={found['pt'][0]}",
                        f"--out_dir={found['run'][0]}"], cwd=d, env=ENV, capture_output=True, text=True, timeout=120)
    assert "--model and --out_dir both set model: pass only --model=..." in error_line(p)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--model={found['pt'][0]}", "--ckpt=last"],
                       cwd=d, env=ENV, capture_output=True, text=True, timeout=120)
    assert "--ckpt=last picks a checkpoint inside a run directory" in error_line(p)


def test_open_model_reads_the_checkpoint_file_once(sources, monkeypatch, capsys):
    d, found = sources
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    opened = checkpoint.open_model(found["run"][0])
    assert len(loads) == 1 and opened.state["iter_num"] == 3 and opened.run_dir == found["run"][0]
    assert opened.description == found["run"][1] and not opened.model.training
    for script in ("eval", "export"):  # the two that also need the checkpoint's state
        loads.clear()
        read(script, [f"--model={found['run'][0]}"], d, capsys)
        assert len(loads) == 1, (script, loads)
    hf = checkpoint.open_model(found["hf"][0])
    assert hf.state is None and hf.run_dir is None and hf.description == found["hf"][0]
