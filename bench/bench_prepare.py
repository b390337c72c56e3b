"""
Benchmark prepare.py: throughput (MB/s of raw text, tokens/s), peak memory of the whole process tree (main +
tokenizer workers), and the fraction of plain tiktoken encode_batch speed the full pipeline reaches (same
encoding, same text, same run, same number of threads).

    python bench/bench_prepare.py                 # stdlib corpus + 50 MB and 200 MB local .jsonl
    python bench/bench_prepare.py --sizes=20,80   # smaller, quicker
    python bench/bench_prepare.py --sizes=20 --compare_modes=False   # what bench/README.md's filter section ran

Filters (filters=True): on the real text of a Debian machine (changelogs, copyright files, licences, stdlib),
the whole pipeline with each of PII, near-dedup and decontamination on and off; what MinHash removes, with a
sample of removed pairs and their Jaccard similarity, against datasketch when it is installed; and the PII
step's precision and recall on a labelled sample (how it was labelled: see _TRUE_IPS).

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
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

from benchlib import ROOT, watch_rss  # first: it puts the repository root on sys.path for the imports below
import clean  # the filters prepare.py runs: the near-dedup and PII steps are timed alone below
import prepare  # the code under test: its pipeline's functions are timed one by one below
from bpe import Tokenizer

sizes = "50,200"  # MB of the local .jsonl corpora
num_proc = os.cpu_count() or 1
work_dir = ""  # "" = a temporary folder, removed at the end
compare_modes = True  # also time worker processes vs tiktoken threads vs one process on the stdlib corpus
filters = True  # also the filters on real Debian text: each step's cost, near-duplicates removed, PII precision

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
    docs = [d for b in clean.clean_batches((t for t, _ in prepare._stdlib_docs()), Counter(), prepare.min_chars,
                                           prepare.max_garbage) for d in b]
    batches = list(clean.clean_batches(iter(docs), Counter(), 0, 1.0))
    print(f"tokenizer {tok.name}: trained in the stdlib run ({card['tokenizer']['trained_on']['bytes'] / 1e6:.1f} "
          f"MB); {card['tokens']['bytes_per_token']} bytes/token")
    report("stdlib (the process also trains the BPE: whole-process figures include it)", wall, cpu, rss, card,
           tiktoken_reference(tok, batches, num_proc), per_cpu=False)

    if compare_modes:  # the design choice: worker processes or tiktoken's own threads?
        mb = sum(len(d.encode()) for d in docs) / 1e6
        for label, fn in [
            ("1 process", lambda: [prepare.encode_docs(tok, b, 1) for b in batches]),
            (f"{num_proc} tiktoken threads", lambda: [prepare.encode_docs(tok, b, num_proc) for b in batches]),
            (f"{num_proc} worker processes",
             lambda: list(prepare.encoded_batches(((b, None) for b in batches), tok, num_proc))),
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
                                       "--shard_size=10000000", "--val_tokens=1000000",
                                       "--pii=False", "--near_dedup=False"])  # the copies are near-duplicates
        assert card["documents"]["dropped"]["duplicate"] == 0, "the copies should all be distinct"
        texts = [json.loads(l)["text"] for l in open(path, encoding="utf-8")]
        ref_batches = list(clean.clean_batches(iter(texts), Counter(), 0, 1.0, seen=_NoDedup()))
        del texts
        report(f"local .jsonl, {size} MB", wall, cpu, rss, card,
               tiktoken_reference(tok, ref_batches, num_proc))
        del ref_batches
        os.remove(path)
    if filters:
        bench_steps(tmp, data, tok_path)
        bench_near_duplicates()
        bench_pii()
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are noisy)")
    if not work_dir:
        import shutil
        shutil.rmtree(tmp)


# -----------------------------------------------------------------------------
# the filters on real text: what each costs, what near-dedup removes, how precise PII replacement is

def real_documents():
    """(name, text) of real text on a Debian machine: every package's changelog.Debian.gz and copyright file
    (maintainer and author addresses, version numbers, the same licences copied into hundreds of packages),
    the licence texts of /usr/share/common-licenses (several versions of the GPL, LGPL, GFDL, MPL) and the
    stdlib corpus."""
    import glob
    import gzip
    for f in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")):
        yield f, gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
    for f in sorted(glob.glob("/usr/share/doc/*/copyright")) + sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(f) and not os.path.islink(f):  # GPL -> GPL-3 and the like: exact copies
            yield f, open(f, encoding="utf-8", errors="replace").read()
    root, files = prepare._stdlib_files()
    for f in files:
        yield str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")


def bench_steps(tmp, data, tok_path):
    """The whole pipeline on the real corpus with each filter off and on."""
    docs = list(real_documents())
    path = os.path.join(tmp, "real.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _, text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    # an eval set of 500 passages of 60 words from the middle of random documents of the corpus, LAMBADA's
    # format: the decontamination step has real hits to find (and the copies of those documents too)
    rng = np.random.default_rng(0)
    passages = [" ".join(w[len(w) // 2:len(w) // 2 + 60]) for w in
                (docs[i][1].split() for i in rng.choice(len(docs), 500, replace=False)) if len(w) > 200]
    eval_path = os.path.join(tmp, "lambada_like.jsonl")
    with open(eval_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in passages)
    off = ["--pii=False", "--near_dedup=False"]
    runs = [("all filters off", off),
            ("+ PII", ["--pii=True", "--near_dedup=False"]),
            ("+ near-dedup (MinHash 14x8)", ["--pii=False", "--near_dedup=True"]),
            (f"+ decontaminate ({len(passages)} items)", off + [f"--decontaminate={eval_path}"]),
            ("all on", ["--pii=True", "--near_dedup=True", f"--decontaminate={eval_path}"])]
    print(f"\nfilters: the whole pipeline on {len(docs):,} real documents ({os.path.getsize(path) / 1e6:.0f} MB "
          f"jsonl: Debian changelogs and copyright files, licences, stdlib), {num_proc} worker processes")
    base = None
    for i, (label, flags) in enumerate(runs):
        wall, cpu, rss, card = run_prepare([f"--input={path}", f"--name=real{i}", f"--data_dir={data}",
                                            f"--tokenizer={tok_path}", f"--num_proc={num_proc}", *flags])
        mb, secs, d = card["bytes"]["read"] / 1e6, card["seconds"], card["documents"]
        base = base or secs
        print(f"  {label:<32} {mb / secs:5.2f} MB/s ({secs / base:.2f}x the time of all off), {cpu / mb:.2f} CPU s "
              f"per MB, peak RSS {max(rss):.0f} MB; kept {d['kept']:,}, near-duplicates "
              f"{d['dropped']['near_duplicate']:,}, contaminated {d['dropped']['contaminated']:,}, PII "
              f"{card['pii'] and {k: v['replaced'] for k, v in card['pii'].items()}}")


def bench_near_duplicates(sample_pairs=12):
    """What MinHash removes from the Debian documents (no stdlib), with a sample of removed pairs, and the
    cost of the step alone against datasketch's MinHash on the same shingles."""
    docs = [(n, clean.clean(t, Counter(), 64, 0.25)) for n, t in real_documents() if n.startswith("/usr")]
    docs = [(n, t) for n, t in docs if t]
    words = [clean.word_hashes(t) for _, t in docs]
    mb = sum(len(t.encode()) for _, t in docs) / 1e6
    near = clean.NearDuplicates(14, 8)
    t0 = time.perf_counter()
    dup = np.concatenate([near.duplicates(words[i:i + 500]) for i in range(0, len(words), 500)])
    secs = time.perf_counter() - t0
    print(f"\nnear-duplicates: {len(docs):,} Debian documents ({mb:.0f} MB): {dup.sum():,} removed "
          f"({dup.mean():.0%}) by MinHash 14 x 8 on word 5-grams; the step alone (words, shingles, signatures, index) "
          f"{mb / secs:.1f} MB/s on one core, index {near.index.count * 8 / len(docs):.0f} bytes per document")
    # a sample of removed documents, each with the earlier kept or removed document it is closest to
    shingles = [set(clean.ngram_hashes(w, 5).tolist()) for w in words]
    rng = np.random.default_rng(0)
    for i in sorted(rng.choice(np.flatnonzero(dup), size=min(sample_pairs, int(dup.sum())), replace=False)):
        j = max(range(i), key=lambda j: len(shingles[i] & shingles[j]) / max(1, len(shingles[i] | shingles[j])))
        jac = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
        print(f"  J={jac:.2f}  removed {_short(docs[i][0])}  ~  {_short(docs[j][0])}")
    lic = [i for i, (n, _) in enumerate(docs) if n.startswith("/usr/share/common-licenses/")]
    best = lambda i: max((j for j in range(len(docs)) if j != i),  # noqa: E731
                         key=lambda j: len(shingles[i] & shingles[j]) / max(1, len(shingles[i] | shingles[j])))
    print("  the licence texts: " + ", ".join(
        f"{os.path.basename(docs[i][0])} " + (f"removed (~{_short(docs[best(i)][0])})" if dup[i] else "kept")
        for i in lic))
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        print("  (pip install datasketch to compare with its MinHash and MinHashLSH)")
        return
    import tracemalloc
    texts = [" ".join(_WORDS_RE.sub("", t.lower()).split()) for _, t in docs]
    t0 = time.perf_counter()
    lsh, ndup = MinHashLSH(num_perm=112, params=(14, 8)), 0
    tracemalloc.start()
    for k, t in enumerate(texts):
        w = t.split()
        grams = [" ".join(w[a:a + 5]).encode() for a in range(max(1, len(w) - 4))]
        m = MinHash(num_perm=112)
        m.update_batch(grams)
        ndup += bool(lsh.query(m))
        lsh.insert(k, m)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    secs_ds = time.perf_counter() - t0
    print(f"  datasketch 2 (MinHash(num_perm=112).update_batch, MinHashLSH params=(14, 8)), same documents: "
          f"{ndup:,} removed, {mb / secs_ds:.1f} MB/s, index ~{size / len(texts):.0f} bytes per document "
          f"(traced Python memory; its default SHA-1 per shingle makes most of the time)")


