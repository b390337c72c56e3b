r"""
prepare.py: raw text in, clean deduplicated token shards and a data card out.

    python prepare.py --dataset=stdlib                  # offline: the Python standard library (quick start)
    python prepare.py                                   # FineWeb-Edu sample-10BT, GPT-2 tokens (needs the hub)
    python prepare.py --input='corpus/*.jsonl' --name=mine --tokenizer=train --vocab_size=8192

Documents flow through one streaming pipeline, so a 10B-token corpus never has to fit in memory:

    source -> clean -> exact dedup -> decontaminate -> near-dedup -> PII -> tokenize (num_proc workers,
    order kept) -> shard buffer -> .bin files

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

Filters, on by default for the hub and --input (off for stdlib, so the quick start's corpus and the figures
measured on it stay as they were), each counted in the card:
- decontaminate (--decontaminate=a.jsonl,b.jsonl, eval.py's formats): drop every document that shares a
  13-gram (lower-cased, punctuation removed) with an eval item, GPT-3's test (Brown et al. 2020, appendix C).
  GPT-3 cut out the 13-gram and 200 characters around it and dropped a document only when cut into more than
  10 pieces; here the whole document goes: a page that quotes a benchmark passage tends to quote its answer
  too, just outside any window, and a cut-out document glues unrelated text together. It costs only the
  contaminated documents, which are few (the card counts them per eval set). Items shorter than 13 words
  cannot be checked; the card counts those too.
- near-dedup (--near_dedup): MinHash over word 5-grams, FineWeb's 14 bands x 8 rows; the first document of
  each cluster is kept. NearDuplicates explains the threshold, memory (112 bytes per document) and what to run
  beyond ~100M documents.
- PII (--pii): e-mail addresses and public IP addresses become fixed placeholders, FineWeb's step, after
  dedup as FineWeb does; remove_pii's helpers state the rule for each look-alike (versions, private ranges,
  ssh targets, decorators, logins in URLs). bench/README.md measures precision and recall on real text.

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
tokenizer.bpe and card.json + README.md (the data card: source, licence, command, counts per filter,
tokens per split, bytes per token) are written last, so their presence marks a complete run; command.txt is
written first. A run that fails on bad input removes the folder it made.

Resume. A killed run (SIGKILL, power loss, Ctrl-C) keeps its complete shards, and with each one resume/ holds
what a re-run of the same command needs to continue from the last of them and write exactly the bytes an
uninterrupted run would have: the position in the source (datasets' own state_dict() for hub and local
.jsonl/.parquet streams, a file and document index for .txt, a document index for stdlib), the card's counts,
the trained tokenizer, how many entries of each hash set's log belong to that point (the sets only grow, so
a prefix of the log is the state), and skip: how many tokens of the first re-read batch are already in
shards. Each shard is written, then the logs are fsync'ed, then state.json is replaced atomically, so a kill
anywhere leaves a consistent state. The run's identity (settings that change the output, the source's files
and sizes or hub commit, the tokenizer's hash, the eval files' hashes) is saved with it: a re-run of another
command refuses in one line instead of mixing outputs (--overwrite=True starts over), and a re-run of the
same command on a complete folder says so and does nothing. num_proc may change between runs.

Memory: one shard buffer (max(val_tokens + shard_size, val_tokens / val_fraction) uint16, 220 MB at the
defaults), the batches in flight, the workers, 8 bytes per distinct document for exact dedup and up to 112
for near-dedup (1.2 GB for 10M documents), plus the eval sets' 13-grams (8 bytes each).
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
import zlib
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
pii = None  # e-mail and public IP addresses to placeholders; None = on for the hub and --input, off for stdlib
near_dedup = None  # MinHash near-duplicate removal (FineWeb's stage); None = on for the hub and --input, off for stdlib
minhash_bands = 14  # b bands of r rows: FineWeb's 14 x 8 (112 hashes) drop pairs above Jaccard ~0.7, see NearDuplicates
minhash_rows = 8
decontaminate = ""  # comma-separated eval files (eval.py's formats): drop training documents sharing a 13-gram with one
overwrite = False  # start over in a folder that holds another command's output (default: resume, or refuse)
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

    def __init__(self, out_dir, name, shard_size, val_tokens, val_fraction, shards=(), on_shard=None):
        self.out_dir, self.name = out_dir, name
        self.shard_size, self.val_tokens, self.val_fraction = shard_size, val_tokens, val_fraction
        self.buf = np.empty(max(shard_size + val_tokens, math.ceil(val_tokens / val_fraction)), np.uint16)
        self.n = 0  # tokens in buf
        self.shards = list(shards)  # one dict per written file, for the card (a resumed run starts with some)
        self.next_train = 1 + sum(s["split"] == "train" for s in self.shards)  # llm.c: val is shard 0
        self.written = sum(s["tokens"] for s in self.shards)  # tokens in complete files: where a resume starts
        self.on_shard = on_shard  # called after each file, to save the resume state that goes with it

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
        self.written += len(tokens)
        print(f"wrote {fname}: {len(tokens):,} tokens")
        if self.on_shard:
            self.on_shard(self)


# -----------------------------------------------------------------------------
# sources: each is a function docs(start) yielding (text, position after it) from a resume position (None
# = the beginning). The tokenizer trainer reads the first MBs, then the full pass starts again; a resumed
# run passes the position saved with the last complete shard.

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


def _stdlib_docs(start=None):
    """The stdlib documents; the position is the number read so far."""
    from pydoc_data.topics import topics
    docs = _stdlib_files()[1] + sorted(topics)
    # a fixed-seed shuffle of the sorted list: the same order on every run, but val (the first tokens) is a
    # random tenth of the modules, and train.py, which reads shards in order, sees them mixed, not a-z
    random.Random(1337).shuffle(docs)
    for i in range(start or 0, len(docs)):
        if isinstance(docs[i], str):  # a pydoc topic name
            yield topics[docs[i]], i + 1
        else:  # raw bytes: the cleaner sees any \r
            yield docs[i].read_bytes().decode("utf-8", errors="replace"), i + 1


def _txt_docs(files, separator, start=None):
    """Documents of .txt files; the position is [file index, documents of that file read]."""
    first, skip = start or (0, 0)
    for f in range(first, len(files)):
        # newline="" keeps \r\n as written, so the line-ending fix is counted; bad bytes become U+FFFD
        with open(files[f], encoding="utf-8", errors="replace", newline="") as fh:
            if not separator:
                if not skip:
                    yield fh.read(), (f + 1, 0)
                skip = 0
                continue
            rest, i = "", 0  # read 1 MB at a time so a huge file split into documents streams too
            for chunk in iter(lambda: fh.read(1 << 20), ""):
                *docs, rest = (rest + chunk).split(separator)
                for d in docs:
                    i += 1
                    if i > skip:
                        yield d, (f, i)
            if i + 1 > skip:
                yield rest, (f, i + 1)
            skip = 0


def _datasets_docs(load_args, text_field, what, start=None):
    """Stream text_field of a datasets.load_dataset(**load_args, streaming=True) source, in batches
    (one Arrow-to-Python conversion per 1000 rows instead of one per row). The position is the dataset's
    own state_dict() at the start of a batch of rows and the rows of it read: a hub dataset resumes without
    reading what came before (datasets' streaming resume; no shuffle buffer, whose content it cannot restore)."""
    import copy
    import datasets
    # without this, streaming imports torch (~3 s, ~300 MB) only to share a counter with DataLoader workers
    datasets.config.TORCH_AVAILABLE = False
    # datasets logs each error it then raises; the raise becomes our one line, so the log would repeat it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(**load_args, streaming=True)
        if ds.column_names is not None:  # known up front for local files; the hub may only know at the first row
            if text_field not in ds.column_names:
                raise UserError(f"{what} has no column '{text_field}' (columns: "
                                 f"{', '.join(ds.column_names)}); set --text_field")
            ds = ds.select_columns([text_field])
        if start is not None:
            ds.load_state_dict(start[0])
    except Exception as e:
        raise UserError(f"cannot load {what}: {_first_line(e)}")
    skip = start[1] if start is not None else 0
    rows = ds.iter(batch_size=1000)
    while True:
        state = copy.deepcopy(ds.state_dict())  # where this batch of rows starts
        try:  # only the read is guarded, not the yield below (that is where the consumer's errors surface)
            batch = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a malformed JSON line or a corrupt file, found mid-stream
            raise UserError(f"cannot read {what}: {_first_line(e)}")
        if text_field not in batch:
            raise UserError(f"{what} has no column '{text_field}' (columns: {', '.join(batch)}); "
                             f"set --text_field")
        for i, t in enumerate(batch[text_field]):
            if t is not None and not isinstance(t, str):  # an int, a list, bytes: not a text column
                raise UserError(f"{what}: column '{text_field}' holds {type(t).__name__} values, not text "
                                f"(e.g. {str(t)[:40]!r}); point --text_field at a column of strings")
            if i >= skip:
                yield t, (state, i + 1)  # None (a null or missing text) is counted in the card as such
        skip = 0


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


def _unescape(s):
    r"""--separator='\n===\n' as a shell passes it: backslash escapes \n, \t, \r and \\ become the characters
    (taken literally, '\n' would be two characters that never occur, making the whole file one document)."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


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
        # what a resume must find unchanged: every file's path and size
        info["fingerprint"] = hashlib.sha256(json.dumps([[os.path.abspath(f), os.path.getsize(f)]
                                                         for f in files]).encode()).hexdigest()[:16]
        if kind == ".txt":
            separator = _unescape(cfg.separator)
            info["separator"] = separator or None
            return name, lambda start=None: _txt_docs(files, separator, start), info
        info["text_field"] = cfg.text_field
        load_args = {"path": "parquet" if kind == ".parquet" else "json", "data_files": files, "split": "train"}
        return name, lambda start=None: _datasets_docs(load_args, cfg.text_field, f"--input={cfg.input}",
                                                       start), info
    if cfg.dataset == "stdlib":
        import platform
        root, files = _stdlib_files()
        info = {"kind": "python standard library", "python": platform.python_version(), "root": str(root),
                "num_files": len(files), "also": "pydoc_data.topics texts, one document per topic",
                "excluded": "site-packages, test/tests/idle_test folders, pydoc_data/topics.py",
                "license": f"PSF License Version 2 (Python Software Foundation), see {root / 'LICENSE.txt'}"}
        return cfg.name or "stdlib", _stdlib_docs, info
    if "/" not in cfg.dataset and cfg.dataset != "fineweb_edu":  # not a hub "owner/name": a typo, most likely
        import difflib
        close = difflib.get_close_matches(cfg.dataset, ["stdlib", "fineweb_edu"], n=1, cutoff=0.5)
        raise UserError(f"unknown --dataset={cfg.dataset}" + (f": did you mean {close[0]}?" if close else "")
                        + " (offline: stdlib; the hub: fineweb_edu or owner/name; local files: --input=PATH)")
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
    return name, lambda start=None: _datasets_docs(load_args, cfg.text_field, repo, start), info


# -----------------------------------------------------------------------------
# cleaning

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
    would cost ~70 bytes per document: 0.7 GB for FineWeb-Edu's 10M-document sample.

    The set only grows, so its state after any batch is a prefix of the hashes in the order they were added:
    a resume point saves `count`, and save() appends the new hashes to a log file instead of rewriting the
    whole set with every shard."""

    def __init__(self):
        self.runs = []  # sorted, disjoint uint64 arrays, each more than twice as long as the next
        self.count = 0  # hashes added so far
        self.unsaved = []  # the new hashes of each add() since the last save()

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
        self.count += len(run)
        self.unsaved.append(run)
        while self.runs and len(self.runs[-1]) <= 2 * len(run):  # each hash is merged O(log n) times
            run = np.sort(np.concatenate([self.runs.pop(), run]))
        if len(run):
            self.runs.append(run)
        return new

    def save(self, path):
        """Append the hashes added since the last save to the log at path, on disk before this returns."""
        with open(path, "ab") as f:
            for run in self.unsaved:
                f.write(run.astype("<u8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.unsaved = []

    @classmethod
    def load(cls, path, count):
        """The set as it was when it held `count` hashes; the log is cut there (a crash may have left more)."""
        s = cls()
        if count:
            s.add(np.fromfile(path, dtype="<u8", count=count))
            s.unsaved = []
        with open(path, "ab") as f:
            f.truncate(8 * count)
        return s


# -----------------------------------------------------------------------------
# words and n-grams, shared by near-dedup (5-grams) and decontamination (13-grams)

_NOT_WORD = re.compile(r"[^\w\s]+")
# fixed random odd multipliers: an n-gram's hash is sum_j word_j * M_j mod 2^64, the same on every machine and
# every run (Python's hash() is salted per process, which would break an exact resume)
_M = np.random.default_rng(20240520).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def word_hashes(text):
    """GPT-3's normalisation (appendix C): lower-case, punctuation removed, split on whitespace; one 32-bit
    CRC per word, as uint64."""
    words = _NOT_WORD.sub("", text.lower()).split()
    return np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words))


def ngram_hashes(w, n):
    """64-bit hashes of the word n-grams of w (word hashes), in order; fewer than n words make one n-gram."""
    n = min(n, len(w))
    h = np.zeros(len(w) - n + 1 if n else 0, np.uint64)
    for j in range(n):
        h += w[j:len(w) - n + 1 + j] * _M[j]  # uint64 arithmetic wraps around: mod 2^64
    return h


class NearDuplicates:
    """MinHash near-duplicate removal with locality-sensitive hashing (Broder 1997; Lee et al. 2022; FineWeb's
    MinHash stage), streaming: a document is dropped if it collides in any band with any earlier document.

    A document is its set of word 5-gram shingles. For each of b*r hash functions, its MinHash is the smallest
    hash of any shingle; two documents share a MinHash with probability equal to their Jaccard similarity J.
    The b*r MinHashes are cut into b bands of r rows; documents collide when all r rows of some band agree,
    which happens with probability 1 - (1 - J^r)^b: an S-curve. For FineWeb's 14 x 8 that is 0.05 at J = 0.5,
    0.30 at J = 0.63, 0.5 at J = 0.69, 0.77 at J = 0.75, 0.92 at J = 0.8 and 1.00 at J = 0.9: a threshold of
    about 0.7. (Changing 5% of the words at scattered places leaves J ~ 0.63, since each change breaks the five
    shingles it is in: caught 30% of the time at 14 x 8; 28 x 4, a threshold of ~0.45, catches it 99% of the
    time and also 20% of pairs at J = 0.3.)

    Every document's bands go into the index, the dropped ones' too, so a chain of near-copies A ~ B ~ C is one
    cluster of which the first document is kept, as FineWeb's clustering keeps one per cluster. Two earlier
    documents that a later one bridges both stay: a stream cannot take back what it has written.

    The index is a HashSet of one 64-bit key per (document, band): b * 8 = 112 bytes per document at 14 bands
    (1.1 GB for FineWeb-Edu sample-10BT's ~10M documents, up to twice that while the largest run merges), and
    the same again in a log file on disk for resuming. Beyond ~100M documents use datatrove's MinHash pipeline,
    which writes signatures to disk and sorts them per band instead of holding an index. Numpy rather than
    datasketch: datasketch's MinHashLSH keeps Python lists per band, several times the memory per document,
    and hashes one document at a time; here a batch of documents is hashed at once (bench/README.md)."""

    def __init__(self, bands, rows, index=None):
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(1337)  # fixed: the same signatures on every run
        # h_k(x) = (a_k x + b_k mod 2^64) >> 32, multiply-shift hashing (Dietzfelbinger et al. 1997)
        self.a = rng.integers(1, 2**63, size=bands * rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=bands * rows, dtype=np.uint64)
        self.index = HashSet() if index is None else index

    def signatures(self, shingles):
        """(n documents, b*r) uint64 MinHashes of n non-empty arrays of shingle hashes."""
        starts = np.cumsum([0] + [len(s) for s in shingles[:-1]])
        flat = np.concatenate(shingles)
        sig = np.empty((len(shingles), len(self.a)), np.uint64)
        for k in range(0, len(self.a), 16):  # 16 hash functions at a time: (shingles, 16) uint64 stays small
            h = flat[:, None] * self.a[None, k:k + 16]
            h += self.b[k:k + 16]
            h >>= np.uint64(32)
            sig[:, k:k + 16] = np.minimum.reduceat(h, starts, axis=0)
        return sig

    def duplicates(self, words):
        """For each document (its word hashes), True if it is a near-duplicate of an earlier one."""
        dup = np.zeros(len(words), bool)
        todo = [i for i, w in enumerate(words) if len(w)]  # no words, no shingles: nothing to compare
        if not todo:
            return dup
        sig = self.signatures([ngram_hashes(words[i], 5) for i in todo]).reshape(len(todo), self.bands, self.rows)
        keys = sig @ _M[:self.rows]  # (docs, bands): one 64-bit key per band, its r rows hashed together
        keys += np.arange(self.bands, dtype=np.uint64) * _M[self.rows]  # the same rows in two bands differ
        new = self.index.add(keys.ravel()).reshape(keys.shape)
        dup[todo] = ~new.all(axis=1)  # some band was seen before: in an earlier document, or this batch's
        return dup


# -----------------------------------------------------------------------------
# decontamination: evaluation text out of the training data

def read_eval_texts(path):
    """The texts of an evaluation file in one of eval.py's formats, one per item: multiple choice
    {"query", "choices", "gold"} gives the query and its right answer, LAMBADA {"text"} the passage, HellaSwag
    {"ctx_a", "ctx_b", "endings", "label"} the context and its right ending: the text a model must not have
    read. A .json list or .jsonl."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --decontaminate file {path}: {e.strerror}")
    except ValueError as e:
        raise UserError(f"--decontaminate file {path} is not JSON lines ({e})")
    texts = []
    for i, r in enumerate(rows):
        try:
            if "query" in r:
                texts.append(r["query"] + " " + r["choices"][r["gold"]])
            elif "ctx_a" in r:
                texts.append(r["ctx_a"] + " " + r["ctx_b"] + " " + r["endings"][int(r["label"])])
            else:
                texts.append(r["text"])
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserError(f"{path} line {i + 1}: not an item of eval.py's formats ({{query, choices, gold}}, "
                            f"{{text}} or HellaSwag's {{ctx_a, ctx_b, endings, label}})")
    return texts


def eval_ngrams(paths, n=13):
    """{eval file name: sorted unique uint64 hashes of its 13-grams}, and the items too short to have one."""
    sets, short = {}, {}
    for path in paths:
        words = [word_hashes(t) for t in read_eval_texts(path)]
        short[os.path.basename(path)] = sum(len(w) < n for w in words)
        grams = [ngram_hashes(w, n) for w in words if len(w) >= n]
        sets[os.path.basename(path)] = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
    return sets, short


def contaminated(words, sets, n=13):
    """{eval file name: bool mask of the documents sharing a 13-gram with it}."""
    grams = [ngram_hashes(w, n) if len(w) >= n else np.zeros(0, np.uint64) for w in words]
    doc = np.repeat(np.arange(len(words)), [len(g) for g in grams])
    flat = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
    out = {}
    for name, s in sets.items():
        hit = np.zeros(len(words), bool)
        if len(s) and len(flat):
            i = np.minimum(np.searchsorted(s, flat), len(s) - 1)
            hit[doc[s[i] == flat]] = True
        out[name] = hit
    return out


# -----------------------------------------------------------------------------
# personal data: e-mail addresses and public IP addresses become fixed placeholders (FineWeb's PII step)

# the placeholders are reserved for documentation, so they name nobody (RFC 2606, RFC 5737, RFC 3849),
# and are not themselves replaced on a second pass (example.com is skipped, the IPs are not public)
EMAIL_PLACEHOLDER, IPV4_PLACEHOLDER, IPV6_PLACEHOLDER = "email@example.com", "192.0.2.1", "2001:db8::1"
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-]|\.\w)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# eight groups, or fewer with a "::" (so times like 12:30:45 are not even candidates)
_IPV6 = re.compile(r"(?<![\w:.])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|"
                   r"(?=[0-9A-Fa-f:]*::)(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w:])")
_URL_LOGIN = re.compile(r"[A-Za-z][\w+.-]*://([^\s/@]*:)?$")  # what precedes the user of scheme://user@host
_SSH = re.compile(r"\b(ssh|scp|sftp|rsync|mosh)\b[^\n]*$")
_VERSION_CUE = re.compile(r"(\b(version|ver|release|rev|revision|build|v)\s*:?\s*|[=<>~_-]\s*|\d:)$", re.I)
# words that, earlier on the same line, make a dotted quad a version: Debian changelogs ("bump Standards-Version
# to 3.9.8.0", "build-dep to (>= 1.2.99.2)", "Update from 1.2.99.2 to 1.2.99.4") were nearly all of the
# public-looking IPv4 strings on this machine (bench/README.md)
_VERSION_LINE = re.compile(r"\b(versions?|releases?|update[ds]?|upgraded?|bump(ed)?|build-deps?|firmware|"
                           r"depends|dependencies|sections?|specs?|patch|upstream)\b", re.I)


def _is_address(ip):
    """Public unicast only: private, loopback, link-local, documentation and multicast ranges identify nobody
    outside their own network (Python's ipaddress decides, as in FineWeb)."""
    import ipaddress
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return a.is_global and not a.is_multicast


def _email(m, text):
    """An e-mail address, except: a URL's login (`https://user@host`, `ftp://user:pw@host`: a login, not an
    address, though an address in a URL's path or query, `?to=a@b.org`, is replaced); an ssh/scp target
    (`git@github.com:owner/repo`, `ssh admin@host.example.org`: a login on a machine). Needing a dotted
    domain with a 2+ letter top level keeps `user@host`, decorators (`@property`, `@app.route`, nothing
    before the @), package pins (`pkg@1.2.3`) and matrix products (`x@W.T`) out."""
    s, before = m.group(), text[text.rfind("\n", 0, m.start()) + 1:m.start()]
    if s.endswith("@example.com") or _URL_LOGIN.search(re.split(r"\s", before)[-1]):
        return s
    if text.startswith(":", m.end()) and not text[m.end() + 1:m.end() + 2].isspace() or _SSH.search(before):
        return s
    return EMAIL_PLACEHOLDER


def _ipv4(m, text):
    """A public IPv4 address, except a version number: four one-digit parts (2.0.1.3; the only public
    addresses of that shape in common use are resolvers like 8.8.8.8 and 1.1.1.1, which name no person),
    after a version cue ("version 4.10.2.1", "v1.22.3.4", "pkg-4.10.2.1", "==4.10.2.1"), or before a version
    suffix (a Debian changelog's "(4.10.2.1-1)", "+dfsg", "~rc1"), or after a version word earlier on the
    line ("bump Standards-Version to 3.9.8.0", "Update from 1.2.99.2"); and a.b.c.0 (a network, not a host).
    A range "a-b" of public addresses, or an address on a line that says "update", is therefore kept: a cost
    in recall, chosen because on real text version numbers far outnumber addresses (bench/README.md)."""
    s = m.group()
    if not _is_address(s) or all(len(p) == 1 for p in s.split(".")) or s.endswith(".0"):
        return s
    line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
    if _VERSION_CUE.search(line[-12:]) or _VERSION_LINE.search(line) or \
            re.match(r"[-+~][0-9A-Za-z]", text[m.end():m.end() + 2]):
        return s
    return IPV4_PLACEHOLDER


def _ipv6(m, text):
    """A public IPv6 address: at least three groups (so a slice `a[1::2]` is not one), as ipaddress parses it;
    times (12:30:45) and MAC addresses (six groups, no ::) do not parse."""
    s = m.group()
    if sum(1 for g in s.split(":") if g) < 3 or not _is_address(s):
        return s
    return IPV6_PLACEHOLDER


def remove_pii(text, stats):
    """text with e-mail and public IP addresses replaced; counts documents and replacements per kind."""
    for kind, pattern, fix in (("email", _EMAIL, _email), ("ipv4", _IPV4, _ipv4), ("ipv6", _IPV6, _ipv6)):
        n = 0

        def sub(m):
            nonlocal n
            out = fix(m, text)
            n += out != m.group()
            return out
        if {"email": "@", "ipv4": ".", "ipv6": ":"}[kind] in text:  # a cheap test before the regex
            text = pattern.sub(sub, text)
        if n:
            stats[f"pii_{kind}"] += n
            stats[f"pii_{kind}_docs"] += 1
    return text


# -----------------------------------------------------------------------------
# the filters in order, and their state

def clean_batches(docs, stats, min_chars, max_garbage, seen=None):
    """Yield lists of cleaned, exactly deduplicated documents (~_BATCH_CHARS characters each) from raw docs."""
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
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in batch)
    new = seen.add(np.frombuffer(digests, dtype="<u8"))
    stats["dropped_duplicate"] += int(len(batch) - new.sum())
    return [t for t, keep in zip(batch, new) if keep]


class Filters:
    """The steps between the source and the workers, in this order: clean, exact dedup, decontaminate,
    near-dedup (PII comes last, as in FineWeb, so that it changes no dedup decision; it needs no state, so it
    runs in the workers: pii_and_encode), and the state a resume restores: the source position, the counts
    for the card, the two hash sets."""

    def __init__(self, cfg, pii, eval_sets, saved=None, folder=None):
        saved = saved or {"pos": None, "stats": {}, "seen": 0, "near": 0}
        self.cfg, self.pii, self.eval_sets, self.folder = cfg, pii, eval_sets, folder
        self.pos, self.stats = saved["pos"], Counter(saved["stats"])
        self.seen = HashSet.load(os.path.join(folder, "exact.u64"), saved["seen"]) if folder else HashSet()
        self.near = None
        if cfg.near_dedup:
            index = HashSet.load(os.path.join(folder, "minhash.u64"), saved["near"]) if folder else None
            self.near = NearDuplicates(cfg.minhash_bands, cfg.minhash_rows, index)

    def snapshot(self):
        return {"pos": self.pos, "stats": dict(self.stats), "seen": self.seen.count,
                "near": self.near.index.count if self.near else 0}

    def save(self):
        """The hash sets' new entries to their logs (the saved state names a prefix of each)."""
        self.seen.save(os.path.join(self.folder, "exact.u64"))
        if self.near:
            self.near.index.save(os.path.join(self.folder, "minhash.u64"))

    def batches(self, docs):
        """docs: (text, position) pairs. Yield (kept texts, snapshot of the state after them), ~1 MB each."""
        def texts():
            for text, self.pos in docs:
                yield text
        st = self.stats
        for batch in clean_batches(texts(), st, self.cfg.min_chars, self.cfg.max_garbage, self.seen):
            if self.eval_sets or self.near:
                words = [word_hashes(t) for t in batch]
                if self.eval_sets:
                    hits = contaminated(words, self.eval_sets)
                    drop = np.zeros(len(batch), bool)
                    for name, hit in hits.items():
                        st[f"contaminated:{name}"] += int(hit.sum())
                        drop |= hit
                    st["dropped_contaminated"] += int(drop.sum())
                    batch = [t for t, d in zip(batch, drop) if not d]
                    words = [w for w, d in zip(words, drop) if not d]
                if self.near:
                    dup = self.near.duplicates(words)
                    st["dropped_near_duplicate"] += int(dup.sum())
                    batch = [t for t, d in zip(batch, dup) if not d]
            st["kept"] += len(batch)  # PII and bytes kept are counted where PII runs: in the workers
            yield batch, self.snapshot()


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


def _encode_in_worker(texts, pii):
    return pii_and_encode(_worker_tok, texts, pii)


def pii_and_encode(tok, texts, pii):
    """The last steps of a batch, which need no state, so they run in the workers: the PII step (FineWeb's,
    after dedup), then the tokens. Returns (tokens, counts for the card: PII replacements and bytes kept)."""
    counts = Counter()
    if pii:
        texts = [remove_pii(t, counts) for t in texts]
    counts["bytes_kept"] += sum(len(t.encode("utf-8")) for t in texts)
    return encode_docs(tok, texts), counts


def encoded_batches(batches, tok, num_proc, pii=False):
    """batches: (texts, tag) pairs; yield (tokens, tag, counts) of pii_and_encode(texts) in order. With
    num_proc > 1 the texts go to worker processes; at most 2 * num_proc are in flight, because Pool.imap would
    read the whole corpus ahead into memory. The tag (the filters' state after the batch) stays here."""
    if num_proc <= 1:
        for b, tag in batches:
            tokens, counts = pii_and_encode(tok, b, pii)
            yield tokens, tag, counts
        return
    with multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tok.dumps(),)) as pool:
        pending = deque()
        for b, tag in batches:
            pending.append((pool.apply_async(_encode_in_worker, (b, pii)), tag))
            if len(pending) >= 2 * num_proc:
                job, tag = pending.popleft()
                tokens, counts = job.get()
                yield tokens, tag, counts
        while pending:
            job, tag = pending.popleft()
            tokens, counts = job.get()
            yield tokens, tag, counts


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


