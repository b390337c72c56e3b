r"""
prepare.py: raw text in, clean deduplicated token shards and a data card out.

    python prepare.py --dataset=stdlib                  # offline: the Python standard library (quick start)
    python prepare.py                                   # FineWeb-Edu sample-10BT, GPT-2 tokens (needs the hub)
    python prepare.py --input='corpus/*.jsonl' --name=mine --tokenizer=train --vocab_size=8192

Documents flow through one streaming pipeline, so a 10B-token corpus never has to fit in memory:

    source -> clean -> deduplicate -> tokenize (num_proc workers, order kept) -> shard buffer -> .bin files

Sources. FineWeb-Edu (HuggingFaceFW/fineweb-edu, --hf_config=sample-10BT by default) or any hub dataset
("owner/name", --text_field), streamed with datasets.load_dataset(..., streaming=True); local .jsonl and
.parquet files through the same datasets streaming path; local .txt files (one document per file, or split
on --separator); and `stdlib`: the .py sources of the interpreter running this script (test suites and
site-packages left out, ~12 MB) plus the pydoc topic texts, one document per file. stdlib is real text nobody
here wrote, exists wherever Python does, and needs no network: the quick start uses it. Its documents come in
a fixed shuffled order, so val (the first tokens) is a random tenth of the modules, not the a-z head of
the library; other sources keep their own order. The hub is probed with a 5 s timeout first, so an
offline machine gets a one-line error naming the offline options instead of a hang.

Cleaning, each step counted in the card, in this order: line endings to "\n"; drop documents that are mostly
garbage (U+FFFD replacement characters or control characters: binary files, bad decodes); strip control
characters other than "\n" and "\t"; Unicode NFC (so the same text always has the same bytes, hence the same
tokens and the same hash); drop documents shorter than min_chars; drop exact duplicates of the normalised
text. Dedup keeps a 64-bit BLAKE2b digest per distinct document (8 bytes each, in sorted numpy runs, see
HashSet) rather than the texts; a 64-bit digest makes a false duplicate among 10^7 documents a ~3e-6 event.

Tokens. --tokenizer=gpt2 (tiktoken's GPT-2 encoding), a .bpe file saved by bpe.py, or `train` (the default
for stdlib): train a byte-level BPE with bpe.py on the first bpe_train_mb MB of the cleaned corpus, then use
it. Every document is preceded by <|endoftext|>, as in llm.c's fineweb.py, so the model sees a document
boundary before each start. Encoding runs in num_proc worker processes fed ~1 MB batches in order, with a
bounded number in flight, so output is deterministic and memory does not grow with the corpus. Processes,
not tiktoken's encode_batch threads: on 2 cores the threads ran at about the speed of one (the workers also
turn ids into uint16 arrays in parallel); bench/bench_prepare.py measures both.

Shards use llm.c's format so the two are interchangeable: a header of 256 int32 (magic 20240520, version 1,
token count), then the tokens as uint16 (so a vocabulary must fit 65,536 ids). The first
min(val_tokens, val_fraction * corpus) tokens go to {name}_val_000000.bin (llm.c's convention: shard 0 is
validation; the fraction cap keeps a small corpus from going all to val), then shard_size tokens per
{name}_train_000001.bin, ... The split is cut at a token, not a document boundary, so together the shards
are exactly the token stream. Each file is written to a temporary name and renamed when complete; a re-run
first removes the previous run's shards and card. tokenizer.bpe and card.json + README.md (the data card:
source, licence, command, counts per filter, tokens per split, bytes per token) are written last, so their
presence marks a complete run; command.txt is written first. A run that fails removes the folder it made;
Ctrl-C keeps the complete shards written so far.

Memory: one shard buffer (max(val_tokens + shard_size, val_tokens / val_fraction) uint16, 220 MB at the
defaults), the batches in flight, the workers, and 8 bytes per distinct document for dedup.
"""
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import shutil
import socket
import sys
import threading
import time
import unicodedata
from collections import Counter, deque
from datetime import datetime, timezone
from glob import escape as glob_escape, glob
from itertools import chain
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from atomic import atomic_write
from bpe import Tokenizer, fix_surrogates, ignore_sigint
from configurator import UserError, configure, run
from shards import MAGIC, MAX_VOCAB, VERSION, write_shard

