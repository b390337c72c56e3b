"""
bpe.py: a byte-level BPE tokenizer, trained from scratch, encoding through tiktoken.

Byte pair encoding (Gage 1994; for subwords Sennrich et al. 2016; byte-level in GPT-2, Radford et
al. 2019) builds a vocabulary bottom-up. Start from the 256 byte values, so every string is
representable and nothing is ever "unknown". Then repeat: find the most frequent adjacent pair of
tokens in the corpus, make it a new token, and replace the pair everywhere. Each merge shortens
the corpus a little; after N merges the vocabulary is 256 + N tokens (+ special tokens like
<|endoftext|>, which are added at the end with the following ids and are never made by merging).

Three ideas make training fast enough for real corpora (a 40k-merge vocabulary on hundreds of MB):

1. Pre-split with a regex. GPT-2 first cuts text into chunks (a word with its leading space, a
   number, a run of punctuation, a run of whitespace) and never merges across chunk boundaries, so
   "dog." and "dog!" share the token " dog" instead of learning both. The pattern is the GPT-2 one
   by default ("cl100k", GPT-4's, by name, or your own regex).
2. Count unique chunks, not text. The corpus becomes a table {chunk: count}; 12 MB of Python has
   only ~50k distinct chunks, so every later step works on the table and multiplies by counts.
   The regex is the costly part here, so large inputs are split and counted on all cores.
3. Update pair counts incrementally. The textbook loop recounts every pair after every merge:
   O(corpus) per merge, hours for a real vocabulary. But a merge of (a, b) into c can only change
   the chunks that contain (a, b), and in them only the pairs next to each merge: (x, a) and (b, y)
   give way to (x, c) and (c, y). We keep an index pair -> chunks holding it, visit only those
   chunks, and move the counts by that difference (times the chunk's count). The best pair comes
   from a max-heap with lazy invalidation: entries are never updated in place, and a popped entry
   whose count is out of date is put back with its true count. Counts only fall, except for pairs
   holding the new token, which are pushed fresh; so every live pair always has an entry at least
   its true count, and the first up-to-date entry popped is the true maximum (ties included, as
   the heap orders them by the same rule). The loop thus picks exactly the pair a full recount
   would pick, merge after merge; tests/test_bpe.py checks it against a naive trainer.

Determinism: ties in count are broken by the smallest pair of ids (left id first, then right id),
so the same corpus and settings give the same merges, and the same file, on every machine and run.

Encoding: tiktoken's Rust core (Encoding built from our ranks: token bytes -> id) does the real work,
multi-threaded in encode_batch. Its algorithm is the short pure-Python `encode_reference` below: in
each chunk, repeatedly merge the adjacent pair whose concatenation is the lowest-ranked token.
Text with lone surrogates (not encodable as UTF-8) is encoded with U+FFFD in their place, as
tiktoken does; escape them first (e.g. "backslashreplace") if they must round-trip.

The .bpe file is plain text, one merge per line, so you can read what was learned:
    bpe.py tokenizer v1
    name bpe-8192
    pattern "'(?:[sdmt]|ll|ve|re)| ?\\p{L}++| ..."
    special 8191 "<|endoftext|>"
    merges 7935
    256 32 116 " t"          <- token 256 = token 32 + token 116, shown as text
A Tokenizer.gpt2() file holds only a line "tiktoken gpt2" instead of merges.

Command line:  python bpe.py --input='data/*.txt' --vocab_size=8192 --out=tokenizer.bpe
"""
import glob
import heapq
import itertools
import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict, deque

import regex  # tiktoken's dependency; unlike `re` it knows \p{L} (letter) and \p{N} (number)
import tiktoken

from atomic import atomic_write

# GPT-2's split, as tiktoken writes it (possessive ++ avoids backtracking): contractions, an optional
# space + letters, an optional space + digits, an optional space + other symbols, then whitespace
# (a run of spaces gives its last space to the next word: "   x" -> "  ", " x").
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
_HEADER = "bpe.py tokenizer v1"  # first line of every file; bump the version when the format changes
_GPT2 = dict(vocab_size=50257, special_tokens={"<|endoftext|>": 50256})  # tiktoken's gpt2, known offline


