"""export.py: a checkpoint becomes a directory transformers loads with no custom code. For each preset,
transformers' logits equal ours within 1e-5 and its greedy generate equals ours, and our load_model
reads the export back to identical weights. The tokenizer.json encodes hostile Unicode exactly as our
Tokenizer does (and GPT-2's vocabulary goes out as GPT-2's own files). The model card has valid YAML
front matter and only numbers from the run's own files. The push lists its files offline (dry run),
calls the real upload code, and a network error is one line."""
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import hf
from bpe import PATTERNS, Tokenizer
from conftest import ENV, ROOT, error_line, train
from decode import generate
from model import GPT, GPTConfig
from test_bpe import HOSTILE, real_docs
from test_model import randomise

transformers = pytest.importorskip("transformers")
export = importlib.import_module("export")


@pytest.fixture(autouse=True, scope="module")
def quiet():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(workdir):
    return Tokenizer.load(str(workdir / "data" / "tiny" / "tokenizer.bpe"))


def save_checkpoint(model, tok, path, **extra):
    torch.save({"version": checkpoint.VERSION, "model": model.state_dict(), "tokenizer": tok.dumps(),
                "model_args": dataclasses.asdict(model.config), "iter_num": 0, "config": {}, **extra}, path)
    return str(path)


@pytest.mark.parametrize("preset, cls, tied", [("gpt2", "GPT2LMHeadModel", True), ("modern", "LlamaForCausalLM", True),
                                               ("modern", "LlamaForCausalLM", False),  # the quick start's form
                                               ("gpt1", "OpenAIGPTLMHeadModel", True)])
def test_round_trip_each_preset(tok, tmp_path, preset, cls, tied, capsys):
    # rope_theta 500 must reach config.json; random gains and biases must land in the right tensors
    config = GPTConfig.preset(preset, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=tok.vocab_size,
                              dropout=0.0, tie_weights=tied, **({"rope_theta": 500.0} if preset == "modern" else {}))
    model = randomise(GPT(config), std=0.15)  # logits of a few units: greedy decoding varies
    ckpt = save_checkpoint(model, tok, tmp_path / "m.pt")
    export.main([f"--model={ckpt}", f"--hf_dir={tmp_path / 'hf'}"])  # check=True: it loads itself back
    assert f"check: transformers' {cls} and AutoTokenizer load" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == cls and theirs.dtype == torch.float32
    text = "def f(x):\n    return x * 2  # ✓ 漢字\n"
    ids = tok.encode(text)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == ids  # no BOS added
    x = torch.tensor([(ids * 3)[:32], (ids * 3)[5:37]])
    with torch.no_grad():
        assert (theirs(x).logits - model(x)[0]).abs().max() < 1e-5
        prompt = x[:1, :6]
        ours = generate(model, prompt, 20, temperature=0)
        hf_out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.eot_token)
    assert torch.equal(hf_out, ours) and len(set(ours[0, 6:].tolist())) > 1  # and not one token repeated
    back, back_tok, where = checkpoint.load_model(str(tmp_path / "hf"))
    assert back_tok.dumps() == tok.dumps() and where == str(tmp_path / "hf")
    real = tok.vocab_size  # the padded rows are never read, and are not exported
    a, b = back.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and back.config == model.config
    for k in b:
        assert torch.equal(a[k][:real] if "wte" in k or "lm_head" in k else a[k],
                           b[k][:real] if "wte" in k or "lm_head" in k else b[k]), k


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_tokenizer_json_encodes_hostile_unicode_as_we_do(tmp_path, pattern):
    tok = Tokenizer.train(real_docs(300_000) + HOSTILE * 3, vocab_size=1200, pattern=pattern)
    for name, text in hf.tokenizer_files(tok, 1024).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # special-token text: HF matches it in raw text, so compare with ours allowing it; and without it
    texts = HOSTILE + ["  two  spaces\tand\ttabs  \n\n\n   ", "\u200b\u200d\ufeff zero-width", "x<|endoftext|>y"]
    texts += real_docs(60_000, start=400_000)
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert theirs.encode(text) == ids, text[:60]
        assert theirs.decode(ids) == tok.decode(ids)
    assert theirs.encode("a<|endoftext|>") == tok.encode("a") + [tok.eot_token]
    assert sum(len(tok.encode(t)) for t in texts) > 15_000  # real documents, not only the short cases


