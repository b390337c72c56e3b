"""Tests for bpe.py: worked examples of what a user of the tokenizer relies on.

The "real text" is the running interpreter's own standard library (Python source, and the English
prose of pydoc's help topics), so the tests need no download and no data directory.
"""
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from bpe import PATTERNS, Tokenizer, count_chunks, learn_merges
from conftest import ROOT


def real_docs(nchars, start=0):
    """Documents of real text totalling about nchars, skipping the first `start` characters:
    pydoc's help topics (prose with code), then stdlib .py files, in a fixed order."""
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                docs.append(f.read())
    out, seen = [], 0
    for d in docs:
        if seen >= start + nchars:
            break
        if seen + len(d) > start:
            out.append(d)
        seen += len(d)
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(real_docs(400_000), vocab_size=2048)


HOSTILE = [
    "",
    "hello world",
    "中文混合English와 한국어 and العربية مرحبا بالعالم and हिन्दी देवनागरी",
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 🧑🏿‍🚀 astronaut",
    "e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353a\u0300\u0301\u0302lgo\u0489",  # combining marks stacked
    "\ud800 lone high and \udfff lone low".encode("utf-8", "backslashreplace").decode("ascii"),  # escaped
    "nul\x00and\x01\x02\x1b[31mcontrol\x7f\x1c\x1f\r\n\t\x0b\x0c",
    "a" * 5000,
    " " * 3000 + "\n" * 1000,
    "😀" * 1000,
    "<|endoftext|> is text here, ' s 're 12345678901 ½ ² Ⅻ \u2028\u2029\u00a0\u3000",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_round_trip_hostile_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode_reference(text) == ids


def test_round_trip_with_merges_inside_multibyte_characters():
    # trained on the hostile text itself, merges join pieces of UTF-8 characters and emoji sequences
    t = Tokenizer.train(HOSTILE * 3, vocab_size=400)
    for text in HOSTILE:
        ids = t.encode(text)
        assert t.decode(ids) == text and t.encode_reference(text) == ids
    assert len(t.encode("👩‍👩‍👧‍👦")) < len("👩‍👩‍👧‍👦".encode())  # it did learn something there


def test_lone_surrogates_become_replacement_char(tok):
    # a str with a lone surrogate has no UTF-8 form; like tiktoken we encode U+FFFD in its place
    ids = tok.encode("a\ud800b")
    assert tok.decode(ids) == "a\ufffdb"
    assert tok.encode_reference("a\ud800b") == ids
    assert tok.encode("\ud83d\ude00") == tok.encode("😀")  # a valid surrogate pair is the character


def test_decode_stops_inside_a_character(tok):
    ids = tok.encode("é中")
    raw = "é中".encode()
    partial = [raw[0]]  # the lone first byte of "é" (ids 0..255 are the bytes)
    assert tok.decode(partial) == "\ufffd"
    assert tok.decode_bytes(partial) == raw[:1]
    assert tok.decode(ids) == "é中"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "é中"  # as read back from a uint16 shard
    for bad in ([2048], [-1], ["a"]):
        with pytest.raises(ValueError, match="0..2047"):
            tok.decode(bad)


def test_wikipedia_example_by_hand():
    # "aaabdaaabac": (a,a) occurs twice -> Z = 256: "ZabdZabac". Now (Z,a) and (a,b) tie at 2 each;
    # the rule takes the smaller pair of ids, (97, 98) -> Y = 257: "ZYdZYac"; then (Z,Y) -> 258.
    t = Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 3, special_tokens=())
    assert t.merges == [(97, 97), (97, 98), (256, 257)]
    assert t.vocab[256:] == [b"aa", b"ab", b"aaab"]
    assert t.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_merges_do_not_cross_chunks():
    # "b." is the most frequent pair of bytes, but the regex cuts between letter and dot. In the
    # chunks " ab", " ab": (" ", a) and (a, b) tie at 2 -> " a" (smaller ids), then (" a", b) -> " ab"
    t = Tokenizer.train(["b.b.b.b.b. ab ab"], vocab_size=256 + 2, special_tokens=())
    assert t.vocab[256:] == [b" a", b" ab"]


