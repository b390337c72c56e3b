"""eval.py: the numbers a user reports. The sliding window scores every token once; perplexity is the
exponential of the mean token loss computed independently; the script writes one results JSON with
completions beside the numbers; bad input is one line; and on an exported model eval.py's multiple
choice and LAMBADA agree with lm-evaluation-harness itself: acc and acc_norm equal, every
log-likelihood within 1e-4."""
import csv
import dataclasses
import importlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from bpe import Tokenizer
from conftest import ENV, ROOT, error_line, train
from model import GPT, GPTConfig
from test_model import randomise

ev = importlib.import_module("eval")  # eval.py; the name is also a builtin


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: threads only contend
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(workdir):
    return Tokenizer.load(str(workdir / "data" / "tiny" / "tokenizer.bpe"))  # a 512-token BPE of stdlib text


def tiny_model(preset, tok, block_size=128):
    config = GPTConfig.preset(preset, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                              vocab_size=tok.vocab_size, dropout=0.0)
    return randomise(GPT(config))


def save_checkpoint(model, tok, path):
    """A checkpoint in train.py's format, for a model built here."""
    torch.save({"version": 2, "model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                "tokenizer": tok.dumps(), "iter_num": 0, "config": {}}, path)
    return str(path)


def test_windows_score_every_token_exactly_once():
    for n in (0, 1, 5, 16, 17, 40, 100):
        for window, stride in ((16, 16), (16, 8), (16, 5), (16, 1), (7, 3)):
            seen, spans = [], list(ev.windows(n, window, stride))
            for start, end, first in spans:
                assert end - start <= window and start < first <= end  # the window fits, something is scored
                for p in range(first, end + 1):
                    assert p - start >= min(p, window - stride + 1)  # at least window - stride tokens before
                seen += range(first, end + 1)
            assert seen == list(range(1, n + 1)), (n, window, stride)
            if n >= window:
                assert spans[-1][1] - spans[-1][0] == window  # the last window is a full one


def test_perplexity_is_the_exponential_of_the_mean_token_loss(tok):
    model = tiny_model("modern", tok, block_size=16)
    texts = ["def f(x):\n    return x + 1\n", "import os", "class A:\n    pass\n" * 3, "x"]
    docs = [tok.encode(t) for t in texts]
    eot, lengths = tok.eot_token, tok.token_byte_lengths()
    # documents shorter than the window: one forward each, the model's own mean loss
    short = [d for d in docs if len(d) <= 16]
    got = ev.perplexity(model, short, lengths, [eot], 16, 8, batch_size=3)
    with torch.no_grad():
        losses = [model(torch.tensor([[eot] + d[:-1]]), torch.tensor([d]), reduction="none")[1][0] for d in short]
    mean = torch.cat(losses).mean().item()
    assert got["tokens"] == sum(map(len, short)) and got["documents"] == len(short)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    nbytes = sum(len(t.encode()) for t, d in zip(texts, docs) if len(d) <= 16)
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(mean * got["tokens"] / math.log(2) / nbytes, rel=1e-5)
    # a long document, stride 1: every token with the full window before it, each from its own forward
    long = tok.encode("def main(argv=None):\n    config = configure(globals(), argv)\n    return config\n" * 2)
    assert len(long) > 40
    got = ev.perplexity(model, [long], lengths, [eot], 16, 1, batch_size=7)
    seq, nll = [eot] + long, 0.0
    with torch.no_grad():
        for p in range(1, len(seq)):
            logits, _ = model(torch.tensor([seq[max(0, p - 16):p]]))
            nll -= logits[0, -1].log_softmax(-1)[seq[p]].item()
    assert got["perplexity"] == pytest.approx(math.exp(nll / len(long)), rel=1e-5)
    # a larger stride gives each token less context: a different number, from the same tokens
    coarse = ev.perplexity(model, [long], lengths, [eot], 16, 16, batch_size=7)
    assert coarse["tokens"] == got["tokens"] and coarse["perplexity"] != pytest.approx(got["perplexity"], rel=1e-6)


def test_eval_script_writes_results_and_completions(workdir):
    """A tiny train.py run scored on its own val shards by the script, as a user runs it."""
    if not (workdir / "out-eval" / "best.pt").exists():
        train(workdir, "--out_dir=out-eval", "--max_iters=4", "--eval_interval=4")
    (workdir / "prompts.txt").write_text("def \nimport os\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model=out-eval", "--prompts=prompts.txt",
                        "--max_new_tokens=8", "--device=cpu"], cwd=workdir, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads((workdir / "out-eval" / "eval_ppl.json").read_text())
    from shards import read_shard
    val = read_shard(str(next((workdir / "data" / "tiny").glob("*_val_*.bin"))))
    n_docs = int((val == Tokenizer.load(str(workdir / "data" / "tiny" / "tokenizer.bpe")).eot_token).sum())
    assert res["model"].endswith("best.pt (step 4)") and res["step"] == 4 and res["task"] == "ppl"
    assert res["data"] == os.path.join("data", "tiny") + " (val shards)"
    assert res["command"] == "python eval.py --model=out-eval --prompts=prompts.txt --max_new_tokens=8 --device=cpu"
    values = {r["metric"]: r for r in res["results"]}
    assert values["perplexity"]["count"] == len(val) - n_docs  # every token but the <|endoftext|> before each document
    assert values["perplexity"]["value"] == pytest.approx(math.exp(values["nats_per_token"]["value"]))
    assert values["bits_per_byte"]["value"] == pytest.approx(
        values["nats_per_token"]["value"] * values["perplexity"]["count"] / math.log(2) / res["details"]["bytes"])
    assert 1 < values["perplexity"]["value"] < 512  # 4 steps: better than nothing, far from good
    assert [c["prompt"] for c in res["completions"]] == ["def ", "import os"]
    assert all(c["completion"] for c in res["completions"])  # greedy: 8 tokens (or up to an <|endoftext|>)
    assert "perplexity" in p.stdout and "bits_per_byte" in p.stdout and res["completions"][0]["completion"] in p.stdout


def hellaswag_rows(words, n, rnd):
    """Rows in HellaSwag's own format, with the cases its preprocessing handles: [title] tags,
    bracketed steps, double spaces, an empty ctx_b, trailing space in the context."""
    w = lambda k: " ".join(rnd.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        title = " [title] " + w(2) if i % 4 == 0 else ""
        rows.append({"activity_label": w(1), "ctx_a": w(rnd.randint(3, 25)) + title,
                     "ctx_b": (w(rnd.randint(1, 4)) if i % 3 else "") + ("  " if i % 5 == 0 else ""),
                     "endings": [w(rnd.randint(1, 7)) + (" [step] " + w(1) if i % 6 == 0 else "") for _ in range(4)],
                     "label": str(rnd.randint(0, 3))})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


TASK_YAMLS = {  # lm-eval tasks over the same local files (PITFALLS: dataset_path json + data_files)
    "hs_local": """output_type: multiple_choice
process_docs: !function hs_utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "mc_local": """output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_target: gold
doc_to_choice: choices
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "lambada_local": """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false}, {metric: acc}]""",
}


@pytest.mark.parametrize("preset", ["modern", "gpt2"])
def test_multiple_choice_and_lambada_agree_with_lm_evaluation_harness(workdir, tok, tmp_path, preset, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the model: exported by export.py, read back by both tools from the same directory
    ckpt = save_checkpoint(tiny_model(preset, tok), tok, tmp_path / "m.pt")
    importlib.import_module("export").main([f"--model={ckpt}", f"--hf_dir={tmp_path / 'hf'}", "--check=False"])
    # the data: stdlib words; some contexts run past the 128-token window, so truncation is compared too
    rnd, words = random.Random(0), (workdir / "corpus" / "textwrap.txt").read_text().split()
    files = {"hs_local": write_jsonl(tmp_path / "hs.jsonl", hellaswag_rows(words, 24, rnd)),
             "mc_local": write_jsonl(tmp_path / "mc.jsonl", [
                 {"query": "Question: " + " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 12))) + "\nAnswer:",
                  "choices": [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 5))) for _ in range(3)],
                  "gold": rnd.randint(0, 2)} for _ in range(16)]),
             "lambada_local": write_jsonl(tmp_path / "lambada.jsonl", [
                 {"text": " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 60)))} for _ in range(16)])}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hellaswag_utils = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "utils.py")
    shutil.copy(hellaswag_utils, tasks / "hs_utils.py")  # lm-eval's own preprocessing, for its side
    for name, body in TASK_YAMLS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {files[name]}\ntest_split: test\n{body}\n")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                     tasks=list(TASK_YAMLS), device="cpu", batch_size=8,
                                     task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    for name, task in (("hs_local", "hellaswag"), ("mc_local", "mc"), ("lambada_local", "lambada")):
        ours = ev.main([f"--model={tmp_path / 'hf'}", f"--task={task}", f"--data={files[name]}",
                        f"--out={tmp_path / (name + '.json')}", "--device=cpu", "--batch_size=5"])
        mine = {r["metric"]: r["value"] for r in ours["results"]}
        lme = theirs["results"][name]
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(ours["items"]) == (24 if name == "hs_local" else 16)
        if task == "lambada":
            assert mine["acc"] == lme["acc,none"]
            assert mine["perplexity"] == pytest.approx(lme["perplexity,none"], rel=1e-4)
            lls = [(it["loglikelihood"], s["filtered_resps"][0][0]) for it, s in zip(ours["items"], samples)]
            assert [it["greedy"] for it in ours["items"]] == [bool(s["filtered_resps"][0][1]) for s in samples]
        else:
            assert mine["acc"] == lme["acc,none"] and mine["acc_norm"] == lme["acc_norm,none"]
            lls = [(a, float(b[0])) for it, s in zip(ours["items"], samples)
                   for a, b in zip(it["loglikelihoods"], s["filtered_resps"], strict=True)]
            preds = {it["pred"] for it in ours["items"]}
            assert len(preds) > 1  # a model that always picks the same slot would agree vacuously
        assert max(abs(a - b) for a, b in lls) < 1e-4
        assert min(a for a, _ in lls) < -5  # real log-likelihoods of multi-token continuations


def test_int8_reports_the_cost_of_quantization(tok, tmp_path):
    pytest.importorskip("quantize")
    ckpt = save_checkpoint(tiny_model("gpt2", tok, 32), tok, tmp_path / "m.pt")
    (tmp_path / "doc.txt").write_text(open(os.path.join(ROOT, "eval.py")).read()[:3000])
    res = ev.main([f"--model={ckpt}", f"--data={tmp_path / 'doc.txt'}", "--quantize=int8", "--device=cpu",
                   f"--out={tmp_path / 'r.json'}"])
    values = {r["metric"]: r for r in res["results"]}
    base, q = values["perplexity"]["value"], values["perplexity (int8)"]
    assert q["change"] == pytest.approx(q["value"] - base) and q["value"] != base
    assert abs(q["change"]) < 0.05 * base  # int8 weights cost little perplexity


@pytest.mark.parametrize("mode", ["int4", "int4-gptq"])
def test_int4_is_scored_saved_and_read_back_without_calibrating_again(tok, tmp_path, workdir, mode):
    """eval.py scores the int4 model beside the float one; with --save_quantized the quantized model is
    kept, and --model=FILE (here and in sample.py, serve.py) reads it back with no calibration: the same
    perplexity, and weights at 4 bits."""
    import quantize as q
    from checkpoint import load_quantized
    model = GPT(GPTConfig.preset("modern", n_layer=2, n_head=2, n_embd=64, block_size=64,
                                 vocab_size=tok.vocab_size, dropout=0.0))
    ckpt = save_checkpoint(randomise(model), tok, tmp_path / "m.pt")
    (tmp_path / "doc.txt").write_text(open(os.path.join(ROOT, "eval.py")).read()[:3000])
    common = [f"--data={tmp_path / 'doc.txt'}", "--device=cpu", "--group_size=32"]
    res = ev.main([f"--model={ckpt}", *common, f"--quantize={mode}", f"--calibration_data={workdir / 'data' / 'tiny'}",
                   f"--save_quantized={tmp_path / 'q.pt'}", f"--out={tmp_path / 'r.json'}"])
    values = {r["metric"]: r for r in res["results"]}
    base, quant = values["perplexity"]["value"], values[f"perplexity ({mode})"]["value"]
    assert quant != base and abs(quant - base) < 0.1 * base
    assert res["details"][f"weight_bytes_{mode}"] < 0.5 * res["details"]["weight_bytes"]  # the float table stays
    again = ev.main([f"--model={tmp_path / 'q.pt'}", *common, f"--out={tmp_path / 'r2.json'}"])
    assert again["results"][0]["value"] == pytest.approx(quant, rel=1e-6)
    assert again["model"] == f"{tmp_path / 'q.pt'} ({mode} weights)"
    back, _ = load_quantized(str(tmp_path / "q.pt"))
    assert back.quantization["mode"] == mode and q.weight_bytes(back) == res["details"][f"weight_bytes_{mode}"]


def test_bad_input_is_one_line(workdir, tok, tmp_path, monkeypatch):
    """Each mistake ends as one line naming it and the fix, and writes no results file. The first case
    runs as a user runs it (a process: one stderr line, exit 1); the rest through the same run()."""
    from configurator import run
    ckpt = save_checkpoint(tiny_model("gpt2", tok, 32), tok, tmp_path / "m.pt")
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "choices": ["a"], "gold": 0}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--model={ckpt}", "--task=hellaswag"],
                       env={**ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert "could not load Rowan/hellaswag (validation) from the Hugging Face hub" in error_line(p)
    assert "pass --data=FILE.jsonl" in error_line(p) and p.stdout == ""
    # a hub that refuses connections: one line within seconds, not half a minute of "Retrying in 8s"
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--model={ckpt}", "--task=hellaswag"],
                       env={**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"},
                       capture_output=True, text=True, timeout=120)
    assert "cannot reach the Hugging Face hub at 127.0.0.1:9" in error_line(p) and time.time() - t0 < 20
    (tmp_path / "table.csv").write_text("text,label\nsome words,1\n")
    cases = [(["--task=hellaswagg"], "task='hellaswagg' is not one of"),
             (["--task=mc"], "task=mc needs --data=FILE.jsonl"),
             (["--task=mc", "--data=bad.jsonl"], "bad.jsonl line 1: an item is"),
             (["--task=lambada", "--data=missing.jsonl"], "cannot read lambada file missing.jsonl"),
             (["--window=64"], "window=64 is longer than the model's context 32"),
             (["--stride=40", "--window=32"], "stride=40 is larger than the window 32"),
             (["--data=nothing*.txt"], "matches no file"),
             (["--data=table.csv"], "task=ppl scores documents from .txt, .jsonl or .parquet files, not a table"),
             ([], "this model has no run settings naming its dataset"),
             (["--model=nowhere"], "no model at 'nowhere': --model takes a run directory")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            run(ev.main, [f"--model={ckpt}", *flags])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), (flags, e.value.code)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "m.pt", "table.csv"]  # no results file from a failed run


def test_scores_under_bf16_autocast_equal_float32(monkeypatch):
    """On a GPU eval.py runs under bf16 autocast. A trained model's logits sit far below 0, where bf16's
    steps are coarse: here every logit is shifted by -80 (steps of 0.5), which log-softmax would not
    notice in float32. Each token's score must still equal float32's within 1e-4: model.log_probs
    computes the scored positions' head in float32. The old way, head under autocast, is checked to
    be off, so the test can fail. No blocks: their own bf16 rounding (a few 1e-4 per token at 2 layers)
    is what bf16 costs anywhere; this is about the head."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2", n_layer=0, n_head=2, n_embd=64, block_size=64, vocab_size=500)).eval()
    with torch.no_grad():  # every lm_head row gets the same component along e, and ln_f adds -80/1 of e
        e = torch.randn(64)
        e /= e.norm()
        W = model.lm_head.weight
        W -= (W @ e)[:, None] * e - e
        model.transformer.ln_f.bias.copy_(-80.0 * e)
        assert model(torch.tensor([[1, 2, 3]]))[0].max() < -64  # where bf16 steps are 0.5
    seq = torch.randint(0, 500, (40,)).tolist()
    rows = [(seq[:i + 1], 1) for i in range(1, 40)]  # one scored token each: per-token scores
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    f32 = [s for s, _ in ev.score(model, rows, 8)]
    got = [s for s, _ in ev.score(model, rows, 8, ctx=bf16())]
    assert max(abs(a - b) for a, b in zip(f32, got)) < 1e-4
    monkeypatch.setattr(model, "log_probs", lambda h: model.head(h).float().log_softmax(-1))
    old = [s for s, _ in ev.score(model, rows, 8, ctx=bf16())]
    assert max(abs(a - b) for a, b in zip(f32, old)) > 0.05


def test_zeroshot_picks_the_verbalizer_the_model_finds_likelier(workdir, tok, tmp_path):
    """GPT-1's zero-shot heuristic (§5): each text + " very", then one verbalizer or the other. The choice,
    its log-likelihoods and the accuracy equal a hand computation from the model's logits (log-softmax at
    each verbalizer token, summed); label names map to verbalizers in sorted order, ids as they are. The
    verbalizers are words of four tokens each here: a random model prefers the shorter of two words of
    unequal length whatever the text, and this pair is split by the texts (16 of 24)."""
    model = tiny_model("gpt2", tok).eval()  # a context of 128 holds every text
    ckpt = save_checkpoint(model, tok, tmp_path / "m.pt")
    rnd, words = random.Random(0), (workdir / "corpus" / "textwrap.txt").read_text().split()
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12))) for _ in range(24)]
    gold = [rnd.randint(0, 1) for _ in texts]
    with open(tmp_path / "sst.csv", "w", newline="") as f:  # names, sorted: minus is label 0, plus label 1
        csv.writer(f).writerows([("sentence", "label"), *((t, ("minus", "plus")[g]) for t, g in zip(texts, gold))])
    write_jsonl(tmp_path / "sst.jsonl", [{"sentence": t, "label": g} for t, g in zip(texts, gold)])
    # GLUE's .tsv, label ids: unquoted, so a cell that opens with a quote character is text (read as quoted
    # csv, it would run on into the lines below)
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\tnote\n" + "".join(f'{t}\t{g}\t"q\n'
                                                                      for t, g in zip(texts, gold)))
    verbalizers = ("good", "great")
    assert all(len(tok.encode(" " + v)) > 1 for v in verbalizers)  # a sum over several tokens, not one

    def by_hand(text, word):
        context, whole = tok.encode(text + " very"), tok.encode(text + " very " + word)
        assert whole[:len(context)] == context
        with torch.no_grad():
            logp = model(torch.tensor([whole[:-1]]))[0][0].log_softmax(-1)  # (T, vocab)
        return sum(logp[p - 1, whole[p]].item() for p in range(len(context), len(whole)))
    hand = [[by_hand(t, v) for v in verbalizers] for t in texts]
    picks = [int(b > a) for a, b in hand]
    assert 0 < sum(picks) < len(picks)  # a model that always picks one word would agree vacuously
    for data in ("sst.csv", "sst.jsonl", "sst.tsv"):
        res = ev.main([f"--model={ckpt}", "--task=zeroshot", f"--data={tmp_path / data}", "--text_field=sentence",
                       "--verbalizers=good,great", "--device=cpu", "--batch_size=5", f"--out={tmp_path / 'zs.json'}"])
        assert [it["gold"] for it in res["items"]] == gold
        assert [it["pred"] for it in res["items"]] == picks
        got = [ll for it in res["items"] for ll in it["loglikelihoods"]]
        assert got == pytest.approx([ll for pair in hand for ll in pair], abs=1e-4)
        values = {r["metric"]: r for r in res["results"]}
        assert values["acc"]["value"] == pytest.approx(sum(p == g for p, g in zip(picks, gold)) / len(gold))
        assert values["acc"]["count"] == len(texts)
        assert res["details"]["chance"] == 0.5
        assert res["details"]["majority"] == pytest.approx(max(sum(gold), len(gold) - sum(gold)) / len(gold))
        assert json.loads((tmp_path / "zs.json").read_text())["results"] == res["results"]
    from configurator import run
    write_jsonl(tmp_path / "three.jsonl", [{"sentence": t, "label": i % 3} for i, t in enumerate(texts)])
    three = f"--data={tmp_path / 'three.jsonl'}"
    for flags, message in ((["--verbalizers=good"], "verbalizers='good': give a word per label"),
                           ([three], "labels 0, 1, 2 need 3 verbalizers, and verbalizers='good,great' has 2"),
                           (["--label_field=gold"], "row 1 has no text in 'sentence' or no label in 'gold'")):
        with pytest.raises(SystemExit) as e:
            run(ev.main, [f"--model={ckpt}", "--task=zeroshot", f"--data={tmp_path / 'sst.csv'}",
                          "--text_field=sentence", "--verbalizers=good,great", *flags, f"--out={tmp_path / 'x.json'}"])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), (flags, e.value.code)
    assert not (tmp_path / "x.json").exists()  # a failed run writes no results