def test_gpt2_vocabulary_exports_as_gpt2s_own_files(tmp_path, monkeypatch):
    """GPT-2's vocab.json and merges.txt are the files tiktoken builds its gpt2 encoding from; offline,
    a small vocabulary in GPT-2's exact file format stands in for them, served where tiktoken reads."""
    import tiktoken
    import tiktoken.load
    small = Tokenizer.train(real_docs(200_000), vocab_size=600)
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order += [b for b in range(256) if b not in order]  # GPT-2's ids of the 256 bytes
    chars = hf.byte_chars()
    show = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {show(bytes([b])): i for i, b in enumerate(order)}
    for a, b in small.merges:
        vocab[show(small.vocab[a] + small.vocab[b])] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    served = {"vocab.json": json.dumps(vocab),
              "merges.txt": "#version: 0.2\n" + "".join(f"{show(small.vocab[a])} {show(small.vocab[b])}\n"
                                                       for a, b in small.merges)}
    by_url = {url: served[name] for name, (url, _) in hf.GPT2_FILES.items()}
    monkeypatch.setattr(tiktoken.load, "read_file_cached", lambda url, expected_hash=None: by_url[url].encode())
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(*(hf.GPT2_FILES[n][0] for n in ("merges.txt", "vocab.json")))
    reference = tiktoken.Encoding("gpt2-small", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})
    gpt2 = Tokenizer.gpt2()
    gpt2.special_tokens = {"<|endoftext|>": vocab["<|endoftext|>"]}
    files = hf.tokenizer_files(gpt2, 1024)
    assert files["vocab.json"] == served["vocab.json"] and files["merges.txt"] == served["merges.txt"]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in HOSTILE + real_docs(30_000, start=300_000):
        assert theirs.encode(text) == reference.encode(text, allowed_special="all"), text[:60]


@pytest.fixture(scope="module")
def run_dir(workdir):
    """A tiny train.py run (gpt2 preset, 6 steps, evaluated at 3 and 6) and eval.py's results for it."""
    d = workdir / "out-export"
    if not (d / "ckpt_000006.pt").exists():
        train(workdir, "--out_dir=out-export", "--max_iters=6", "--eval_interval=3")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model=out-export", "--device=cpu"],
                           cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    return d


