"""
Benchmark bpe.py against Hugging Face `tokenizers` (Rust) on the stdlib corpus, and its encoder against
tiktoken.

    python bench/bench_bpe.py                          # vocab 8192 and 32768, 3 runs each, medians
    python bench/bench_bpe.py --vocab_sizes=(8192,) --repeats=5

Corpus: the files of `prepare.py --dataset=stdlib` (the interpreter's standard library .py files, test suites
and site-packages left out, plus the pydoc topic texts; ~12.6 MB), raw (prepare.py also cleans), in sorted
order (prepare.py shuffles). Every 10th document is held out; both trainers get the other nine tenths.

Training, each as a whole process (interpreter start, imports, reading the corpus, training, saving):
  bpe.py:     Tokenizer.train(docs, V, bpe.PATTERNS["gpt2"]).save(path)
  tokenizers: BPE model, pre_tokenizers.Split(bpe.PATTERNS["gpt2"], isolated) + ByteLevel(use_regex=False)
              (the same regex split, bytes shown as GPT-2's printable characters), BpeTrainer(vocab_size=V, the
              256 byte alphabet, <|endoftext|>), train_from_iterator(docs), save(path)
Wall time from subprocess start to exit; CPU time (user + system, worker processes included), which a
loaded machine disturbs less than wall time. Peak memory: a sampler thread sums VmRSS over the process and its
children (bpe.py counts with worker processes) every 20 ms. Runs alternate between the two, so a busy machine
slows both alike; the figures are medians and the ratio is of medians.

Compression: UTF-8 bytes / tokens on the held-out tenth, for both vocabularies.

Encoding throughput (MB/s of UTF-8 text, whole corpus, encode_batch on `threads` threads): our Tokenizer,
tiktoken's gpt2 encoding if it is cached on this machine (it is downloaded on first use; offline it is skipped
and the line says so), the tokenizers vocabulary in its own Rust encoder, and bpe.py's pure-Python reference
encoder on ~0.5 MB of held-out text (for scale: it is the algorithm, not the engine).
"""
import atexit
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import watch_rss

vocab_sizes = (8192, 32768)
repeats = 3
threads = 2  # encode_batch threads
child = ""  # internal: "bpe" or "hf" runs one training in this process (what the benchmark times)
corpus = ""  # internal: the pickled (split pattern, training documents)
vocab_size = 0  # internal: for the child
out = ""  # internal: for the child


def _gpt2_byte_chars():
    """GPT-2's byte -> printable character table (what ByteLevel shows bytes as), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in shown):
        shown[b] = chr(256 + n)
    return {ch: b for b, ch in shown.items()}


_BYTE_OF = _gpt2_byte_chars()


def stdlib_docs():
    """prepare.py --dataset=stdlib's documents before its cleaning, in its sorted file order, unshuffled."""
    # prepare.py's own walk, so the corpus is the one it defines (bench_prepare.py times that script's
    # functions, so bench/ imports it anyway); only here, in the parent, never in the timed children
    from pydoc_data.topics import topics

    from prepare import _stdlib_files
    docs = [p.read_bytes().decode("utf-8", errors="replace") for p in _stdlib_files()[1]]
    return docs + [topics[k] for k in sorted(topics)]


def train_child():
    """One training run, in a process of its own (the thing being timed)."""
    with open(corpus, "rb") as f:
        pattern, docs = pickle.load(f)  # the pattern comes from the parent: the tokenizers child never imports bpe
    if child == "bpe":
        from bpe import Tokenizer
        Tokenizer.train(docs, vocab_size, pattern).save(out)
    else:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer=trainer)
        tok.save(out)