# -----------------------------------------------------------------------------
# settings: override with a config file and/or --key=value (see configurator.py)
dataset = "fineweb_edu"  # "fineweb_edu" (HuggingFaceFW/fineweb-edu), "stdlib" (offline), or a hub "owner/name"
hf_config = ""  # hub dataset config; "" = sample-10BT for fineweb_edu, the dataset's default otherwise
revision = ""  # hub revision (branch, tag or commit); "" = the default branch
split = "train"  # hub split to stream
text_field = "text"  # column holding the text (hub, .jsonl, .parquet)
input = ""  # local PATH or glob of .txt / .jsonl / .parquet files; when set, `dataset` is not used
separator = ""  # .txt only: split each file into documents on this string; "" = one document per file
name = ""  # output folder data_dir/<name>/ and shard prefix; "" = stdlib, fineweb_edu, or from the input
license = ""  # licence of a local corpus as you know it, for the data card ("" = unknown)
data_dir = "data"
tokenizer = ""  # "gpt2", a path to a .bpe file, or "train"; "" = train for stdlib, gpt2 otherwise
vocab_size = 4096  # --tokenizer=train; small for the CPU quick start (GPT-1's recipe: 256 + 40,000 merges + 1)
bpe_train_mb = 100  # --tokenizer=train: train on the first this many MB (10^6 bytes) of cleaned text
min_chars = 64  # drop shorter documents (stdlib: empty __init__.py files and one-line stubs)
max_garbage = 0.25  # drop documents whose characters are more than this fraction U+FFFD or control chars
shard_size = 100_000_000  # tokens per train shard (llm.c's FineWeb shards: 100M)
val_tokens = 10_000_000  # validation gets the first min(val_tokens, val_fraction * corpus) tokens
val_fraction = 0.1
num_proc = os.cpu_count() or 1  # tokenizer worker processes
# -----------------------------------------------------------------------------

_FINEWEB = "HuggingFaceFW/fineweb-edu"
_FINEWEB_LICENSE = ("ODC-By 1.0 (Open Data Commons Attribution License), as stated on the dataset card; "
                    "use is also subject to CommonCrawl's Terms of Use")
_TOO_BIG = (f"does not fit the uint16 token shards (ids must be below {MAX_VOCAB:,}, as in llm.c's format); "
            f"use a vocabulary of at most {MAX_VOCAB:,}")
_BATCH_CHARS = 1 << 20  # documents are cleaned, deduplicated and encoded in batches of ~1M characters


# -----------------------------------------------------------------------------
# cutting the token stream into shard files (the format itself: shards.py)

class ShardWriter:
    """Cuts the token stream into shards: val first, then train shards of shard_size tokens.

    Until the first flush we cannot know whether val_tokens or val_fraction of the corpus is smaller, so the
    buffer holds enough to decide: at val_tokens / val_fraction tokens, val_tokens is the smaller for sure.
    """

    def __init__(self, out_dir, name, shard_size, val_tokens, val_fraction):
        self.out_dir, self.name = out_dir, name
        self.shard_size, self.val_tokens, self.val_fraction = shard_size, val_tokens, val_fraction
        self.buf = np.empty(max(shard_size + val_tokens, math.ceil(val_tokens / val_fraction)), np.uint16)
        self.n = 0  # tokens in buf
        self.shards = []  # one dict per written file, for the card
        self.next_train = 1  # llm.c numbering: val is shard 0, train shards count from 1

    def add(self, tokens):
        while len(tokens):
            k = min(len(tokens), len(self.buf) - self.n)
            self.buf[self.n:self.n + k] = tokens[:k]
            self.n, tokens = self.n + k, tokens[k:]
            if self.n == len(self.buf):
                self._flush(final=False)

    def finish(self):
        self._flush(final=True)
        return self.shards

    def _flush(self, final):
        start = 0
        if not self.shards:  # the first flush decides the val split
            nval = min(self.val_tokens, max(1, int(self.n * self.val_fraction)))
            if nval and self.n:
                self._write("val", self.buf[:nval])
            start = nval
        while self.n - start >= self.shard_size or (final and self.n > start):
            end = min(start + self.shard_size, self.n)
            self._write("train", self.buf[start:end])
            start = end
        self.buf[:self.n - start] = self.buf[start:self.n]  # keep the partial shard (numpy handles overlap)
        self.n -= start

    def _write(self, split, tokens):
        index = 0 if split == "val" else self.next_train
        self.next_train += split == "train"
        fname = f"{self.name}_{split}_{index:06d}.bin"
        write_shard(os.path.join(self.out_dir, fname), tokens)
        self.shards.append({"file": fname, "split": split, "tokens": len(tokens)})
        print(f"wrote {fname}: {len(tokens):,} tokens")