def fix_surrogates(text):
    """str -> str that UTF-8 can encode: a surrogate pair left split (as UTF-16 sources and JSON
    escapes produce, 'a\\ud83d\\ude00b') is joined into its character ('a😀b'), and a lone surrogate
    becomes U+FFFD. This is what tiktoken does, and clean.py cleans text with the same rule."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8(text):
    """str -> UTF-8 bytes, surrogates repaired as fix_surrogates does."""
    return fix_surrogates(text).encode("utf-8")


# ------------------------------------------------------------------------------------------------
# training, step 1: split the text into chunks and count the distinct ones

def count_chunks(texts, pattern, verbose=False, batch_chars=1 << 20):
    """Stream documents, return {chunk bytes: count}. The regex is most of the cost, so inputs of
    more than one ~1 MB batch are split across all cores (worker processes: the GIL)."""
    t0 = last = time.time()
    batches = _batches(texts, batch_chars)
    first, second = next(batches, []), next(batches, None)
    if second is None:  # small input: not worth starting processes
        counts = _count_batch(first, pattern)
    else:
        counts, pending, workers, nbytes = Counter(), deque(), os.cpu_count() or 1, 0
        with multiprocessing.Pool(workers, initializer=ignore_sigint) as pool:
            for batch in itertools.chain([first, second], batches):
                nbytes += sum(map(len, batch))
                pending.append(pool.apply_async(_count_batch, (batch, pattern)))
                if len(pending) > 2 * workers:  # bounded read-ahead keeps memory flat on huge inputs
                    counts.update(pending.popleft().get())
                if verbose and time.time() - last > 2:
                    last = time.time()
                    print(f"read {nbytes / 1e6:.0f} MB ({nbytes / 1e6 / (last - t0):.1f} MB/s), "
                          f"{len(counts):,} distinct chunks so far")
            while pending:
                counts.update(pending.popleft().get())
    chunks = defaultdict(int)  # keyed by bytes: text chunks that differ only in lone surrogates collapse
    for text, n in counts.items():
        chunks[_utf8(text)] += n
    if verbose:
        print(f"split and counted in {time.time() - t0:.1f}s: {len(chunks):,} distinct chunks, "
              f"{sum(chunks.values()):,} in all")
    return chunks


def ignore_sigint():
    """A worker process's initializer: Ctrl-C is the parent's to handle (it stops the pool); workers
    that also caught it would each print a traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(texts, size):
    """Group documents into lists of about `size` characters (few, large tasks for the workers)."""
    batch, n = [], 0
    for text in texts:
        batch.append(text)
        n += len(text)
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _count_batch(batch, pattern):
    findall, counts = regex.compile(pattern).findall, Counter()  # regex caches the compiled pattern
    for text in batch:
        counts.update(findall(text))  # Counter.update of a list runs in C: the fast path
    return counts


# ------------------------------------------------------------------------------------------------
# training, step 2: the merge loop, with incremental pair counts

