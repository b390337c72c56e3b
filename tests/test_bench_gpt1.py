"""bench/bench_gpt1.py end to end, on a corpus and a sentiment task the test writes and a model of two
32-wide layers: every row of the report, with a test accuracy per seed at every label count; the
zero-shot curve over every pretraining checkpoint with chance and the majority class; the figure; and a
second run that takes every result it has from the cache and runs only what it lacks."""
import json
import os
import random
import statistics
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

BENCH = os.path.join(ROOT, "bench", "bench_gpt1.py")

GOOD, BAD = "good great fine lovely superb".split(), "bad awful dull poor terrible".split()
FILLER = "the film was a plot with actors and music it is story of this that".split()
PRETRAIN = ("--preset=gpt2 --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 "
            "--gradient_accumulation_steps=1 --max_iters=1 --eval_interval=1 --eval_iters=1 --log_interval=1 "
            "--learning_rate=3e-3 --warmup_iters=1 --dropout=0.0 --device=cpu --dtype=float32 --compile=False")
FINETUNE = "--batch_size=8 --micro_batch_size=8 --max_iters=2 --eval_interval=2 --max_len=32"


def sentence(rnd, label):
    words = [rnd.choice(FILLER) for _ in range(rnd.randint(4, 9))]
    words.insert(rnd.randrange(len(words) + 1), rnd.choice(GOOD if label else BAD))
    return " ".join(words)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bench_gpt1_reports_every_row_and_resumes_from_its_cache(tmp_path):
    rnd = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for i in range(8):  # prose of the task's words: 8 documents of 40 sentences
        text = ". ".join(sentence(rnd, rnd.randint(0, 1)) for _ in range(40))
        (tmp_path / "corpus" / f"{i}.txt").write_text(text + ".\n")
    (tmp_path / "sst").mkdir()
    sizes = {"train": 48, "val": 16, "test": 24}
    for split, n in sizes.items():
        labels = [rnd.randint(0, 1) for _ in range(n)]
        write_jsonl(tmp_path / "sst" / f"{split}.jsonl", [{"sentence": sentence(rnd, y), "label": y} for y in labels])
    test_labels = [json.loads(line)["label"] for line in open(tmp_path / "sst" / "test.jsonl")]
    cmd = [sys.executable, BENCH, f"--corpus={tmp_path}/corpus/*.txt", "--prepare_args=--vocab_size=300",
           f"--pretrain_args={PRETRAIN}", f"--task={tmp_path}/sst", f"--finetune_args={FINETUNE}", "--labels=16,all",
           "--ablation_labels=16", "--student_args=--n_layer=1", f"--out={tmp_path}/gpt1.json",
           f"--work={tmp_path}/work"]
    p = subprocess.run(cmd + ["--seeds=2", "--parts=curves,no_aux_lm,zeroshot"], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpt1.json").read_text())
    rows = report["rows"]
    counts = lambda rows, row: sorted(r["labels"] for r in rows if r["row"] == row)  # noqa: E731
    for row in ("pretrained", "scratch", "bag_of_words"):
        assert counts(rows, row) == [16, 48], row  # --labels=16,all: all is the 48 train rows
    assert counts(rows, "no_aux_lm") == [16]
    for r in rows:
        # --seeds=2, but one (large_seeds) above ablation_labels, and one zero-shot score per checkpoint
        assert r["task"] == "sst" and len(r["seeds"]) == (1 if r["row"] == "zeroshot" or r["labels"] > 16 else 2), r
        assert all(0 <= a <= 1 for a in r["seeds"]) and r["mean"] == pytest.approx(statistics.mean(r["seeds"]))
        assert r["seconds"] > 0
    zeroshot = [r for r in rows if r["row"] == "zeroshot"]
    # every checkpoint of the 1-step run, in order, with each verbalizer pair (the default: two)
    assert [(r["step"], r["words"]) for r in zeroshot] == [(s, w) for s in (0, 1) for w in ("negative,positive",
                                                                                            "bad,good")]
    assert all(r["chance"] == 0.5 for r in zeroshot)
    assert zeroshot[0]["majority"] == max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    assert "curves: " in p.stdout and "zeroshot: " in p.stdout  # each part's wall time
    png = (tmp_path / "gpt1.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # one seed now: seed 0's results come from the cache; only layers_K and distillation run
    again = subprocess.run(cmd + ["--seeds=1", "--parts=curves,no_aux_lm,zeroshot,layers,distilled"], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ran = [line.split()[1] for line in again.stdout.splitlines() if line.startswith("  running ")]
    assert all(key.startswith(("layers_", "distilled-", "student_alone-")) for key in ran), ran
    rows1 = json.loads((tmp_path / "gpt1.json").read_text())["rows"]
    assert [(r["row"], r["labels"], r["seeds"]) for r in rows1[:len(rows)]] == \
        [(r["row"], r["labels"], r["seeds"][:1]) for r in rows]
    assert [r["row"] for r in rows1 if r["row"].startswith("layers_")] == ["layers_0", "layers_1", "layers_2"]
    assert counts(rows1, "layers_2") == counts(rows1, "distilled") == counts(rows1, "student_alone") == [16]
    assert len(ran) == 5 and all(len(r["seeds"]) == 1 for r in rows1)
