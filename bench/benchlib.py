"""
bench/benchlib.py: what the benchmarks share: the repository root on sys.path, the peak memory of a
process tree, running a script with its output to a log, timing a generation, and the pieces of the fine-tuning benchmarks
(bench_finetune.py, bench_gpt1.py): a labelled subset, a finetune.py data folder, finetune.py's final
record, and the bag-of-words floor.

Memory is measured from outside, the same way for every benchmark: a sampler thread reads /proc while the
measured command runs and sums VmRSS over the process and all its descendants. The sum is what the
machine must hold: prepare.py's tokenizer workers and bpe.py's counting workers are children, and
resource.getrusage's ru_maxrss would give only the largest single process. Sampling can miss a peak
shorter than its interval, so the figures are a slight underestimate. Linux only (/proc).
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmarks import the library modules (bpe, checkpoint, shards, ...)


def tree_rss_kb(pid):
    """VmRSS (kB) of pid plus all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += map(int, f.read().split())
        except (OSError, StopIteration):
            pass  # it exited between listing and reading
    return total


def watch_rss(proc, every):
    """Sample tree_rss_kb of the running subprocess proc every `every` seconds, on a daemon thread, until it
    exits. Returns (samples, thread): samples fills with (time.perf_counter(), kB); join the thread after
    proc has ended, then samples is complete."""
    samples = []

    def sample():
        while proc.poll() is None:
            samples.append((time.perf_counter(), tree_rss_kb(proc.pid)))
            time.sleep(every)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return samples, thread


def sh(cmd, log, threads=1):
    """Run a command from the repository root with OMP_NUM_THREADS=threads, its output to log; raise with
    the log's tail if it fails. Returns wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n" + open(log).read()[-3000:])
    return time.perf_counter() - t0


def timed(gen, n, seed=0):
    """(output, tokens/s) of gen(n), a generation of n new tokens per row, timed after an untimed gen(8) (first
    calls allocate) and with torch's RNG seeded, so sampled runs draw alike; tokens/s counts every row."""
    import torch  # here only: the tokenizer and data benchmarks import this file and need no torch
    gen(8)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = gen(n)
    return out, out.size(0) * n / (time.perf_counter() - t0)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows, fields):
    """rows as JSON lines, each holding only `fields`."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in rows)


def labelled_subset(rows, n, seed):
    """(a seeded random n of rows, the rest); n = 0 or n >= len(rows): (all rows, [])."""
    if not n or n >= len(rows):
        return rows, []
    picked = random.Random(seed).sample(range(len(rows)), n)  # the rows random.sample(rows, n) would pick
    chosen = set(picked)
    return [rows[i] for i in picked], [r for i, r in enumerate(rows) if i not in chosen]


def task_folder(d, splits, fields):
    """A finetune.py data folder d/: each split ({name: rows}) as <name>.jsonl with only `fields`. Returns d."""
    os.makedirs(d, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(os.path.join(d, f"{name}.jsonl"), rows, fields)
    return d


def finetune_final(out_dir):
    """The record finetune.py writes last in out_dir/log.jsonl: {"final": {"test": {"accuracy", ...}, "val",
    "best_step", "trainable_params", ...}}'s inner dict."""
    return read_jsonl(os.path.join(out_dir, "log.jsonl"))[-1]["final"]


def bag_of_words(train, test, fields):
    """The floor without a neural network: logistic regression on unigram and bigram counts (scikit-learn),
    the text fields joined. Returns test accuracy and its cost, in finetune_final's terms."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    text = lambda rows: [" ||| ".join(r[f] for f in fields) for r in rows]  # noqa: E731
    t0 = time.perf_counter()
    vec = CountVectorizer(ngram_range=(1, 2), min_df=1)
    x = vec.fit_transform(text(train))
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, [r["label"] for r in train])
    acc = (clf.predict(vec.transform(text(test))) == [r["label"] for r in test]).mean()
    return {"accuracy": float(acc), "trainable_params": int(clf.coef_.size + clf.intercept_.size),
            "optimizer_state_bytes": None, "peak_memory_bytes": None, "seconds": time.perf_counter() - t0}
