r"""
clean.py: what a document must pass on its way into the token shards, in this order (Filters.batches):

    clean -> exact dedup -> decontaminate -> near-dedup -> PII

prepare.py streams documents through these steps in ~1 MB batches and puts every count they keep into the
data card. Each step's state is exact and only grows, so a resumed run makes the same decisions as an
uninterrupted one: the hash sets are saved as append-only logs, of which a prefix is the state at a shard.

Cleaning, each step counted in the card, in this order: line endings to "\n"; drop documents that are mostly
garbage (U+FFFD replacement characters or control characters: binary files, bad decodes); strip control
characters other than "\n" and "\t"; Unicode NFC (so the same text always has the same bytes, hence the same
tokens and the same hash); drop documents shorter than min_chars; drop exact duplicates of the normalised
text. Dedup keeps a 64-bit BLAKE2b digest per distinct document (8 bytes each, in sorted numpy runs, see
HashSet) rather than the texts; a 64-bit digest makes a false duplicate among 10^7 documents a ~3e-6 event.

Filters, each counted in the card (prepare.py says when each is on):
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
  It needs no state, so prepare.py runs it in its tokenizer workers.
"""
import hashlib
import os
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np

from bpe import fix_surrogates
from configurator import UserError
from rows import read_rows

# -----------------------------------------------------------------------------
# cleaning and exact dedup

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
    read. Read as eval.py reads it (rows.read_rows)."""
    texts = []
    for r in read_rows(path, "--decontaminate"):
        try:
            if "query" in r:
                texts.append(r["query"] + " " + r["choices"][r["gold"]])
            elif "ctx_a" in r:
                texts.append(r["ctx_a"] + " " + r["ctx_b"] + " " + r["endings"][int(r["label"])])
            else:
                texts.append(r["text"])
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserError(f"{r['__row__']}: not an item of eval.py's formats ({{query, choices, gold}}, "
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

_BATCH_CHARS = 1 << 20  # documents are cleaned, deduplicated and encoded in batches of ~1M characters


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
    runs in prepare.py's workers, in pii_and_encode), and the state a resume restores: the source position,
    the counts for the card, the two hash sets. cfg holds prepare.py's settings (min_chars, max_garbage,
    near_dedup, minhash_bands, minhash_rows); folder, the resume/ folder that keeps the hash sets' logs."""

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