def test_model_card_has_valid_front_matter_and_the_runs_own_numbers(workdir, run_dir, monkeypatch):
    import yaml
    from huggingface_hub import ModelCard
    monkeypatch.chdir(workdir)
    export.main(["--model=out-export", "--hf_dir=card-hf", "--license_id=mit", "--check=False"])
    text = (workdir / "card-hf" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "mit" and front["language"] == ["en"] and "gpt2" in front["tags"]
    card = ModelCard(text)  # huggingface_hub parses the model-index into EvalResults (and would raise)
    state = checkpoint.load(str(run_dir / "best.pt"))
    results = json.loads((run_dir / "eval_ppl.json").read_text())
    assert results["step"] == state["iter_num"] == 6
    got = {(r.metric_type, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert got == {(m["metric"], "val"): m["value"] for m in results["results"]}
    body = text.split("---\n", 2)[2]
    # the numbers, each from its file: the checkpoint, log.jsonl, the data card, eval.py's results
    data_card = json.loads((workdir / "data" / "tiny" / "card.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    last_eval = [r for r in log if "val_loss" in r][-1]
    from safetensors.torch import load_file
    tensors = load_file(str(workdir / "card-hf" / "model.safetensors"))
    cfg = state["config"]
    per_step = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    steps = [r for r in log if "ms_per_step" in r]  # each line covers the steps since the one before
    minutes = sum((b["step"] - a["step"]) * b["ms_per_step"] for a, b in zip([{"step": 0}] + steps, steps)) / 60000
    for fact in [f"{sum(t.numel() for t in tensors.values()):,}-parameter", f"at step {state['iter_num']:,}",
                 f"Steps: 6 of {per_step:,} tokens", f"{6 * per_step:,} tokens",
                 f"{data_card['tokens']['train']:,} train, {data_card['tokens']['val']:,} val",
                 f"{data_card['documents']['read']:,} read",
                 f"{data_card['tokens']['bytes_per_token']} bytes per token",
                 f"val loss {last_eval['val_loss']:.4f}", f"val {last_eval['val_bpb']:.4f} bits/byte",
                 f"Training time: {minutes:.1f} minutes", f"Best val loss: {state['best_val_loss']:.4f}",
                 f"| learning_rate | {cfg['learning_rate']!r} |", data_card["command"], results["command"],
                 *[f"| {m['value']:.4f} | {m['count']:,} |" for m in results["results"]],
                 "Licence of the data: unknown (not stated for local input)"]:
        assert fact in body, fact
    assert not re.search(r"TODO|TBD|XXX|\bnan\b|\bNone\b|\{|\}", body)  # no placeholder, no unfilled template


def test_push_dry_run_lists_files_offline_and_errors_are_one_line(workdir, run_dir, monkeypatch, capsys):
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), "--model=out-export", "--hf_dir=push-hf",
           "--check=False", "--push_to_hub=someone/tiny-gpt"]
    p = subprocess.run([*cmd, "--dry_run=True"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "dry run: nothing written; would write 7 files to push-hf/ and upload them" in p.stdout
    assert "https://huggingface.co/someone/tiny-gpt (private)" in p.stdout
    for f in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "tokenizer.bpe"):
        assert f"  {f}\n" in p.stdout
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    line = error_line(p)
    assert "could not push push-hf/ to someone/tiny-gpt" in line and "check the network and your token" in line
    # the real upload code, with the hub's client recording the calls instead of sending them
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)) or "ok")
    monkeypatch.chdir(workdir)
    export.main(["--model=out-export", "--hf_dir=push-hf", "--check=False", "--push_to_hub=someone/tiny-gpt",
                 "--private=False"])
    assert calls[0] == ("create", ("someone/tiny-gpt",), {"private": False, "exist_ok": True})
    assert calls[1][1]["folder_path"] == "push-hf" and calls[1][1]["repo_id"] == "someone/tiny-gpt"
    assert "model.safetensors" in calls[1][1]["allow_patterns"]
    assert "pushed 7 files" in capsys.readouterr().out


def test_task_head_and_refusals(tok, tmp_path, capsys):
    """A fine-tuned classifier exports its GPT plus its head as classifier_head.*; what cannot be exported
    (a LoRA-only checkpoint, a form no transformers class has, a run directory as target) is one line."""
    from configurator import run
    model = randomise(GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=16,
                                           vocab_size=tok.vocab_size)))
    head = {"weight": torch.randn(3, 32), "bias": torch.randn(3)}
    ckpt = save_checkpoint(model, tok, tmp_path / "ft.pt", head=head,
                           finetune={"task": "classification", "labels": ["neg", "neu", "pos"], "lora": None})
    export.main([f"--model={ckpt}", f"--hf_dir={tmp_path / 'ft-hf'}", "--check=False"])
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ft-hf" / "classifier_head.safetensors"))
    assert torch.equal(saved["weight"], head["weight"]) and torch.equal(saved["bias"], head["bias"])
    meta = json.loads((tmp_path / "ft-hf" / "classifier_head.json").read_text())
    assert meta["finetune"]["labels"] == ["neg", "neu", "pos"] and "extract token" in meta["reads"]
    assert "## Task head" in (tmp_path / "ft-hf" / "README.md").read_text()
    torch.save({"version": checkpoint.VERSION, "adapters": {}, "finetune": {"lora": {"rank": 8}}}, tmp_path / "lora.pt")
    untied = GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size,
                                  tie_weights=False))
    mixed = GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size,
                                 pos="rope"))
    capped = GPT(GPTConfig.preset("modern", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size,
                                  logit_softcap=15.0))
    cases = [([f"--model={tmp_path / 'lora.pt'}"], "holds LoRA adapters, not a whole model; fold them into one first"),
             ([f"--model={save_checkpoint(untied, tok, tmp_path / 'u.pt')}"], "untied gpt2 model"),
             ([f"--model={save_checkpoint(mixed, tok, tmp_path / 'x.pt')}"],
              "no transformers class computes norm=layernorm, pos=rope"),
             ([f"--model={save_checkpoint(capped, tok, tmp_path / 'c.pt')}"], "no QK-norm or logit soft-capping"),
             ([f"--model={ckpt}", f"--hf_dir={tmp_path}"], "holds checkpoints: export to another --hf_dir"),
             ([f"--model={ckpt}", "--push_to_hub=not a repo"], "must be a hub repo id, owner/name"),
             ([f"--model={ckpt}", "--dry_run=True"], "dry_run=True lists what push_to_hub would upload"),
             ([f"--model={ckpt}", "--save_dtype=int4"], "save_dtype='int4' is not one of")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            run(export.main, flags)
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), (flags, e.value.code)