# -----------------------------------------------------------------------------
# sources: each is a function returning a fresh iterator of raw document strings (the tokenizer trainer
# reads the first MBs, then the full pass starts again from the beginning)

def _stdlib_files():
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # prune: site-packages can be huge
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())  # the same order on every machine
    # pydoc_data/topics.py is a dict literal of the topic texts, which come in below as plain text instead
    return root, [p for p in files if p.relative_to(root).as_posix() != "pydoc_data/topics.py"]


def _stdlib_docs():
    from pydoc_data.topics import topics
    docs = _stdlib_files()[1] + sorted(topics)
    # a fixed-seed shuffle of the sorted list: the same order on every run, but val (the first tokens) is a
    # random tenth of the modules, and train.py, which reads shards in order, sees them mixed, not a-z
    random.Random(1337).shuffle(docs)
    for doc in docs:
        if isinstance(doc, str):  # a pydoc topic name
            yield topics[doc]
        else:  # raw bytes: the cleaner sees any \r
            yield doc.read_bytes().decode("utf-8", errors="replace")


def _txt_docs(files, separator):
    for path in files:
        # newline="" keeps \r\n as written, so the line-ending fix is counted; bad bytes become U+FFFD
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            if not separator:
                yield f.read()
                continue
            rest = ""  # read 1 MB at a time so a huge file split into documents streams too
            for chunk in iter(lambda: f.read(1 << 20), ""):
                *docs, rest = (rest + chunk).split(separator)
                yield from docs
            yield rest


def _datasets_docs(load_args, text_field, what):
    """Stream text_field of a datasets.load_dataset(**load_args, streaming=True) source, in batches
    (one Arrow-to-Python conversion per 1000 rows instead of one per row)."""
    import datasets
    # without this, streaming imports torch (~3 s, ~300 MB) only to share a counter with DataLoader workers
    datasets.config.TORCH_AVAILABLE = False
    # datasets logs each error it then raises; the raise becomes our one line, so the log would repeat it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(**load_args, streaming=True)
    except Exception as e:
        raise UserError(f"cannot load {what}: {_first_line(e)}")
    if ds.column_names is not None:  # known up front for local files; the hub may only know at the first row
        if text_field not in ds.column_names:
            raise UserError(f"{what} has no column '{text_field}' (columns: "
                             f"{', '.join(ds.column_names)}); set --text_field")
        ds = ds.select_columns([text_field])
    rows = ds.iter(batch_size=1000)
    while True:
        try:  # only the read is guarded, not the yield below (that is where the consumer's errors surface)
            batch = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a malformed JSON line or a corrupt file, found mid-stream
            raise UserError(f"cannot read {what}: {_first_line(e)}")
        if text_field not in batch:
            raise UserError(f"{what} has no column '{text_field}' (columns: {', '.join(batch)}); "
                             f"set --text_field")
        for t in batch[text_field]:
            if t is not None and not isinstance(t, str):  # an int, a list, bytes: not a text column
                raise UserError(f"{what}: column '{text_field}' holds {type(t).__name__} values, not text "
                                f"(e.g. {str(t)[:40]!r}); point --text_field at a column of strings")
            yield t  # None (a null or missing text) is counted in the card as such


def _first_line(e):
    return f"{type(e).__name__}: " + (str(e).splitlines() or [""])[0]