def naive_merges(chunks, num_merges):
    """Textbook BPE: recount every pair of every chunk after each merge (minbpe-style, but over
    distinct chunks with counts). Same tie rule: highest count, then the smallest pair of ids."""
    words = {tuple(c): n for c, n in chunks.items()}
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + n
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merges.append(best)
        new_words = {}
        for w, n in words.items():
            out, j = [], 0
            while j < len(w):
                if w[j:j + 2] == best:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def test_incremental_equals_naive_on_real_text():
    chunks = count_chunks(real_docs(300_000, start=100_000), PATTERNS["gpt2"])
    assert learn_merges(chunks, 250) == naive_merges(chunks, 250)


def test_incremental_equals_naive_down_to_ties():
    # a small text trained far: late merges have counts of 2 or 3 and break ties all the time
    chunks = count_chunks(real_docs(30_000), PATTERNS["cl100k"])
    merges = learn_merges(chunks, 1200)
    assert merges == naive_merges(chunks, 1200)
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    assert len(set(vocab)) == len(vocab)  # every token distinct bytes (what tiktoken requires)


def test_parallel_counting_equals_serial():
    docs = real_docs(300_000)
    serial = count_chunks(docs, PATTERNS["gpt2"], batch_chars=10**9)
    parallel = count_chunks(iter(docs), PATTERNS["gpt2"], batch_chars=40_000)  # ~8 batches -> pool
    assert serial == parallel and len(serial) > 1000


def test_same_input_gives_the_same_file_byte_for_byte(tmp_path):
    # in two fresh processes with different hash seeds: nothing may depend on set or dict order
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import bpe, test_bpe; "
              "bpe.Tokenizer.train(test_bpe.real_docs(200_000), 1000).save(sys.argv[2])")
    paths = []
    for seed in ("1", "2"):
        path = tmp_path / f"tok{seed}.bpe"
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.path.dirname(__file__))
        subprocess.run([sys.executable, "-c", script, ROOT, str(path)], check=True, env=env)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert Tokenizer.load(paths[0]).dumps() == paths[0].read_text(encoding="utf-8")


def test_tiktoken_equals_pure_python_on_1mb(tok):
    text = "".join(real_docs(1_000_000, start=400_000))  # mostly text the tokenizer never saw
    assert len(text) > 900_000
    ids = tok.encode(text)
    assert tok.encode_reference(text) == ids
    assert tok.decode(ids) == text
    docs = real_docs(200_000, start=400_000)
    assert tok.encode_batch(docs, num_threads=2) == [tok.encode(d) for d in docs]


def test_special_tokens(tok):
    text = "one<|endoftext|>two"
    plain = tok.encode(text)  # not allowed: encoded as the ordinary text it is, no error
    assert tok.eot_token not in plain and tok.decode(plain) == text
    allowed = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert allowed == tok.encode("one") + [tok.eot_token] + tok.encode("two")
    assert tok.encode(text, allowed_special="all") == allowed == tok.encode(text, allowed_special="<|endoftext|>")
    assert tok.encode_reference(text, allowed_special="all") == allowed
    assert tok.decode(allowed) == text
    with pytest.raises(ValueError, match="<|eot|>"):
        tok.encode(text, allowed_special={"<|eot|>"})
    assert tok.eot_token == tok.vocab_size - 1 == 2047 and tok.special_tokens == {"<|endoftext|>": 2047}


def test_special_tokens_never_come_from_merges():
    # the spelling of the special token is the most frequent thing in this corpus
    t = Tokenizer.train(["<|endoftext|> hello <|pad|>"] * 200, vocab_size=256 + 16 + 2,
                        special_tokens=("<|endoftext|>", "<|pad|>"))
    assert t.special_tokens == {"<|endoftext|>": 272, "<|pad|>": 273} and t.vocab_size == 274
    assert b"<|endoftext|>" not in t.vocab and t.eot_token not in t.encode("<|endoftext|>")
    assert t.encode("<|pad|>x", allowed_special={"<|pad|>"}) == [273, ord("x")]
    assert Tokenizer.loads(t.dumps()).special_tokens == t.special_tokens