def learn_merges(chunks, num_merges, verbose=False):
    """{chunk bytes: count} -> list of num_merges pairs (a, b); token 256+i is the bytes of pair i."""
    # each distinct chunk as a list of token ids; 1-byte chunks have no pairs and never matter
    words = [list(c) for c in chunks if len(c) > 1]
    freqs = [n for c, n in chunks.items() if len(c) > 1]
    # A pair (a, b) is kept as the one int a << 20 | b (ids < 2^20): it hashes faster than a tuple,
    # and the heap key -count << 40 | pair is one int too, ordered by highest count, then smallest
    # pair, which is the tie rule. This makes the loop ~20% faster than with tuples.
    S = 20
    pair_counts = defaultdict(int)  # pair -> occurrences in the corpus (summed over chunk counts)
    where = defaultdict(set)        # pair -> indices of words that hold it (may hold stale entries)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for x, y in zip(w, w[1:]):
            pair_counts[x << S | y] += f
            where[x << S | y].add(i)
    heap = [-n << 2 * S | pair for pair, n in pair_counts.items()]  # a max-heap of counts, via heapq's min
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    merges = []
    t0 = last = time.time()
    while len(merges) < num_merges:
        if not heap:
            raise ValueError(f"the corpus allows only {len(merges)} merges (vocab_size at most "
                             f"{256 + len(merges)} + special tokens); give more text or a smaller vocab_size")
        key = heapq.heappop(heap)
        pair = key & ((1 << 2 * S) - 1)
        n = pair_counts.get(pair, 0)
        if n != -(key >> 2 * S):  # stale entry: the count fell since it was pushed; requeue the true count
            if n > 0:
                heapq.heappush(heap, -n << 2 * S | pair)
            continue
        # (a, b) becomes token c. Its bytes are never already a token: whatever a chunk's context,
        # the merges inside a substring that ends up as one token are those of the substring alone,
        # so each byte string is made at one step only (tiktoken's ranks need distinct bytes).
        a, b = pair >> S, pair & ((1 << S) - 1)
        c = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        # Rewrite only the words that hold (a, b). Each merge at position k changes just the pairs
        # around it: (x, a) and (b, y) vanish, (x, c) and (c, y) appear, x and y being the neighbours
        # in the new word (two adjacent merges make one (c, c), counted once).
        grown = defaultdict(set)  # pairs holding c (the only ones that can rise) -> words holding them
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            L, out, start, k = len(w), [], 0, -1  # w[start:] is not copied to out yet
            for _ in range(w.count(a)):  # jump from each a to the next at C speed
                k = w.index(a, k + 1)
                if k < start or k + 1 == L or w[k + 1] != b:
                    continue  # this a went into the previous merge (a == b), or no b follows it
                out += w[start:k]
                if out:
                    x = out[-1]
                    if start != k:  # else x is the c just made, and (b, a) is already taken off
                        pair_counts[x << S | a] -= f
                    pair_counts[x << S | c] += f
                    grown[x << S | c].add(i)
                if k + 2 < L:
                    y = w[k + 2]
                    pair_counts[b << S | y] -= f
                    if not (y == a and k + 3 < L and w[k + 3] == b):  # else y merges next: (c, c) there
                        pair_counts[c << S | y] += f
                        grown[c << S | y].add(i)
                out.append(c)
                start = k + 2
            if start:  # start == 0: a stale entry, an earlier merge already took this word's (a, b)
                words[i] = out + w[start:]
        del pair_counts[pair]  # every occurrence is merged now; (a, b) is gone for good
        for p, holders in grown.items():
            where[p] |= holders
            heapq.heappush(heap, -pair_counts[p] << 2 * S | p)
        if verbose and (time.time() - last > 2 or len(merges) == num_merges):
            last = time.time()
            print(f"merge {len(merges):>6}/{num_merges} | {len(merges) / (last - t0):6.0f} merges/s | "
                  f"count {n:>8,} | {_show(vocab[c])}")
    return merges


def _show(b):
    """Token bytes as readable text: a JSON string if valid UTF-8, else a bytes literal."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character
        return repr(b)
    return json.dumps(s, ensure_ascii=not s.isprintable())  # control chars etc. as \u escapes


def read_texts(pattern, block=1 << 20):
    """Stream the files matching a glob as pieces of about `block` characters cut at line ends,
    so a file of any size is read with bounded memory."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"no files match '{pattern}'; check the path (and quote the glob)")
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            while lines := f.readlines(block):
                yield "".join(lines)


# ------------------------------------------------------------------------------------------------
# the Tokenizer: one class for every vocabulary in the repository