_WORDS_RE = clean._NOT_WORD


def _short(path):
    """/usr/share/doc/PKG/FILE -> PKG/FILE"""
    return "/".join(path.split("/")[-2:])

# How the PII sample was labelled: candidates are every string on the machine shaped like an e-mail address
# (text@text.text) or an IP address (a dotted quad, or colon-separated hex); a candidate is an address if it
# is one in its context, whoever it belongs to (authors, maintainers, mailing lists, doctest examples count;
# decorators, version numbers, OIDs, section numbers, times and slices do not). I read 120 e-mail candidates
# (60 at random from the Debian files, 60 from the stdlib): every one with text before the @ was an address,
# every one without (@abc.abstractmethod) a decorator, so the label below is that rule. Every IP candidate
# that Python's ipaddress reads as a public address was read in context (3,400 strings, 450 distinct lines,
# nearly all of them version numbers): the addresses among them are these four.
_TRUE_IPS = {("socket.py", "123.45.67.89"), ("uuid.py", "123:2:3:4:5:6:7:8"), ("openssh-client", "1.2.3.4")}


def bench_pii(n=60):
    import ipaddress
    import random
    email = re.compile(r"[^\s<>()\"',;`]*@[^\s<>()\"',;`]*\.[^\s<>()\"',;`]*[A-Za-z]")
    ip = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.]\d)|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")
    docs = list(real_documents())
    t0, stats = time.perf_counter(), Counter()
    for _, t in docs:
        clean.remove_pii(t, stats)
    secs, mb = time.perf_counter() - t0, sum(len(t.encode()) for _, t in docs) / 1e6

    def replaced(t, m):  # was this candidate replaced, in the context of its own line?
        a, b = t.rfind("\n", 0, m.start()) + 1, t.find("\n", m.end())
        line = t[a:b if b >= 0 else len(t)]
        return m.group() not in clean.remove_pii(line, Counter())
    cands = {"stdlib": [], "debian": []}
    ips = []
    for name, t in docs:
        for m in email.finditer(t):
            cands["debian" if name.startswith("/usr") else "stdlib"].append((t, m))
        for m in ip.finditer(t):
            try:
                a = ipaddress.ip_address(m.group())
            except ValueError:
                continue
            if a.is_global and not a.is_multicast:
                ips.append((os.path.basename(name) if not name.startswith("/usr/share/doc") else name.split("/")[4],
                            t, m))
    rng = random.Random(0)
    sample = [c for k in ("debian", "stdlib") for c in rng.sample(cands[k], n)]
    tp = sum(m.group()[0] != "@" and replaced(t, m) for t, m in sample)
    fp = sum(m.group()[0] == "@" and replaced(t, m) for t, m in sample)
    fn = sum(m.group()[0] != "@" and not replaced(t, m) for t, m in sample)
    print(f"\nPII on {len(docs):,} real documents ({mb:.0f} MB): {dict(stats)}; remove_pii alone {mb / secs:.1f} MB/s")
    print(f"  e-mail, {len(sample)} labelled candidates ({n} Debian, {n} stdlib): precision "
          f"{tp / max(1, tp + fp):.3f}, recall {tp / max(1, tp + fn):.3f} ({tp} replaced addresses, {fp} wrongly "
          f"replaced, {fn} missed)")
    tp = sum((f, m.group()) in _TRUE_IPS and replaced(t, m) for f, t, m in ips)
    fp = [(f, m.group()) for f, t, m in ips if (f, m.group()) not in _TRUE_IPS and replaced(t, m)]
    fn = sum((f, m.group()) in _TRUE_IPS and not replaced(t, m) for f, t, m in ips)
    print(f"  IP, all {len(ips):,} public-address-shaped strings: precision {tp / max(1, tp + len(fp)):.2f}, recall "
          f"{tp / max(1, tp + fn):.2f} ({tp} replaced addresses, {len(fp)} wrongly replaced: {fp}, {fn} missed)")


class _NoDedup:
    """For the reference batches: keep every document (they are distinct anyway)."""

    def add(self, h):
        import numpy as np
        return np.ones(len(h), bool)


if __name__ == "__main__":
    main()