def train_tokenizer(cfg, docs_fn, filters):
    """Train a BPE on the first bpe_train_mb MB of the corpus as the model will see it: cleaned, deduplicated,
    decontaminated, PII replaced (filters: a fresh Filters)."""
    texts, nbytes = [], 0
    for text in chain.from_iterable(b for b, _ in filters.batches(docs_fn())):
        if nbytes >= cfg.bpe_train_mb * 1_000_000:
            break
        text = remove_pii(text, Counter()) if filters.pii else text
        texts.append(text)
        nbytes += len(text.encode("utf-8"))
    if not texts:
        raise UserError(_empty_error(filters.stats, cfg))
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
            f"garbage, {stats['dropped_duplicate']} duplicates, {stats['dropped_contaminated']} contaminated, "
            f"{stats['dropped_near_duplicate']} near-duplicates); check the input and --text_field, or lower "
            f"--min_chars")


# -----------------------------------------------------------------------------
# the run

def prepare(cfg, argv=()):
    """Run the whole pipeline for the settings in cfg (a namespace); return the data card (a dict)."""
    for key in ("shard_size", "num_proc", "bpe_train_mb", "minhash_bands", "minhash_rows"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 < cfg.val_fraction < 1 or cfg.val_tokens < 0:
        raise UserError("need 0 < val_fraction < 1 and val_tokens >= 0")
    spec = cfg.tokenizer or ("train" if cfg.dataset == "stdlib" and not cfg.input else "gpt2")
    if spec == "train" and cfg.vocab_size > MAX_VOCAB:  # before any work
        raise UserError(f"--vocab_size={cfg.vocab_size} {_TOO_BIG}")
    name, docs_fn, source = resolve_source(cfg)  # offline, the hub check fails here within seconds
    tok = None if spec == "train" else load_tokenizer(spec)
    # web and local text by default; the stdlib quick start stays the corpus its published figures were made on
    web = bool(cfg.input) or cfg.dataset != "stdlib"
    pii = cfg.pii if cfg.pii is not None else web
    cfg.near_dedup = cfg.near_dedup if cfg.near_dedup is not None else web
    eval_paths = [p for p in cfg.decontaminate.split(",") if p]
    eval_sets, too_short = eval_ngrams(eval_paths)  # a bad eval file is one line now, not after hours
    identity = json.loads(json.dumps({  # what the output depends on (through JSON: as a saved one reads back)
        "settings": {**{k: v for k, v in vars(cfg).items() if k not in ("num_proc", "overwrite", "data_dir")},
                     "tokenizer": spec, "pii": pii},
        "source": {k: v for k, v in source.items() if k != "license"},
        "tokenizer": None if tok is None else hashlib.sha256(tok.dumps().encode()).hexdigest(),
        "eval_files": {os.path.abspath(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in eval_paths}}))
    out_dir = os.path.join(cfg.data_dir, name)
    found = _previous_run(out_dir, name, identity, cfg.overwrite)
    if found and "documents" in found:  # a card: the same command already ran to the end
        shutil.rmtree(os.path.join(out_dir, "resume"), ignore_errors=True)  # a kill just after the card
        print(f"{out_dir}/ is already complete, made by this same command ({len(found['shards'])} shards, "
              f"{found['tokens']['total']:,} tokens): nothing to do (--overwrite=True makes it again)")
        return found
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
        return _prepare(cfg, argv, name, docs_fn, source, spec, tok, out_dir, identity, found, pii, eval_sets,
                        too_short)
    except (Exception, UserError):  # bad input found mid-stream (UserError is a SystemExit, not an Exception):
        # remove what this run made. A Ctrl-C or a kill keeps the complete shards and the resume state, and a
        # failed re-run keeps the old folder; a parent made here goes only if empty (a concurrent run may be
        # writing in it)
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
            for parent in made[1:]:
                try:
                    os.rmdir(parent)
                except OSError:
                    break
        raise


def _previous_run(out_dir, name, identity, overwrite):
    """What out_dir holds: None (nothing, or --overwrite removed it), the saved state of an interrupted run
    of this same command, or the card of a complete one. Another command's output is refused."""
    prefix = os.path.join(glob_escape(out_dir), glob_escape(name))
    shards = glob(f"{prefix}_val_*.bin*") + glob(f"{prefix}_train_*.bin*")
    outputs = [os.path.join(out_dir, f) for f in ("card.json", "README.md", "tokenizer.bpe")]
    if overwrite:  # start over: no stale shard from a longer run survives
        for f in shards + outputs:
            if os.path.exists(f):
                os.remove(f)
        shutil.rmtree(os.path.join(out_dir, "resume"), ignore_errors=True)
        return None
    how = "; to start over: the same command with --overwrite=True, or another --name"
    for path in (outputs[0], os.path.join(out_dir, "resume", "state.json")):
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("identity") == identity:
                return saved
            raise UserError(f"{out_dir}/ holds the output of {_difference(saved.get('identity'), identity)}{how}")
    if shards:
        raise UserError(f"{out_dir}/ holds shards without a record of the command that made them{how}")
    return None


def _difference(old, new):
    if not old:
        return "an older prepare.py, which recorded no resumable state"
    for k, v in new["settings"].items():
        if old["settings"].get(k) != v:
            return f"another command (--{k}={old['settings'].get(k)!r} there, {v!r} here)"
    what = {"source": "another source (the input's files, sizes or hub commit differ)",
            "tokenizer": "another tokenizer (the .bpe file changed)", "eval_files": "other --decontaminate files"}
    return next((w for k, w in what.items() if old.get(k) != new.get(k)), "another command")


def _prepare(cfg, argv, name, docs_fn, source, spec, tok, out_dir, identity, saved, pii, eval_sets, too_short):
    resume_dir = os.path.join(out_dir, "resume")
    os.makedirs(resume_dir, exist_ok=True)
    state_file, tok_file = os.path.join(resume_dir, "state.json"), os.path.join(resume_dir, "tokenizer.bpe")
    state = saved or {"identity": identity, "trained": None, "at": None}
    atomic_write(state_file, json.dumps(state))  # first: a kill even mid-training leaves a run to resume
    if tok is None and os.path.exists(tok_file):  # trained before the interruption: the very same merges
        tok = Tokenizer.load(tok_file)
    elif tok is None:
        tok, state["trained"] = train_tokenizer(cfg, docs_fn, Filters(cfg, pii, eval_sets))
        tok.save(tok_file)
        atomic_write(state_file, json.dumps(state))
    at = state["at"]  # where the last complete shard left the source, the filters and the token stream
    if at:
        print(f"resuming after {len(at['shards'])} complete shards ({sum(s['tokens'] for s in at['shards']):,} "
              f"tokens, {at['stats'].get('read', 0):,} documents read)")
    filters = Filters(cfg, pii, eval_sets, at, resume_dir)
    # The token stream, batch by batch: batch k starts at stream token s_k, and the state before it is what a
    # resume needs. When a shard ends at token P inside batch k, the state saved with it is the state before
    # batch k and skip = P - s_k: a resumed run re-reads batch k's documents and drops its first skip tokens.
    skip = at["skip"] if at else 0
    pending = deque()  # (s_k, state before batch k) of the batches whose tokens are not all in shard files

    def checkpoint(w):
        while len(pending) > 1 and pending[1][0] <= w.written:
            pending.popleft()
        start, before = pending[0]
        filters.save()  # the hash logs first: the state names a prefix of them
        state["at"] = {**before, "skip": w.written - start, "shards": w.shards}
        atomic_write(state_file, json.dumps(state))

    writer = ShardWriter(out_dir, name, cfg.shard_size, cfg.val_tokens, cfg.val_fraction,
                         at["shards"] if at else (), checkpoint)
    ntok, prev = writer.written - skip, filters.snapshot()
    t0 = last = time.time()
    batches = filters.batches(docs_fn(at["pos"] if at else None))
    late = Counter()  # the workers' counts (PII, bytes kept), which arrive in order, after the batch's snapshot
    for tokens, after, counts in encoded_batches(batches, tok, cfg.num_proc, pii):
        late.update(counts)
        after = {**after, "stats": dict(Counter(after["stats"]) + late)}
        pending.append((ntok, prev))
        writer.add(tokens[skip:])
        ntok, prev, skip = ntok + len(tokens), after, 0
        if time.time() - last > 10:
            last, dt, st = time.time(), time.time() - t0, filters.stats
            print(f"{st['read']:,} docs read, {st['bytes_read'] / 1e6:,.0f} MB, {ntok:,} tokens, "
                  f"{ntok / dt / 1e6:.2f}M tokens/s")
    stats = Counter(filters.stats)
    stats.update(late)
    if stats["kept"] == 0:
        raise UserError(_empty_error(stats, cfg))
    shards = writer.finish()
    elapsed = time.time() - t0
    tok.save(os.path.join(out_dir, "tokenizer.bpe"))
    card = make_card(cfg, argv, name, source, stats, shards, tok, spec, state["trained"], elapsed, pii,
                     eval_sets, too_short, identity)
    atomic_write(os.path.join(out_dir, "card.json"), json.dumps(card, indent=2) + "\n")
    atomic_write(os.path.join(out_dir, "README.md"), render_card(card))
    shutil.rmtree(resume_dir)  # the card now says the run is complete
    print(f"done in {elapsed:.1f} s: {stats['kept']:,} of {stats['read']:,} documents kept, "
          f"{card['tokens']['train']:,} train + {card['tokens']['val']:,} val tokens in {out_dir}/")
    return card


# -----------------------------------------------------------------------------
# the data card: what exactly a model trained on these shards read

def make_card(cfg, argv, name, source, stats, shards, tok, spec, trained, elapsed, pii, eval_sets, too_short,
              identity):
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
                        "duplicate": stats["dropped_duplicate"], "contaminated": stats["dropped_contaminated"],
                        "near_duplicate": stats["dropped_near_duplicate"]},
            "kept": stats["kept"],
            "modified": {"line_endings_normalised": stats["fixed_line_endings"],
                         "control_chars_stripped": stats["stripped_control_chars"],
                         "nfc_normalised": stats["nfc_changed"]},
        },
        "near_dedup": ({"method": "MinHash LSH over word 5-grams, first of each cluster kept",
                        "bands": cfg.minhash_bands, "rows": cfg.minhash_rows,
                        "threshold": round((1 / cfg.minhash_bands) ** (1 / cfg.minhash_rows), 3)}
                       if cfg.near_dedup else None),
        "decontamination": {n: {"documents_dropped": stats[f"contaminated:{n}"], "items_too_short": too_short[n],
                                "ngram": 13} for n in eval_sets},
        "pii": ({k: {"documents": stats[f"pii_{k}_docs"], "replaced": stats[f"pii_{k}"]}
                 for k in ("email", "ipv4", "ipv6")} if pii else None),
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
        "identity": identity,  # what a re-run compares to tell the same command from another
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
        f"| dropped: shares a 13-gram with an eval set | {d['dropped']['contaminated']:,} |",
        f"| dropped: near-duplicate (MinHash) | {d['dropped']['near_duplicate']:,} |",
        f"| **kept** | **{d['kept']:,}** |", "",
        f"Modified but kept: line endings normalised in {d['modified']['line_endings_normalised']:,}, "
        f"control characters stripped from {d['modified']['control_chars_stripped']:,}, "
        f"NFC-normalised {d['modified']['nfc_normalised']:,}. "
        f"Text: {c['bytes']['read']:,} bytes read, {c['bytes']['kept']:,} kept (UTF-8).", "",
        "Near-duplicates: " + (f"MinHash, word 5-grams, {c['near_dedup']['bands']} bands x {c['near_dedup']['rows']}"
                               f" rows (threshold ~{c['near_dedup']['threshold']} Jaccard), first of each cluster "
                               f"kept." if c["near_dedup"] else "not removed (--near_dedup=False)."), "",
        "Decontamination (documents sharing a lower-cased, punctuation-free 13-gram with an eval set dropped): "
        + ("; ".join(f"{n}: {v['documents_dropped']:,} documents ({v['items_too_short']:,} items shorter than 13 "
                     f"words could not be checked)" for n, v in c["decontamination"].items()) or "none asked for")
        + ".", "",
        "Personal data: " + ("; ".join(f"{k} addresses replaced {v['replaced']:,} times in {v['documents']:,} "
                                       f"documents" for k, v in c["pii"].items()) + " (placeholders "
                             f"{EMAIL_PLACEHOLDER}, {IPV4_PLACEHOLDER}, {IPV6_PLACEHOLDER})"
                             if c["pii"] else "not replaced (--pii=False)") + ".", "",
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