def _check_hub(timeout=5.0):
    """Fail within `timeout` seconds, with the offline options, when the hub cannot be reached. The probe
    runs in a thread because a DNS lookup can block far longer than any socket timeout."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    hint = ("offline, use --dataset=stdlib (the Python standard library) or --input=PATH "
            "(local .txt/.jsonl/.parquet files)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"HF_HUB_OFFLINE is set, so the hub cannot be streamed from; {hint}")
    outcome = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome or outcome[0] is not None:
        why = f"{outcome[0]}" if outcome else f"no answer in {timeout:.0f} s"
        raise UserError(f"cannot reach the Hugging Face hub at {host}:{port} ({why}); {hint}")


def _safe_name(s):
    return re.sub(r"[^a-z0-9_.-]+", "_", s.lower()).strip("_.") or "corpus"


def resolve_source(cfg):
    """Return (name, docs_fn, source_info) for the settings: docs_fn() starts a fresh document stream."""
    if cfg.input:
        files = sorted(glob(cfg.input)) if any(c in cfg.input for c in "*?[") else [cfg.input]
        if not files or not all(os.path.isfile(f) for f in files):
            missing = next((f for f in files if not os.path.isfile(f)), cfg.input)
            raise UserError(f"input '{missing}' " + ("matches no file" if not files else
                             "does not exist or is not a file") + "; check --input")
        kinds = {Path(f).suffix.lower() for f in files}
        if len(kinds) > 1 or not kinds <= {".txt", ".jsonl", ".json", ".parquet"}:
            raise UserError(f"--input must be .txt, .jsonl or .parquet files of one kind, got "
                             f"{', '.join(sorted(kinds))}")
        kind = kinds.pop()
        pattern = Path(cfg.input)  # default name: the file's stem, or the folder of a glob like corpus/*.txt
        name = cfg.name or _safe_name(pattern.parent.name if files != [cfg.input] else pattern.stem)
        info = {"kind": "local files", "input": cfg.input, "format": kind.lstrip("."),
                "files": [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files[:1000]],
                "num_files": len(files), "license": cfg.license or "unknown (not stated for local input)"}
        if kind == ".txt":
            info["separator"] = cfg.separator or None
            return name, lambda: _txt_docs(files, cfg.separator), info
        info["text_field"] = cfg.text_field
        load_args = {"path": "parquet" if kind == ".parquet" else "json", "data_files": files, "split": "train"}
        return name, lambda: _datasets_docs(load_args, cfg.text_field, f"--input={cfg.input}"), info
    if cfg.dataset == "stdlib":
        import platform
        root, files = _stdlib_files()
        info = {"kind": "python standard library", "python": platform.python_version(), "root": str(root),
                "num_files": len(files), "also": "pydoc_data.topics texts, one document per topic",
                "excluded": "site-packages, test/tests/idle_test folders, pydoc_data/topics.py",
                "license": f"PSF License Version 2 (Python Software Foundation), see {root / 'LICENSE.txt'}"}
        return cfg.name or "stdlib", _stdlib_docs, info
    repo = _FINEWEB if cfg.dataset in ("fineweb_edu", _FINEWEB) else cfg.dataset
    config = cfg.hf_config or ("sample-10BT" if repo == _FINEWEB else None)
    _check_hub()
    info = {"kind": "hugging face hub", "dataset": repo, "config": config, "split": cfg.split,
            "revision": cfg.revision or "default branch", "text_field": cfg.text_field,
            "license": f"not stated; see https://huggingface.co/datasets/{repo}"}
    try:  # record the exact commit streamed, so the card pins the data, and the licence its card states
        from huggingface_hub import HfApi
        hub_info = HfApi().dataset_info(repo, revision=cfg.revision or None, timeout=10)
        info["commit"] = hub_info.sha
        stated = hub_info.card_data and hub_info.card_data.get("license")
        info["license"] = f"{stated} (as stated by the dataset card)" if stated else info["license"]
    except Exception as e:
        info["commit"] = f"unknown ({type(e).__name__})"
    if repo == _FINEWEB:
        info["license"] = _FINEWEB_LICENSE
    name = cfg.name or ("fineweb_edu" if repo == _FINEWEB else _safe_name(repo.split("/")[-1]))
    load_args = {"path": repo, "name": config, "split": cfg.split, "revision": cfg.revision or None}
    return name, lambda: _datasets_docs(load_args, cfg.text_field, repo), info


# -----------------------------------------------------------------------------
# cleaning and exact deduplication

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls except \t and \n (\r is gone by then)


def clean(text, stats, min_chars, max_garbage):
    """Return the cleaned text, or None if the document is dropped; counts every change in stats."""
    text = fix_surrogates(text)  # split pairs joined, lone surrogates to U+FFFD: bpe.py's rule
    stats["bytes_read"] += len(text.encode("utf-8"))
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        stats["fixed_line_endings"] += 1
    stripped = _CONTROL.sub("", text)
    if text and (len(text) - len(stripped) + stripped.count("\ufffd")) > max_garbage * len(text):
        stats["dropped_garbage"] += 1
        return None
    if len(stripped) != len(text):
        stats["stripped_control_chars"] += 1
    if not unicodedata.is_normalized("NFC", stripped):  # a fast check; most text is already NFC
        stripped = unicodedata.normalize("NFC", stripped)
        stats["nfc_changed"] += 1
    if len(stripped) < min_chars:
        stats["dropped_short"] += 1
        return None
    return stripped


class HashSet:
    """An exact set of 64-bit hashes at 8 bytes each: sorted numpy runs merged like a binary counter (a tiny
    LSM tree), so lookups are a binary search per run and there are O(log n) runs. A Python set of ints
    would cost ~70 bytes per document: 0.7 GB for FineWeb-Edu's 10M-document sample."""

    def __init__(self):
        self.runs = []  # sorted, disjoint uint64 arrays, each more than twice as long as the next

    def add(self, h):
        """Insert the hashes h (uint64, in document order); return a bool mask, True where h[i] is new
        (its first occurrence in h, and not already in the set)."""
        uniq, first = np.unique(h, return_index=True)
        fresh = np.ones(len(uniq), bool)
        for run in self.runs:
            i = np.minimum(np.searchsorted(run, uniq), len(run) - 1)
            fresh &= run[i] != uniq
        new = np.zeros(len(h), bool)
        new[first[fresh]] = True
        run = uniq[fresh]
        while self.runs and len(self.runs[-1]) <= 2 * len(run):  # each hash is merged O(log n) times
            run = np.sort(np.concatenate([self.runs.pop(), run]))
        if len(run):
            self.runs.append(run)
        return new