def test_a_fine_tuned_run_and_its_merge_export_round_trip_and_publish_no_local_path(tok, tmp_path, capsys):
    """finetune.py's log ends with a {"final": ...} record; its run, its merged.pt (beside the run or
    inside it) export and load back with transformers; the card names the task data and the test score;
    eval results of other checkpoints and local files stay out of the hub metadata; and no file of the
    export names a folder of this machine."""
    import random
    import tempfile
    import yaml
    import eval as ev
    import finetune
    base = save_checkpoint(GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=32,
                                                vocab_size=tok.vocab_size)), tok, tmp_path / "base.pt")
    r = random.Random(0)
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        rows = [{"text": "".join(r.choice("abc") for _ in range(5)), "label": r.choice(["yes", "no"])} for _ in range(n)]
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    common = ["--device=cpu", "--dtype=float32", f"--model={base}", f"--data={tmp_path / 'data'}",
              "--text_fields=text", "--max_iters=2", "--batch_size=8", "--micro_batch_size=8", "--eval_interval=1"]
    full, lora_run = tmp_path / "ft", tmp_path / "ft-lora"
    finetune.main([*common, f"--out_dir={full}"])
    finetune.main([*common, f"--out_dir={lora_run}", "--lora_rank=2"])
    finetune.main([f"--out_dir={lora_run}", f"--merge={lora_run / 'merged.pt'}", "--device=cpu"])
    (tmp_path / "notes.txt").write_text("abc abc cab\n")
    ev.main([f"--model={full}", f"--data={tmp_path / 'notes.txt'}", "--device=cpu"])  # a local file: the table only
    ev.main([f"--model={base}", f"--data={tmp_path / 'notes.txt'}", "--device=cpu",  # another checkpoint
             f"--out={full / 'eval_other.json'}"])
    capsys.readouterr()
    for source, dest in ((full, "hf-full"), (lora_run / "merged.pt", "hf-merged")):
        export.main([f"--model={source}", f"--hf_dir={tmp_path / dest}"])  # check=True: transformers loads it
        assert "check: transformers' GPT2LMHeadModel and AutoTokenizer load" in capsys.readouterr().out
    text = (tmp_path / "hf-full" / "README.md").read_text()
    final = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()][-1]["final"]
    assert "Fine-tuned for `classification` on `data`" in text and "No data card" not in text
    assert f"test (log.jsonl): loss {final['test']['loss']:.4f}, accuracy {final['test']['accuracy']:.4f}" in text
    assert "| ppl | local file notes.txt |" in text and "the tied embedding and head once" in text
    front = yaml.safe_load(text.split("---\n")[1])
    assert "model-index" not in front  # a local file is no benchmark, and eval_other scored base.pt
    # nothing that names this machine: the repository, the home folder, the temporary folder
    for d in ("hf-full", "hf-merged"):
        for f in (tmp_path / d).iterdir():
            content = f.read_bytes()
            for local in (ROOT, os.path.expanduser("~") + "/", tempfile.gettempdir() + "/", str(tmp_path)):
                assert local.encode() not in content, (f, local)
    meta = json.loads((tmp_path / "hf-merged" / "classifier_head.json").read_text())
    assert meta["finetune"]["merged_from"] == "base.pt"
    # a dry run changes nothing, and says what it would write and upload
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "hf-full").iterdir()}
    export.main([f"--model={full}", f"--hf_dir={tmp_path / 'hf-full'}", "--push_to_hub=me/ft", "--dry_run=True",
                 "--license_id=mit"])
    assert "dry run: nothing written" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "hf-full").iterdir()} == before
    export.main([f"--model={full}", f"--hf_dir={tmp_path / 'hf-dry'}", "--push_to_hub=me/ft", "--dry_run=True"])
    assert not (tmp_path / "hf-dry").exists()