def test_file_is_readable_and_round_trips(tok, tmp_path):
    text = tok.dumps()
    lines = text.split("\n")
    assert lines[0] == "bpe.py tokenizer v1" and "name bpe-2048" in lines
    assert 'special 2047 "<|endoftext|>"' in lines and "merges 1791" in lines
    assert any(line.startswith("256 ") and line.endswith('"  "') for line in lines)  # two spaces, shown
    path = tmp_path / "t.bpe"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.merges == tok.merges and back.pattern == tok.pattern and back.dumps() == text
    assert back.encode("def f(x):\n    return x") == tok.encode("def f(x):\n    return x")
    assert Tokenizer.from_spec(str(path)).vocab_size == 2048
    assert [p.name for p in tmp_path.iterdir()] == ["t.bpe"]  # no temporary file left behind


def test_gpt2_marker_file(tmp_path):
    # the marker works offline; encoding with it needs tiktoken's gpt2 download (not tested here)
    g = Tokenizer.gpt2()
    assert (g.name, g.vocab_size, g.eot_token) == ("gpt2", 50257, 50256)
    g.save(tmp_path / "g.bpe")
    assert (tmp_path / "g.bpe").read_text() == "bpe.py tokenizer v1\nname gpt2\ntiktoken gpt2\n"
    back = Tokenizer.load(tmp_path / "g.bpe")
    assert (back.name, back.vocab_size) == ("gpt2", 50257) and Tokenizer.from_spec("gpt2").name == "gpt2"


def test_error_empty_corpus():
    for texts in ([], [""], iter([])):
        with pytest.raises(ValueError, match="empty corpus"):
            Tokenizer.train(texts, vocab_size=300)


def test_error_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["some text"], vocab_size=256)
    assert Tokenizer.train(["some text"], vocab_size=257).vocab_size == 257  # no merges: bytes only
    with pytest.raises(ValueError, match="1,048,576"):
        Tokenizer.train(["some text"], vocab_size=1 << 21)


def test_error_bad_pattern():
    with pytest.raises(ValueError, match="not a valid regex"):
        Tokenizer.train(["some text"], vocab_size=300, pattern="gtp2(")


def test_error_vocab_size_too_large():
    with pytest.raises(ValueError, match="allows only 3 merges"):
        Tokenizer.train(["abcd"], vocab_size=1000)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s[: len(s) // 2], "corrupt"),                      # truncated mid-way
    (lambda s: s.replace("merges 1791", "merges 1792"), "corrupt"),  # count disagrees
    (lambda s: s.replace("\n300 ", "\n301 ", 1), "corrupt"),      # ids out of order
    (lambda s: s.replace("\n260 ", "\n260 x", 1), "corrupt"),     # not a number
    (lambda s: s.replace("special 2047", "special 9999"), "corrupt"),
    (lambda s: s.replace("tokenizer v1", "tokenizer v2"), "v2"),  # another version
    (lambda s: "PK\x03\x04" + s, "not a bpe.py tokenizer file"),
    (lambda s: "", "not a bpe.py tokenizer file"),
])
def test_error_corrupt_file(tok, tmp_path, damage, message):
    path = tmp_path / "bad.bpe"
    path.write_text(damage(tok.dumps()), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value)


def test_error_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="missing.bpe"):
        Tokenizer.load(tmp_path / "missing.bpe")
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bin.bpe"):
        Tokenizer.load(tmp_path / "bin.bpe")


def test_command_line(tmp_path):
    for i, doc in enumerate(real_docs(150_000)):
        (tmp_path / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "t.bpe"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bpe.py"), f"--input={tmp_path}/*.txt",
                          "--vocab_size=600", f"--out={out}"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "merge    343/343" in run.stdout and "bytes/token" in run.stdout
    assert Tokenizer.load(out).vocab_size == 600
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bpe.py"), f"--input={tmp_path}/*.txt",
                          "--vocab_size=100"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: vocab_size=100 is too small")
    assert len(bad.stderr.strip().splitlines()) == 1