def clean_batches(docs, stats, min_chars, max_garbage, seen=None):
    """Yield lists of cleaned, deduplicated documents (~_BATCH_CHARS characters each) from raw docs."""
    seen = HashSet() if seen is None else seen
    batch, chars = [], 0
    for text in docs:
        stats["read"] += 1
        if text is None:
            stats["dropped_missing"] += 1
            continue
        text = clean(text, stats, min_chars, max_garbage)
        if text is not None:
            batch.append(text)
            chars += len(text)
        if chars >= _BATCH_CHARS:
            yield _dedup(batch, stats, seen)
            batch, chars = [], 0
    if batch:
        yield _dedup(batch, stats, seen)


def _dedup(batch, stats, seen):
    data = [t.encode("utf-8") for t in batch]
    digests = b"".join(hashlib.blake2b(d, digest_size=8).digest() for d in data)
    new = seen.add(np.frombuffer(digests, dtype="<u8"))
    stats["dropped_duplicate"] += int(len(batch) - new.sum())
    stats["kept"] += int(new.sum())
    stats["bytes_kept"] += sum(len(d) for d, keep in zip(data, new) if keep)
    return [t for t, keep in zip(batch, new) if keep]


# -----------------------------------------------------------------------------
# tokenizing: batches of documents to one uint16 array each, <|endoftext|> before every document