class Tokenizer:
    def __init__(self, merges, pattern, special_tokens, name, tiktoken_name=None):
        """merges: list of (a, b); special_tokens: {text: id}. Use train/load/gpt2 rather than this."""
        self.merges, self.pattern, self.name = merges, pattern, name
        self.special_tokens = dict(special_tokens)
        self._tiktoken_name = tiktoken_name  # "gpt2": a stock tiktoken vocabulary, merges is None
        self._enc = None  # the tiktoken.Encoding, built on first use (gpt2 may need a download)
        if merges is not None:
            self.vocab = [bytes([i]) for i in range(256)]  # id -> bytes
            for a, b in merges:
                self.vocab.append(self.vocab[a] + self.vocab[b])
            self.ranks = {b: i for i, b in enumerate(self.vocab)}  # bytes -> id; the id is the rank

    @classmethod
    def train(cls, texts, vocab_size, pattern="gpt2", special_tokens=("<|endoftext|>",), verbose=False):
        """Learn vocab_size - 256 - len(special_tokens) merges from an iterable of documents."""
        if isinstance(texts, str):
            texts = [texts]  # one document, not an iterable of characters
        special_tokens = list(dict.fromkeys(special_tokens))  # drop repeats, keep order
        if any(not s for s in special_tokens):
            raise ValueError("special tokens must be non-empty strings")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens "
                             f"and {len(special_tokens)} special token(s), at least {256 + len(special_tokens)}")
        if vocab_size > 1 << 20:  # learn_merges packs a pair of ids into 40 bits
            raise ValueError(f"vocab_size={vocab_size} is above the 1,048,576 this trainer supports")
        pat = PATTERNS.get(pattern, pattern)
        try:
            regex.compile(pat)
        except regex.error as e:
            raise ValueError(f"pattern {pat!r} is not a valid regex ({e}); or use 'gpt2' or 'cl100k'") from None
        chunks = count_chunks(texts, pat, verbose)
        if not chunks:
            raise ValueError("empty corpus: no text to learn merges from")
        merges = learn_merges(chunks, vocab_size - 256 - len(special_tokens), verbose)
        specials = {s: 256 + len(merges) + i for i, s in enumerate(special_tokens)}
        return cls(merges, pat, specials, f"bpe-{vocab_size}")

    @classmethod
    def gpt2(cls):
        """OpenAI's GPT-2 vocabulary through tiktoken (downloaded by tiktoken on first encode)."""
        return cls(None, PATTERNS["gpt2"], _GPT2["special_tokens"], "gpt2", tiktoken_name="gpt2")

    @classmethod
    def from_spec(cls, spec):
        """'gpt2' -> Tokenizer.gpt2(); anything else is the path of a .bpe file."""
        return cls.gpt2() if spec == "gpt2" else cls.load(spec)

    @property
    def vocab_size(self):
        if self.merges is None:  # tiktoken's gpt2, plus any special tokens added after it
            return _GPT2["vocab_size"] + len(self.special_tokens) - len(_GPT2["special_tokens"])
        return 256 + len(self.merges) + len(self.special_tokens)

    def with_special_tokens(self, names):
        """A copy of this tokenizer with more special tokens, at the next free ids (finetune.py adds
        GPT-1's start, delimiter and extract tokens this way). Names it already has keep their ids."""
        new = [s for s in dict.fromkeys(names) if s not in self.special_tokens]
        if any(not isinstance(s, str) or not s for s in new):
            raise ValueError("special tokens must be non-empty strings")
        specials = {**self.special_tokens, **{s: self.vocab_size + i for i, s in enumerate(new)}}
        return Tokenizer(self.merges, self.pattern, specials, self.name, self._tiktoken_name)

    @property
    def eot_token(self):
        if "<|endoftext|>" not in self.special_tokens:
            raise ValueError(f"tokenizer {self.name} has no <|endoftext|> special token")
        return self.special_tokens["<|endoftext|>"]

    # -- encoding and decoding, through tiktoken ---------------------------------------------------

    @property
    def enc(self):
        if self._enc is None:
            if self._tiktoken_name is not None:
                try:
                    self._enc = tiktoken.get_encoding(self._tiktoken_name)
                except Exception as e:  # offline and not cached: say so rather than a requests traceback
                    raise RuntimeError(f"tiktoken could not load the '{self._tiktoken_name}' vocabulary "
                                       f"({type(e).__name__}); it is downloaded once, so run with network "
                                       f"access or set TIKTOKEN_CACHE_DIR to a cache that has it") from None
                base = self._enc
                if self.special_tokens != base._special_tokens:  # added special tokens (tiktoken's
                    # documented way to extend an encoding: its ranks and pattern, more specials)
                    self._enc = tiktoken.Encoding(f"{self.name}+{len(self.special_tokens)}", pat_str=base._pat_str,
                                                  mergeable_ranks=base._mergeable_ranks,
                                                  special_tokens=self.special_tokens)
            else:
                self._enc = tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                              special_tokens=self.special_tokens)
        return self._enc

    def _allowed(self, allowed_special):
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            allowed_special = {allowed_special}  # one name, not a set of characters
        unknown = set(allowed_special) - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"allowed_special has {sorted(unknown)}, not special tokens of {self.name} "
                             f"(it has {sorted(self.special_tokens)})")
        return set(allowed_special)

    def encode(self, text, allowed_special=()):
        """str -> ids. Special-token text is a special token only if allowed ("all" or a set);
        otherwise it is encoded as the ordinary text it is, never an error."""
        return self.enc.encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_batch(self, texts, allowed_special=(), num_threads=os.cpu_count() or 1):
        """Many documents at once; tiktoken releases the GIL, so the threads run in parallel."""
        return self.enc.encode_batch(list(texts), num_threads=num_threads, disallowed_special=(),
                                     allowed_special=self._allowed(allowed_special))

    def decode_bytes(self, ids):
        if hasattr(ids, "tolist"):  # a numpy array or torch tensor of ids
            ids = ids.tolist()
        try:
            return self.enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError) as e:  # tiktoken's words for a bad id
            raise ValueError(f"cannot decode with {self.name}: ids must be ints in 0..{self.vocab_size - 1} "
                             f"({type(e).__name__}: {e})") from None

    def decode(self, ids):
        """ids -> str; a sequence that stops inside a multi-byte character ends in U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self):
        """UTF-8 bytes each id spells, as a list indexed by id; special tokens stand for no text, 0.
        Bits per byte divide a loss in bits by the bytes of the targets: sum(lengths[y])."""
        specials = set(self.special_tokens.values())
        return [0 if i in specials else len(self.decode_bytes([i])) for i in range(self.vocab_size)]

    # -- the same encoder in pure Python: what tiktoken computes, slowly -----------------------------

    def encode_reference(self, text, allowed_special=()):
        """Reference encoder, identical output to encode(); for reading and testing, not for speed."""
        if self.merges is None:
            raise ValueError("encode_reference needs our own merges; gpt2 has none loaded")
        allowed = self.special_tokens.keys() if allowed_special == "all" else self._allowed(allowed_special)
        text = _utf8(text).decode("utf-8")  # lone surrogates -> U+FFFD, as tiktoken does
        # cut at allowed special tokens (the capture group keeps them in the list), encode the rest
        pieces = regex.split("(" + "|".join(map(regex.escape, allowed)) + ")", text) if allowed else [text]
        chunk_re, cache, ids = regex.compile(self.pattern), {}, []
        for k, piece in enumerate(pieces):
            if k % 2:  # odd pieces are the special tokens matched by the split
                ids.append(self.special_tokens[piece])
                continue
            for chunk in chunk_re.findall(piece):
                if chunk not in cache:
                    cache[chunk] = self._merge_chunk(_utf8(chunk))
                ids.extend(cache[chunk])
        return ids

    def _merge_chunk(self, b):
        """The rank-ordered merge loop: merge the adjacent pair whose concatenation is the
        lowest-ranked (earliest learned) token, until no adjacent pair is a token."""
        parts = [b[i:i + 1] for i in range(len(b))]
        rank = lambda j: self.ranks.get(parts[j] + parts[j + 1], float("inf"))  # noqa: E731
        pair_ranks = [rank(j) for j in range(len(parts) - 1)]  # pair_ranks[j]: parts j and j+1 joined
        while pair_ranks:
            r = min(pair_ranks)
            if r == float("inf"):
                break  # no adjacent pair is a token: done
            i = pair_ranks.index(r)  # the leftmost one on ties, as tiktoken does
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]  # only the two pairs next to the merge change
            if i > 0:
                pair_ranks[i - 1] = rank(i - 1)
            if i < len(parts) - 1:
                pair_ranks[i] = rank(i)
        return [self.ranks[p] for p in parts]

    # -- the file: plain text, versioned -----------------------------------------------------------

    def dumps(self):
        """The .bpe file as a string (checkpoints embed it)."""
        lines = [_HEADER, f"name {self.name}"]
        if self.merges is None:  # added special tokens (if any), then the stock vocabulary's name
            lines += [f"special {i} {json.dumps(s)}" for s, i in self.special_tokens.items()
                      if s not in _GPT2["special_tokens"]]
            lines.append(f"tiktoken {self._tiktoken_name}")
        else:
            lines.append(f"pattern {json.dumps(self.pattern)}")
            lines += [f"special {i} {json.dumps(s)}" for s, i in self.special_tokens.items()]
            lines.append(f"merges {len(self.merges)}")
            lines += [f"{256 + k} {a} {b} {_show(self.vocab[256 + k])}" for k, (a, b) in enumerate(self.merges)]
        return "\n".join(lines) + "\n"

    @classmethod
    def loads(cls, text, source="<string>"):
        """Parse dumps() output; any damage is a ValueError naming `source` and the line."""
        lines = text.split("\n")  # not splitlines(): token text may contain U+2028 and friends
        if lines[0] != _HEADER:
            if lines[0].startswith("bpe.py tokenizer "):
                raise ValueError(f"{source}: tokenizer file format '{lines[0][17:]}', this bpe.py reads "
                                 f"'{_HEADER[17:]}'; use the bpe.py that wrote it or retrain")
            raise ValueError(f"{source}: not a bpe.py tokenizer file (first line {lines[0][:40]!r})")
        header, specials, merges, k = {}, {}, [], 1
        try:
            while not lines[k].startswith("merges ") and not lines[k].startswith("tiktoken "):
                key, value = lines[k].split(" ", 1)
                if key == "special":
                    i, s = value.split(" ", 1)
                    specials[json.loads(s)] = int(i)
                else:
                    header[key] = value
                k += 1
            key, value = lines[k].split(" ", 1)
            if key == "tiktoken":
                if value != "gpt2":
                    raise ValueError(f"unknown tiktoken vocabulary '{value}'")
                tok = cls.gpt2().with_special_tokens(sorted(specials, key=specials.get))
                if tok.special_tokens != {**_GPT2["special_tokens"], **specials}:
                    raise ValueError("special token ids must follow gpt2's 50,257 tokens")
                return tok
            for k in range(k + 1, k + 1 + int(value)):
                new, a, b = map(int, lines[k].split(" ", 3)[:3])
                if new != 256 + len(merges) or not (0 <= a < new and 0 <= b < new):
                    raise ValueError("token ids out of order")
                merges.append((a, b))
            if any(line for line in lines[k + 1:]) or sorted(specials.values()) != \
                    list(range(256 + len(merges), 256 + len(merges) + len(specials))):
                raise ValueError("special token ids must follow the merges")
            tok = cls(merges, json.loads(header["pattern"]), specials, header["name"])
        except (ValueError, IndexError, KeyError) as e:
            raise ValueError(f"{source}: corrupt tokenizer file near line {k + 1}: {e}") from None
        if len(set(tok.vocab)) != len(tok.vocab):
            raise ValueError(f"{source}: corrupt tokenizer file: two tokens have the same bytes")
        return tok

    def save(self, path):
        """Write atomically: a crash never leaves half a file at `path`."""
        atomic_write(path, self.dumps())

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file '{path}': {e}") from None
        return cls.loads(text, source=path)

    def __repr__(self):
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------------
# command line: train on files, save, report compression on held-out text

if __name__ == "__main__":
    from configurator import configure

    input = "data/*.txt"            # files to learn from: a glob (quote it for the shell)
    vocab_size = 8192               # all tokens: 256 bytes + merges + specials (GPT-1: 40,000 merges)
    pattern = "gpt2"                # pre-split regex: "gpt2", "cl100k" (GPT-4) or a regex of your own
    special_tokens = ("<|endoftext|>",)
    out = "tokenizer.bpe"           # where to write the tokenizer
    heldout_every = 20              # every 20th piece of input (up to 2 MB) is kept out for the report
    configure(globals())

    heldout = []
    def training_texts():  # streams the input, setting aside the held-out pieces
        for i, text in enumerate(read_texts(input)):
            if i % heldout_every == heldout_every - 1 and sum(map(len, heldout)) < 2e6:
                heldout.append(text)
            else:
                yield text

    t0 = time.time()
    try:
        tok = Tokenizer.train(training_texts(), vocab_size, pattern, special_tokens, verbose=True)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        tok.save(out)
    except OSError as e:
        raise SystemExit(f"error: cannot write {out}: {e.strerror}; check the --out path")
    print(f"trained {tok.name} in {time.time() - t0:.1f}s, saved to {out}")
    print("first merges:", ", ".join(map(_show, tok.vocab[256:261])))
    print("last merges: ", ", ".join(map(_show, tok.vocab[256:][-5:])))
    print("longest:     ", ", ".join(map(_show, sorted(tok.vocab[256:], key=len)[-5:])))
    if heldout:
        ntok = sum(map(len, tok.encode_batch(heldout)))
        nbytes = sum(len(_utf8(t)) for t in heldout)
        print(f"held-out compression: {nbytes / ntok:.3f} bytes/token on {nbytes / 1e6:.2f} MB")
    else:
        print(f"no held-out text (input has fewer than {heldout_every} pieces): compression not measured")
