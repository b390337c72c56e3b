"""
Benchmark prepare.py: throughput (MB/s of raw text, tokens/s), peak memory of the whole process tree (main +
tokenizer workers), and the fraction of plain tiktoken encode_batch speed the full pipeline reaches (same
encoding, same text, same run, same number of threads).

    python bench/bench_prepare.py                 # stdlib corpus + 50 MB and 200 MB local .jsonl
    python bench/bench_prepare.py --sizes=20,80   # smaller, quicker

Corpora: the stdlib corpus (prepare.py --dataset=stdlib, which also trains the 4096-token BPE used everywhere
here), then .jsonl files of the given sizes built from the cleaned stdlib documents, each copy given a distinct
first line ("# copy k of <file>") so exact dedup keeps them all and the text stays real. The local runs use
--shard_size=10M tokens so that both sizes span several shards: peak memory should not grow with the corpus.

Each prepare.py run is a subprocess; a sampler thread sums VmRSS over it and its children every 50 ms.
The tiktoken reference encodes the same documents, already in memory, with Encoding.encode_ordinary_batch on
num_proc threads: no reading, cleaning, dedup, or writing. On a machine shared with other jobs wall time
swings with their load, so CPU seconds per MB (this process and its children, from getrusage) are printed
too: they compare the work done per MB regardless of how many cores the others left free, and "cores busy"
(CPU / wall) shows how much parallelism each way of encoding actually got.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter

from benchlib import ROOT, watch_rss  # first: it puts the repository root on sys.path for the imports below
import prepare  # the code under test: its pipeline's functions are timed one by one below
from bpe import Tokenizer

sizes = "50,200"  # MB of the local .jsonl corpora
num_proc = os.cpu_count() or 1
work_dir = ""  # "" = a temporary folder, removed at the end
compare_modes = True  # also time worker processes vs tiktoken threads vs one process on the stdlib corpus

if __name__ == "__main__":
    from configurator import configure
    configure(globals())


def cpu_seconds():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_prepare(args):
    """Run prepare.py with args; return (wall s, CPU s of the whole process tree, peak tree RSS in MB per
    quarter of the run, card)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    proc = subprocess.Popen([sys.executable, "prepare.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    samples, sampler = watch_rss(proc, every=0.05)  # (perf_counter, tree RSS in kB)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        sys.exit(f"prepare.py {' '.join(args)} failed:\n{out[-3000:]}")
    data_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--data_dir="))
    name = next((a.split("=", 1)[1] for a in args if a.startswith("--name=")), "stdlib")
    quarters = [max((r for t, r in samples if q * wall / 4 <= t - t0 < (q + 1) * wall / 4), default=0) / 1024
                for q in range(4)]  # flat memory: the last quarters peak no higher than the first ones
    with open(os.path.join(data_dir, name, "card.json")) as f:
        return wall, cpu_seconds() - c0, quarters, json.load(f)


def tiktoken_reference(tok, batches, threads):
    """(wall s, CPU s) for plain tiktoken to encode the batches (best of 2 for small inputs)."""
    enc = tok.enc  # bpe.Tokenizer encodes through this tiktoken.Encoding
    best = (float("inf"), 0)
    for _ in range(2 if sum(map(len, batches)) < 20_000 else 1):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for b in batches:
            enc.encode_ordinary_batch(b, num_threads=threads)
        best = min(best, (time.perf_counter() - t0, cpu_seconds() - c0))
    return best


def report(label, wall, cpu, rss, card, ref, per_cpu=True):
    mb, tokens, secs = card["bytes"]["read"] / 1e6, card["tokens"]["total"], card["seconds"]
    (ref_s, ref_cpu), kept = ref, card["bytes"]["kept"] / 1e6  # the reference encodes the cleaned text
    print(f"{label}: {mb:.1f} MB, {tokens / 1e6:.2f}M tokens, {len(card['shards'])} shards\n"
          f"  pipeline {secs:.1f} s: {mb / secs:.2f} MB/s, {tokens / secs / 1e6:.2f}M tokens/s "
          f"(whole process {wall:.1f} s, {cpu / mb:.2f} CPU s per MB, {cpu / wall:.2f} cores busy)\n"
          f"  plain tiktoken encode_ordinary_batch, {num_proc} threads, same text: {kept / ref_s:.2f} MB/s, "
          f"{ref_cpu / kept:.2f} CPU s per MB; the pipeline reaches {ref_s / secs:.0%} of its speed"
          + (f", {ref_cpu / kept / (cpu / mb):.0%} of its speed per CPU second" if per_cpu else "") + "\n"
          f"  peak RSS of main + workers: {max(rss):.0f} MB (per quarter of the run: "
          f"{', '.join(f'{r:.0f}' for r in rss)} MB)")


def main():
    tmp = work_dir or tempfile.mkdtemp(prefix="bench_prepare_")
    data = os.path.join(tmp, "data")
    print(f"{num_proc} worker processes, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"work dir {tmp}")

    # 1. stdlib: the quick start's corpus; also trains the tokenizer used below
    wall, cpu, rss, card = run_prepare(["--dataset=stdlib", f"--data_dir={data}", f"--num_proc={num_proc}"])
    tok_path = os.path.join(data, "stdlib", "tokenizer.bpe")
    tok = Tokenizer.load(tok_path)
    docs = [d for b in prepare.clean_batches(prepare._stdlib_docs(), Counter(), prepare.min_chars,
                                             prepare.max_garbage) for d in b]
    batches = list(prepare.clean_batches(iter(docs), Counter(), 0, 1.0))
    print(f"tokenizer {tok.name}: trained in the stdlib run ({card['tokenizer']['trained_on']['bytes'] / 1e6:.1f} "
          f"MB); {card['tokens']['bytes_per_token']} bytes/token")
    report("stdlib (the process also trains the BPE: whole-process figures include it)", wall, cpu, rss, card,
           tiktoken_reference(tok, batches, num_proc), per_cpu=False)

    if compare_modes:  # the design choice: worker processes or tiktoken's own threads?
        mb = sum(len(d.encode()) for d in docs) / 1e6
        for label, fn in [
            ("1 process", lambda: [prepare.encode_docs(tok, b, 1) for b in batches]),
            (f"{num_proc} tiktoken threads", lambda: [prepare.encode_docs(tok, b, num_proc) for b in batches]),
            (f"{num_proc} worker processes", lambda: list(prepare.encoded_batches(iter(batches), tok, num_proc))),
        ]:
            runs = []  # (wall s, CPU s of this process and its finished children): CPU/wall = cores used,
            for _ in range(3):  # which the other users of a shared machine disturb less than wall time
                t0, c0 = time.perf_counter(), cpu_seconds()
                fn()
                runs.append((time.perf_counter() - t0, cpu_seconds() - c0))
            wall, cpu = sorted(runs)[1]
            print(f"  encode stdlib to uint16, {label:<22}: {mb / wall:5.2f} MB/s (median of 3), "
                  f"{cpu / mb:.2f} CPU s per MB, {cpu / wall:.2f} cores busy")

    # 2. local .jsonl corpora of growing size, through the datasets streaming path
    for size in [int(s) for s in sizes.split(",")]:
        path = os.path.join(tmp, f"corpus_{size}mb.jsonl")
        files = [f.relative_to(prepare._stdlib_files()[0]).as_posix() for f in prepare._stdlib_files()[1]]
        written, copy = 0, 0
        with open(path, "w", encoding="utf-8") as f:
            while written < size * 1e6:
                for i, d in enumerate(docs):
                    doc = f"# copy {copy} of {files[i] if i < len(files) else 'pydoc topic'}\n{d}"
                    f.write(json.dumps({"text": doc}) + "\n")
                    written += len(doc.encode())
                    if written >= size * 1e6:
                        break
                copy += 1
        wall, cpu, rss, card = run_prepare([f"--input={path}", f"--name=local{size}", f"--data_dir={data}",
                                       f"--tokenizer={tok_path}", f"--num_proc={num_proc}",
                                       "--shard_size=10000000", "--val_tokens=1000000"])
        assert card["documents"]["dropped"]["duplicate"] == 0, "the copies should all be distinct"
        texts = [json.loads(l)["text"] for l in open(path, encoding="utf-8")]
        ref_batches = list(prepare.clean_batches(iter(texts), Counter(), 0, 1.0, seen=_NoDedup()))
        del texts
        report(f"local .jsonl, {size} MB", wall, cpu, rss, card,
               tiktoken_reference(tok, ref_batches, num_proc))
        del ref_batches
        os.remove(path)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are noisy)")
    if not work_dir:
        import shutil
        shutil.rmtree(tmp)


class _NoDedup:
    """For the reference batches: keep every document (they are distinct anyway)."""

    def add(self, h):
        import numpy as np
        return np.ones(len(h), bool)


if __name__ == "__main__":
    main()