def encode_docs(tok, texts, num_threads=1):
    """One uint16 array per batch: from a worker it pickles as raw bytes, not as millions of Python ints."""
    ids = tok.encode_batch(texts, num_threads=num_threads)  # plain text: special-token spellings stay text
    out = np.empty(len(ids) + sum(map(len, ids)), dtype=np.uint16)
    pos, eot = 0, tok.eot_token
    for doc in ids:
        out[pos] = eot
        out[pos + 1:pos + 1 + len(doc)] = doc
        pos += 1 + len(doc)
    return out


_worker_tok = None  # the tokenizer of a worker process


def _init_worker(tok_text):
    global _worker_tok
    ignore_sigint()  # Ctrl-C is handled once, by the parent
    _worker_tok = Tokenizer.loads(tok_text)


def _encode_in_worker(texts):
    return encode_docs(_worker_tok, texts)


def encoded_batches(batches, tok, num_proc):
    """Yield encode_docs() of each batch, in order. With num_proc > 1 the batches go to worker processes;
    at most 2 * num_proc are in flight, because Pool.imap would read the whole corpus ahead into memory."""
    if num_proc <= 1:
        yield from (encode_docs(tok, b) for b in batches)
        return
    with multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tok.dumps(),)) as pool:
        pending = deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_in_worker, (b,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def load_tokenizer(spec):
    """The tokenizer named by --tokenizer (gpt2 or a .bpe path), refused if its ids do not fit uint16."""
    if spec != "gpt2" and not os.path.isfile(spec):
        raise UserError(f"tokenizer file '{spec}' not found; give --tokenizer=gpt2, =train or the "
                         f"path of a .bpe file saved by bpe.py")
    try:
        tok = Tokenizer.from_spec(spec)
        tok.encode("x")  # gpt2: tiktoken downloads its files on first use; fail now, not mid-corpus
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{spec}': {e}")
    except RuntimeError as e:
        raise UserError(f"cannot load tokenizer '{spec}': {e}; offline, use --tokenizer=train")
    if tok.vocab_size > MAX_VOCAB:
        raise UserError(f"tokenizer '{spec}' has {tok.vocab_size} tokens and {_TOO_BIG}")
    return tok


def train_tokenizer(cfg, docs_fn):
    """Train a BPE on the first bpe_train_mb MB of the cleaned, deduplicated corpus."""
    texts, nbytes, stats = [], 0, Counter()
    for text in chain.from_iterable(clean_batches(docs_fn(), stats, cfg.min_chars, cfg.max_garbage)):
        if nbytes >= cfg.bpe_train_mb * 1_000_000:
            break
        texts.append(text)
        nbytes += len(text.encode("utf-8"))
    if not texts:
        raise UserError(_empty_error(stats, cfg))
    print(f"training a {cfg.vocab_size}-token BPE on {len(texts):,} documents, {nbytes / 1e6:.1f} MB")
    t0 = time.time()
    try:
        tok = Tokenizer.train(texts, cfg.vocab_size, verbose=True)
    except ValueError as e:  # vocab_size too small, or more merges than this text allows
        raise UserError(f"cannot train the tokenizer: {e}")
    print(f"trained {tok.name} in {time.time() - t0:.1f} s")
    return tok, {"docs": len(texts), "bytes": nbytes}


def _empty_error(stats, cfg):
    return (f"no documents left after cleaning (read {stats['read']}: {stats['dropped_missing']} without "
            f"text, {stats['dropped_short']} shorter than min_chars={cfg.min_chars}, {stats['dropped_garbage']} "
            f"garbage, {stats['dropped_duplicate']} duplicates); check the input and --text_field, or lower "
            f"--min_chars")


# -----------------------------------------------------------------------------
# the run

def prepare(cfg, argv=()):
    """Run the whole pipeline for the settings in cfg (a namespace); return the data card (a dict)."""
    for key in ("shard_size", "num_proc", "bpe_train_mb"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 < cfg.val_fraction < 1 or cfg.val_tokens < 0:
        raise UserError("need 0 < val_fraction < 1 and val_tokens >= 0")
    spec = cfg.tokenizer or ("train" if cfg.dataset == "stdlib" and not cfg.input else "gpt2")
    if spec == "train" and cfg.vocab_size > MAX_VOCAB:  # before any work
        raise UserError(f"--vocab_size={cfg.vocab_size} {_TOO_BIG}")
    name, docs_fn, source = resolve_source(cfg)  # offline, the hub check fails here within seconds
    tok = None if spec == "train" else load_tokenizer(spec)
    out_dir = os.path.join(cfg.data_dir, name)
    made = []  # the folders this run creates, out_dir first, so that a failed run can remove them again
    d = os.path.abspath(out_dir)
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(out_dir, exist_ok=True)  # a read-only folder, or a file in the path: one line, before any work
    try:
        # the command goes in first: it proves the folder is writable before any long work, and train.py
        # names it when the folder turns out to be incomplete
        atomic_write(os.path.join(out_dir, "command.txt"), shlex.join(["python", "prepare.py", *argv]) + "\n")
        # a re-run replaces the previous run wholesale: no stale shard from a longer run survives
        prefix = os.path.join(glob_escape(out_dir), glob_escape(name))
        stale = glob(f"{prefix}_val_*.bin*") + glob(f"{prefix}_train_*.bin*")
        for f in stale + [os.path.join(out_dir, f) for f in ("card.json", "README.md", "tokenizer.bpe")]:
            if os.path.exists(f):
                os.remove(f)
        return _prepare(cfg, argv, name, docs_fn, source, spec, tok, out_dir)
    except (Exception, UserError):  # bad input found mid-stream (UserError is a SystemExit, not an Exception):
        # remove what this run made. A Ctrl-C keeps the complete shards written so far, and a failed re-run
        # keeps the old folder; a parent made here goes only if empty (a concurrent run may be writing in it)
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
            for parent in made[1:]:
                try:
                    os.rmdir(parent)
                except OSError:
                    break
        raise


def _prepare(cfg, argv, name, docs_fn, source, spec, tok, out_dir):
    trained = None
    if tok is None:
        tok, trained = train_tokenizer(cfg, docs_fn)

    stats = Counter()
    writer = ShardWriter(out_dir, name, cfg.shard_size, cfg.val_tokens, cfg.val_fraction)
    t0 = last = time.time()
    batches = clean_batches(docs_fn(), stats, cfg.min_chars, cfg.max_garbage)
    ntok = 0
    for tokens in encoded_batches(batches, tok, cfg.num_proc):
        writer.add(tokens)
        ntok += len(tokens)
        if time.time() - last > 10:
            last, dt = time.time(), time.time() - t0
            print(f"{stats['read']:,} docs read, {stats['bytes_read'] / 1e6:,.0f} MB, {ntok:,} tokens, "
                  f"{stats['bytes_read'] / 1e6 / dt:.1f} MB/s, {ntok / dt / 1e6:.2f}M tokens/s")
    if stats["kept"] == 0:
        raise UserError(_empty_error(stats, cfg))
    shards = writer.finish()
    elapsed = time.time() - t0
    tok.save(os.path.join(out_dir, "tokenizer.bpe"))
    card = make_card(cfg, argv, name, source, stats, shards, tok, spec, trained, elapsed)
    atomic_write(os.path.join(out_dir, "card.json"), json.dumps(card, indent=2) + "\n")
    atomic_write(os.path.join(out_dir, "README.md"), render_card(card))
    print(f"done in {elapsed:.1f} s: {stats['kept']:,} of {stats['read']:,} documents kept, "
          f"{card['tokens']['train']:,} train + {card['tokens']['val']:,} val tokens in {out_dir}/")
    return card


# -----------------------------------------------------------------------------
# the data card: what exactly a model trained on these shards read

def make_card(cfg, argv, name, source, stats, shards, tok, spec, trained, elapsed):
    import importlib.metadata as md
    import platform
    ntrain = sum(s["tokens"] for s in shards if s["split"] == "train")
    nval = sum(s["tokens"] for s in shards if s["split"] == "val")
    text_tokens = ntrain + nval - stats["kept"]  # minus one <|endoftext|> per document

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None
    return {
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "prepare.py", *argv]),
        "settings": dict(vars(cfg)),
        "source": source,
        "documents": {
            "read": stats["read"],
            "dropped": {"missing_text": stats["dropped_missing"], "garbage": stats["dropped_garbage"],
                        "shorter_than_min_chars": stats["dropped_short"],
                        "duplicate": stats["dropped_duplicate"]},
            "kept": stats["kept"],
            "modified": {"line_endings_normalised": stats["fixed_line_endings"],
                         "control_chars_stripped": stats["stripped_control_chars"],
                         "nfc_normalised": stats["nfc_changed"]},
        },
        "bytes": {"read": stats["bytes_read"], "kept": stats["bytes_kept"]},
        "tokenizer": {"spec": spec, "name": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token,
                      "file": "tokenizer.bpe", "trained_on": trained},
        "tokens": {"train": ntrain, "val": nval, "total": ntrain + nval,
                   "bytes_per_token": round(stats["bytes_kept"] / max(text_tokens, 1), 4)},
        "shards": shards,
        "format": (f"llm.c token shards: 256 int32 header (magic {MAGIC}, version {VERSION}, token count), "
                   f"then uint16 tokens; every document is preceded by <|endoftext|> (id {tok.eot_token}); "
                   f"val is the first min(val_tokens, val_fraction * total) tokens"),
        "seconds": round(elapsed, 1),
        "software": {"python": platform.python_version(), "numpy": np.__version__,
                     "tiktoken": version("tiktoken"), "datasets": version("datasets")},
    }