def timed_run(which, corpus_path, v, out_path):
    """Run one training as a whole process; return (wall s, CPU s of the process and its children,
    peak tree RSS in MB)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={which}", f"--corpus={corpus_path}",
           f"--vocab_size={v}", f"--out={out_path}"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    samples, sampler = watch_rss(proc, every=0.02)
    proc.wait()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the worker processes it reaped
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"error: the {which} training run failed (exit {proc.returncode})")
    return wall, cpu, max((kb for _, kb in samples), default=0) / 1024


def mb_per_s(fn, texts, reps=3):
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(texts)
        times.append(time.perf_counter() - t0)
    return nbytes / 1e6 / statistics.median(times)


def main():
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from bpe import PATTERNS, Tokenizer
    docs = stdlib_docs()
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    heldout = [d for i, d in enumerate(docs) if i % 10 == 9]
    heldout_bytes = sum(len(d.encode("utf-8")) for d in heldout)
    print(f"corpus: {len(docs)} stdlib documents, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB; training on "
          f"{sum(len(d.encode()) for d in train) / 1e6:.1f} MB, held out {heldout_bytes / 1e6:.2f} MB")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start "
          f"(shared: other jobs slow both trainers; compare the ratio)\n")
    tmp = tempfile.mkdtemp(prefix="bench_bpe_")
    atexit.register(shutil.rmtree, tmp, True)  # the corpus copy and the trained files go at exit
    corpus_path = os.path.join(tmp, "train.pkl")
    with open(corpus_path, "wb") as f:
        pickle.dump((PATTERNS["gpt2"], train), f)

    results = {}
    for v in vocab_sizes:
        ours_path, hf_path = os.path.join(tmp, f"ours{v}.bpe"), os.path.join(tmp, f"hf{v}.json")
        runs = {"bpe": [], "hf": []}
        for r in range(repeats):
            for which, path in (("bpe", ours_path), ("hf", hf_path)):
                runs[which].append(timed_run(which, corpus_path, v, path))
                wall, cpu, rss = runs[which][-1]
                print(f"  vocab {v} run {r + 1}: {which:<3} {wall:6.2f} s wall {cpu:6.2f} s CPU {rss:5.0f} MB", flush=True)
        ours, hf = Tokenizer.load(ours_path), HFTokenizer.from_file(hf_path)
        ours_bpt = heldout_bytes / sum(map(len, ours.encode_batch(heldout)))
        hf_bpt = heldout_bytes / sum(len(e.ids) for e in hf.encode_batch(heldout))
        med = {w: [statistics.median(x[j] for x in runs[w]) for j in range(3)] for w in runs}
        # the same algorithm should learn nearly the same tokens (ties may be broken differently)
        hf_tokens = {bytes(_BYTE_OF[ch] for ch in t) for t in hf.get_vocab() if t != "<|endoftext|>"}
        overlap = len(hf_tokens.intersection(ours.vocab[256:])) / len(ours.merges)
        results[v] = (med, ours_bpt, hf_bpt, hf.get_vocab_size(), overlap)

    print(f"\ntraining, whole process, median of {repeats} (bpe.py / tokenizers):")
    print(f"{'vocab':>6} | {'wall s':>13} {'ratio':>6} | {'CPU s':>13} {'ratio':>6} | {'peak RSS MB':>11} | "
          f"{'held-out bytes/token':>20} {'diff':>7} | same merged tokens")
    for v, (med, ob, hb, hv, overlap) in results.items():
        (ow, oc, om), (hw, hc, hm) = med["bpe"], med["hf"]
        print(f"{v:>6} | {ow:6.2f} {hw:6.2f} {ow / hw:5.2f}x | {oc:6.2f} {hc:6.2f} {oc / hc:5.2f}x | {om:5.0f} {hm:5.0f} | "
              f"{ob:10.3f} {hb:9.3f} {(ob / hb - 1) * 100:+6.2f}% | {overlap:.1%}"
              + ("" if hv == v else f"  (tokenizers vocab {hv})"))
    print("(each pair of columns: bpe.py, tokenizers)")

    # encoding throughput on the whole corpus, with the first vocabulary trained above
    v = vocab_sizes[0]
    ours, hf = Tokenizer.load(os.path.join(tmp, f"ours{v}.bpe")), HFTokenizer.from_file(os.path.join(tmp, f"hf{v}.json"))
    ours.encode("warm up")
    print(f"\nencoding, MB/s of UTF-8 text, all {len(docs)} documents, encode_batch on {threads} threads:")
    print(f"  bpe.py Tokenizer ({ours.name}, via tiktoken)  {mb_per_s(lambda t: ours.encode_batch(t, num_threads=threads), docs):7.1f}")
    try:
        gpt2 = tiktoken.get_encoding("gpt2")
        print(f"  tiktoken gpt2 (50257 tokens)              "
              f"{mb_per_s(lambda t: gpt2.encode_ordinary_batch(t, num_threads=threads), docs):7.1f}")
    except Exception as e:
        print(f"  tiktoken gpt2: not measured, its vocabulary cannot be downloaded here ({type(e).__name__}); "
              f"the line above is tiktoken's own engine on our ranks")
    print(f"  tokenizers (its {v} vocabulary, Rust)      {mb_per_s(lambda t: hf.encode_batch(t), docs):7.1f}"
          f"  (rayon threads: all cores)")
    sample = [d for d in heldout if len(d) < 50_000][:40]
    sample_mb = sum(len(d.encode()) for d in sample) / 1e6
    print(f"  bpe.py encode_reference (pure Python)     "
          f"{mb_per_s(lambda t: [ours.encode_reference(d) for d in t], sample, reps=1):7.2f}  (on {sample_mb:.2f} MB)")


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    if child:
        train_child()
    else:
        main()
