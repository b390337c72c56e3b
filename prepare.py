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

Cleaning and filtering are clean.py's, whose docstring says what each step does and why. Cleaning
(line endings to "\n", garbage documents dropped, control characters other than "\n" and "\t" stripped,
NFC, short documents dropped) and exact dedup always run; decontaminate (--decontaminate), near-dedup
(--near_dedup) and PII (--pii) are on by default for the hub and --input, off for stdlib, so the quick
start's corpus and the figures measured on it stay as they were. The card counts what each step changed or
dropped.

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
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from glob import escape as glob_escape, glob
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from atomic import atomic_write
from bpe import Tokenizer, ignore_sigint
from clean import EMAIL_PLACEHOLDER, IPV4_PLACEHOLDER, IPV6_PLACEHOLDER, Filters, eval_ngrams, remove_pii
from configurator import UserError, check_hub, configure, run
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
license_id = ""  # licence of a local corpus as you know it, for the data card ("" = unknown)
data_dir = "data"  # the folder that holds data/<name>/ (train.py reads it from there)
tokenizer = ""  # "gpt2", a path to a .bpe file, or "train"; "" = train for stdlib, gpt2 otherwise
vocab_size = 4096  # --tokenizer=train; small for the CPU quick start (GPT-1's recipe: 256 + 40,000 merges + 1)
bpe_train_mb = 100  # --tokenizer=train: train on the first this many MB (10^6 bytes) of cleaned text
min_chars = 64  # drop shorter documents (stdlib: empty __init__.py files and one-line stubs)
max_garbage = 0.25  # drop documents whose characters are more than this fraction U+FFFD or control chars
shard_size = 100_000_000  # tokens per train shard (llm.c's FineWeb shards: 100M)
val_tokens = 10_000_000  # validation gets the first min(val_tokens, val_fraction * corpus) tokens
val_fraction = 0.1  # (see val_tokens): a small corpus gives val this fraction, not 10M tokens
num_proc = os.cpu_count() or 1  # tokenizer worker processes
pii = None  # e-mail and public IP addresses to placeholders; None = on for the hub and --input, off for stdlib
near_dedup = None  # MinHash near-duplicate removal (FineWeb's stage); None = on for the hub and --input, off for stdlib
minhash_bands = 14  # b bands of r rows: FineWeb's 14 x 8 (112 hashes) drop pairs above Jaccard ~0.7, see NearDuplicates
minhash_rows = 8  # r: rows per band; more rows, a higher Jaccard threshold
decontaminate = ""  # comma-separated eval files (eval.py's formats): drop training documents sharing a 13-gram with one
overwrite = False  # start over in a folder that holds another command's output (default: resume, or refuse)
# -----------------------------------------------------------------------------

_FINEWEB = "HuggingFaceFW/fineweb-edu"
_FINEWEB_LICENSE = ("ODC-By 1.0 (Open Data Commons Attribution License), as stated on the dataset card; "
                    "use is also subject to CommonCrawl's Terms of Use")
_TOO_BIG = (f"does not fit the uint16 token shards (ids must be below {MAX_VOCAB:,}, as in llm.c's format); "
            f"use a vocabulary of at most {MAX_VOCAB:,}")


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
                "num_files": len(files), "license": cfg.license_id or "unknown (not stated for local input)"}
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
    check_hub("offline, use --dataset=stdlib (the Python standard library) or --input=PATH (local "
              ".txt/.jsonl/.parquet files)")
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