def render_card(c):
    d, s, t = c["documents"], c["source"], c["tokens"]
    src = [f"- {k}: {json.dumps(v) if isinstance(v, str) and not v.isprintable() else v}"
           for k, v in s.items() if k not in ("files", "license")]  # json.dumps shows a separator's \n
    lines = [
        f"# Data card: {c['name']}", "",
        f"Prepared {c['created']} with:", "", "```bash", c["command"], "```", "",
        "## Source", "", *src, "", f"Licence: {s['license']}", "",
    ]
    if "files" in s:
        lines += ["Files:", ""] + [f"- `{f['path']}` ({f['bytes']:,} bytes)" for f in s["files"]]
        more = s["num_files"] - len(s["files"])
        lines += [f"- ... and {more:,} more files" if more else "", ""]
    lines += [
        "## Documents", "",
        "| step | documents |", "|---|---:|",
        f"| read | {d['read']:,} |",
        f"| dropped: text missing or null | {d['dropped']['missing_text']:,} |",
        f"| dropped: mostly garbage (U+FFFD / control chars) | {d['dropped']['garbage']:,} |",
        f"| dropped: shorter than {c['settings']['min_chars']} characters "
        f"| {d['dropped']['shorter_than_min_chars']:,} |",
        f"| dropped: exact duplicate | {d['dropped']['duplicate']:,} |",
        f"| **kept** | **{d['kept']:,}** |", "",
        f"Modified but kept: line endings normalised in {d['modified']['line_endings_normalised']:,}, "
        f"control characters stripped from {d['modified']['control_chars_stripped']:,}, "
        f"NFC-normalised {d['modified']['nfc_normalised']:,}. "
        f"Text: {c['bytes']['read']:,} bytes read, {c['bytes']['kept']:,} kept (UTF-8).", "",
        "## Tokens", "",
        f"Tokenizer `{c['tokenizer']['name']}` (`{c['tokenizer']['spec']}`), vocabulary "
        f"{c['tokenizer']['vocab_size']:,}, saved as `tokenizer.bpe`"
        + (f"; trained on the first {c['tokenizer']['trained_on']['bytes']:,} bytes "
           f"({c['tokenizer']['trained_on']['docs']:,} documents) of the cleaned corpus"
           if c["tokenizer"]["trained_on"] else "") + ".", "",
        f"train {t['train']:,} tokens, val {t['val']:,} tokens, {t['bytes_per_token']} bytes per token.", "",
        "| file | split | tokens |", "|---|---|---:|",
        *[f"| {x['file']} | {x['split']} | {x['tokens']:,} |" for x in c["shards"]], "",
        f"Format: {c['format']}.", "",
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = configure(globals(), argv)
    from types import SimpleNamespace
    return prepare(SimpleNamespace(**cfg), argv)


if __name__ == "__main__":
    run(main)