@dataclass
class Preparation:
    """One run: its settings and what prepare() makes of them before the long work begins. The pipeline
    (_prepare) and the data card (make_card) read everything they need from it."""
    cfg: SimpleNamespace  # the settings at the top of this file, as the command line set them
    argv: list            # the command's arguments, for the card
    name: str             # the shard prefix, and the output folder's name
    out_dir: str          # data_dir/<name>/
    docs_fn: Callable     # docs_fn(start=None): the source's documents from a resume position (see the sources)
    source: dict          # the card's account of the source (resolve_source)
    spec: str             # the tokenizer: "train", "gpt2" or a .bpe path
    pii: bool             # --pii as it applies to this source
    eval_sets: dict       # decontamination: {eval file name: its 13-gram hashes} (clean.eval_ngrams)
    too_short: dict       # {eval file name: items too short to have a 13-gram}
    identity: dict        # what the output depends on: a re-run compares it with the saved one


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
    prep = Preparation(cfg=cfg, argv=list(argv), name=name, out_dir=out_dir, docs_fn=docs_fn, source=source,
                       spec=spec, pii=pii, eval_sets=eval_sets, too_short=too_short, identity=identity)
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
        return _prepare(prep, tok, found)
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


def _prepare(prep, tok, saved):
    """The long work of prep, in its folder: the tokenizer (trained, unless tok is given), the shards, the card.
    saved: the resume state of an interrupted run of the same command, or None."""
    cfg, out_dir, pii, eval_sets = prep.cfg, prep.out_dir, prep.pii, prep.eval_sets
    resume_dir = os.path.join(out_dir, "resume")
    os.makedirs(resume_dir, exist_ok=True)
    state_file, tok_file = os.path.join(resume_dir, "state.json"), os.path.join(resume_dir, "tokenizer.bpe")
    state = saved or {"identity": prep.identity, "trained": None, "at": None}
    atomic_write(state_file, json.dumps(state))  # first: a kill even mid-training leaves a run to resume
    if tok is None and os.path.exists(tok_file):  # trained before the interruption: the very same merges
        tok = Tokenizer.load(tok_file)
    elif tok is None:
        tok, state["trained"] = train_tokenizer(cfg, prep.docs_fn, Filters(cfg, pii, eval_sets))
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

    writer = ShardWriter(out_dir, prep.name, cfg.shard_size, cfg.val_tokens, cfg.val_fraction,
                         at["shards"] if at else (), checkpoint)
    ntok, prev = writer.written - skip, filters.snapshot()
    t0 = last = time.time()
    batches = filters.batches(prep.docs_fn(at["pos"] if at else None))
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
    card = make_card(prep, stats, shards, tok, state["trained"], elapsed)
    atomic_write(os.path.join(out_dir, "card.json"), json.dumps(card, indent=2) + "\n")
    atomic_write(os.path.join(out_dir, "README.md"), render_card(card))
    shutil.rmtree(resume_dir)  # the card now says the run is complete
    print(f"done in {elapsed:.1f} s: {stats['kept']:,} of {stats['read']:,} documents kept, "
          f"{card['tokens']['train']:,} train + {card['tokens']['val']:,} val tokens in {out_dir}/")
    return card


# -----------------------------------------------------------------------------
# the data card: what exactly a model trained on these shards read

def make_card(prep, stats, shards, tok, trained, elapsed):
    """The data card of prep's finished run (a dict; render_card writes it as README.md). stats: the counts of
    every filter step; shards: the files written; trained: what the tokenizer was trained on, or None."""
    import importlib.metadata as md
    cfg = prep.cfg
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
        "name": prep.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "prepare.py", *prep.argv]),
        "settings": dict(vars(cfg)),
        "source": prep.source,
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
        "decontamination": {n: {"documents_dropped": stats[f"contaminated:{n}"],
                                "items_too_short": prep.too_short[n], "ngram": 13} for n in prep.eval_sets},
        "pii": ({k: {"documents": stats[f"pii_{k}_docs"], "replaced": stats[f"pii_{k}"]}
                 for k in ("email", "ipv4", "ipv6")} if prep.pii else None),
        "bytes": {"read": stats["bytes_read"], "kept": stats["bytes_kept"]},
        "tokenizer": {"spec": prep.spec, "name": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token,
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
        "identity": prep.identity,  # what a re-run compares to tell the same command from another
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
    cfg = configure(globals(), argv, renamed={"license": ("license_id", "")})
    return prepare(SimpleNamespace(**cfg), argv)


if __name__ == "__main__":
    run(main)
