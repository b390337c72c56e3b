"""prepare.py: local files through the streaming path to shards that decode back to the cleaned documents,
the counts in the data card, the shard format and its checks, and the errors a user sees."""
import json
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter
from glob import glob
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import clean
import prepare
from bpe import Tokenizer
from shards import read_shard, write_shard

# documents as a source might hold them, and what cleaning must make of them
RAW = [
    "The first document.\r\nIt was written on Windows,\r\nso its lines end in CR LF.",
    "A cafe\u0301 written with a combining accent becomes one precomposed character in NFC.",
    "Control\x00 characters\x07 are stripped,\tbut the tab\nand the newline stay.",
    "Plain ASCII text that needs no change at all, long enough to pass min_chars.",
    "Emoji \U0001F469\u200D\U0001F4BB and CJK \u4e2d\u6587 and Arabic "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 survive.",
    "A document that mentions <|endoftext|> as text: it must stay text, not become the special token.",
]
CLEAN = [
    "The first document.\nIt was written on Windows,\nso its lines end in CR LF.",
    "A caf\u00e9 written with a combining accent becomes one precomposed character in NFC.",
    "Control characters are stripped,\tbut the tab\nand the newline stay.",
    RAW[3], RAW[4], RAW[5],
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A small BPE (vocab 320) trained on real text, so every test encodes quickly."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = [(root / f).read_text(encoding="utf-8") for f in ("os.py", "textwrap.py", "string.py")]
    path = tmp_path_factory.mktemp("tok") / "small.bpe"
    Tokenizer.train(text + CLEAN, 320).save(str(path))
    return str(path)


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return str(path)


def write_parquet(path, docs):
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return str(path)


def run(tmp_path, *flags, name="t"):
    """prepare.py's command line, in process; returns (card, out_dir)."""
    card = prepare.main([f"--data_dir={tmp_path / 'data'}", f"--name={name}", "--num_proc=1", *flags])
    return card, tmp_path / "data" / name


def shard_files(out_dir, name="t"):
    return sorted(glob(f"{out_dir}/{name}_val_*.bin")) + sorted(glob(f"{out_dir}/{name}_train_*.bin"))


def token_stream(out_dir, name="t"):
    return np.concatenate([read_shard(f) for f in shard_files(out_dir, name)])


def split_docs(tokens, eot):
    """The token stream is <eot> doc <eot> doc ...: return the documents' ids."""
    assert tokens[0] == eot, "the stream must start with the end-of-text token"
    cuts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b].tolist() for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


# -----------------------------------------------------------------------------
# the streaming path, end to end

def test_jsonl_and_parquet_decode_back_to_cleaned_documents(tmp_path, tok_path):
    jl = write_jsonl(tmp_path / "c.jsonl", RAW)
    pa_ = write_parquet(tmp_path / "c.parquet", RAW)
    tok = Tokenizer.load(tok_path)
    streams = []
    for name, path in (("jl", jl), ("pq", pa_)):
        card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=20",
                        "--shard_size=64", "--val_tokens=50", name=name)
        tokens = token_stream(out, name)
        docs = split_docs(tokens, tok.eot_token)
        assert [tok.decode(d) for d in docs] == CLEAN
        # the special token's spelling inside a document was encoded as text, so only separators are eot
        assert (tokens == tok.eot_token).sum() == len(CLEAN)
        assert Tokenizer.load(out / "tokenizer.bpe").dumps() == tok.dumps()  # saved next to the shards
        assert card["documents"]["kept"] == len(CLEAN) and card["tokens"]["total"] == len(tokens)
        streams.append(tokens)
    np.testing.assert_array_equal(*streams)  # same documents, same tokens, whatever the container


def test_txt_files_one_document_per_file_or_split_on_separator(tmp_path, tok_path):
    tok = Tokenizer.load(tok_path)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(CLEAN[:3]):
        (folder / f"{i}.txt").write_text(d, encoding="utf-8")
    _, out = run(tmp_path, f"--input={folder}/*.txt", f"--tokenizer={tok_path}", "--min_chars=20", name="a")
    assert [tok.decode(d) for d in split_docs(token_stream(out, "a"), tok.eot_token)] == CLEAN[:3]
    (tmp_path / "all.txt").write_text("\n===\n".join(CLEAN), encoding="utf-8")
    _, out = run(tmp_path, f"--input={tmp_path / 'all.txt'}", "--separator=\n===\n", f"--tokenizer={tok_path}",
                 "--min_chars=20", name="b")
    assert [tok.decode(d) for d in split_docs(token_stream(out, "b"), tok.eot_token)] == CLEAN


def test_train_and_val_are_disjoint_and_hold_every_token(tmp_path, tok_path):
    docs = [f"Document number {i}: " + " ".join(f"word{j * i % 97}" for j in range(40)) for i in range(60)]
    card, out = run(tmp_path, f"--input={write_jsonl(tmp_path / 'c.jsonl', docs)}", f"--tokenizer={tok_path}",
                    "--shard_size=1000", "--val_tokens=700")
    tok = Tokenizer.load(tok_path)
    expected = np.concatenate([[tok.eot_token] + tok.encode(d) for d in docs])  # encoded independently
    files = shard_files(out)
    assert [Path(f).name for f in files] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin"
                                                                    for i in range(1, len(files))]
    val = read_shard(files[0])
    train = [read_shard(f) for f in files[1:]]
    assert len(val) == min(700, int(0.1 * len(expected)))  # val is capped at a tenth of the corpus
    assert all(len(t) == 1000 for t in train[:-1]) and 0 < len(train[-1]) <= 1000
    # val then train, in order, is exactly the token stream: nothing lost, nothing repeated
    np.testing.assert_array_equal(np.concatenate([val] + train), expected)
    text_tokens = sum(len(tok.encode(d)) for d in docs)  # without the separators
    assert card["tokens"] == {"train": len(expected) - len(val), "val": len(val), "total": len(expected),
                              "bytes_per_token": pytest.approx(sum(len(d.encode()) for d in docs) / text_tokens,
                                                               abs=5e-5)}  # the card keeps 4 decimals
    # at scale val_tokens is the smaller of the two and val holds exactly that many tokens
    _, out = run(tmp_path, f"--input={tmp_path / 'c.jsonl'}", f"--tokenizer={tok_path}",
                 "--shard_size=1000", "--val_tokens=100", name="u")
    assert len(read_shard(shard_files(out, "u")[0])) == 100


def test_parallel_workers_give_identical_shards(tmp_path, tok_path):
    docs = [f"{i} " + "some text that repeats with a twist " * (1 + i % 7) + str(i * i) for i in range(400)]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    outs = [run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=1", f"--num_proc={n}",
                "--shard_size=3000", "--val_tokens=500", name=f"p{n}")[1] for n in (1, 2)]
    files = [shard_files(o, f"p{n}") for o, n in zip(outs, (1, 2))]
    assert len(files[0]) == len(files[1]) > 2
    for a, b in zip(*files):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_tokenizer_train_saves_the_trained_vocabulary(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [(root / f).read_text(encoding="utf-8") for f in ("textwrap.py", "string.py", "shlex.py")]
    # --pii=False: textwrap.py's "Written by Greg Ward <gward@...>" would become email@example.com
    card, out = run(tmp_path, f"--input={write_jsonl(tmp_path / 'c.jsonl', docs)}", "--tokenizer=train",
                    "--vocab_size=300", "--pii=False")
    tok = Tokenizer.load(out / "tokenizer.bpe")
    assert tok.vocab_size == 300 and card["tokenizer"]["vocab_size"] == 300
    assert card["tokenizer"]["trained_on"] == {"docs": 3, "bytes": sum(len(d.encode()) for d in docs)}
    assert [tok.decode(d) for d in split_docs(token_stream(out), tok.eot_token)] == docs


def test_a_different_command_is_refused_and_overwrite_starts_over(tmp_path, tok_path):
    docs = [f"Document {i}, " + "filler words to make it longer " * 5 for i in range(30)]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    flags = [f"--input={path}", f"--tokenizer={tok_path}", "--near_dedup=False"]
    run(tmp_path, *flags, "--shard_size=200", "--val_tokens=100")
    assert len(shard_files(tmp_path / "data" / "t")) > 5
    with pytest.raises(SystemExit, match=r"data/t/ holds the output of another command \(--shard_size=200 there, "
                                         r"100000 here\); to start over: the same command with --overwrite=True"):
        run(tmp_path, *flags, "--shard_size=100000")
    card, out = run(tmp_path, *flags, "--shard_size=100000", "--overwrite=True")
    assert [Path(f).name for f in shard_files(out)] == ["t_val_000000.bin", "t_train_000001.bin"]
    assert not glob(f"{out}/*.tmp") and not (out / "resume").exists()
    assert sum(len(read_shard(f)) for f in shard_files(out)) == card["tokens"]["total"]


# -----------------------------------------------------------------------------
# the data card: each filter moves exactly its own count

BASE = [f"Base document {i} with enough characters to pass the length filter." for i in range(5)]


def counts(card):
    d = card["documents"]
    return {"read": d["read"], "kept": d["kept"], **d["dropped"], **d["modified"]}


@pytest.mark.parametrize("extra, delta", [
    (BASE[2], {"read": 1, "duplicate": 1}),
    ("too short", {"read": 1, "shorter_than_min_chars": 1}),
    ("\x00\x01\x02\x03\ufffd\ufffd binary junk \x04\x05\x06\x07\x08\ufffd\ufffd\ufffd\x0e\x0f\x10\x11",
     {"read": 1, "garbage": 1}),
    ("Base document with an accent on the cafe\u0301, new text of enough length.",
     {"read": 1, "kept": 1, "nfc_normalised": 1}),
    ("Base document\r\nwith Windows line endings,\r\nnew text of enough length.",
     {"read": 1, "kept": 1, "line_endings_normalised": 1}),
    ("Base document with a stray\x0c form feed and bell\x07, new text of enough length.",
     {"read": 1, "kept": 1, "control_chars_stripped": 1}),
])
def test_each_filter_changes_its_count_in_the_card(tmp_path, tok_path, extra, delta):
    flags = [f"--tokenizer={tok_path}", "--min_chars=40"]
    base, _ = run(tmp_path, f"--input={write_jsonl(tmp_path / 'a.jsonl', BASE)}", *flags, name="a")
    more, _ = run(tmp_path, f"--input={write_jsonl(tmp_path / 'b.jsonl', BASE + [extra])}", *flags, name="b")
    assert counts(base) == {"read": 5, "kept": 5, "missing_text": 0, "garbage": 0, "shorter_than_min_chars": 0,
                            "duplicate": 0, "contaminated": 0, "near_duplicate": 0, "line_endings_normalised": 0,
                            "control_chars_stripped": 0,
                            "nfc_normalised": 0}
    assert {k: counts(more)[k] - counts(base)[k] for k in counts(base)} == \
        {k: delta.get(k, 0) for k in counts(base)}


def test_nfd_and_nfc_spellings_are_one_document(tmp_path, tok_path):
    nfc = "Une phrase en fran\u00e7ais: le caf\u00e9 est d\u00e9j\u00e0 pr\u00eat, et c'est tr\u00e8s bien."
    nfd = "Une phrase en fran\u00e7ais: le cafe\u0301 est de\u0301ja\u0300 pr\u00eat, et c'est tre\u0300s bien."
    card, _ = run(tmp_path, f"--input={write_jsonl(tmp_path / 'c.jsonl', [nfc, nfd])}", f"--tokenizer={tok_path}",
                  "--min_chars=10")
    assert counts(card)["kept"] == 1 and counts(card)["duplicate"] == 1 and counts(card)["nfc_normalised"] == 1


def test_card_records_source_command_and_tokens(tmp_path, tok_path):
    path = write_jsonl(tmp_path / "c.jsonl", RAW)
    card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=20",
                    "--license_id=CC-BY-4.0")
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk == card
    assert card["source"]["files"] == [{"path": os.path.abspath(path), "bytes": os.path.getsize(path)}]
    assert card["source"]["license"] == "CC-BY-4.0"
    assert f"--input={path}" in card["command"] and card["command"].startswith("python prepare.py")
    assert card["tokenizer"]["vocab_size"] == 320
    text_bytes = sum(len(d.encode()) for d in CLEAN)
    assert card["bytes"]["kept"] == text_bytes
    # UTF-8 bytes of the cleaned text per token of it, the separators not counted: encoded here, on its own
    text_tokens = sum(len(Tokenizer.load(tok_path).encode(d)) for d in CLEAN)
    assert card["tokens"]["bytes_per_token"] == pytest.approx(text_bytes / text_tokens, abs=5e-5)
    readme = (out / "README.md").read_text()
    assert "CC-BY-4.0" in readme and f"--input={path}" in readme and "| **kept** | **6** |" in readme


def test_stdlib_source_is_library_code_in_a_fixed_mixed_order():
    root, files = prepare._stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    assert 8e6 < sum(f.stat().st_size for f in files) < 20e6  # ~12 MB on CPython 3.11
    docs = [text for text, _ in prepare._stdlib_docs()]
    assert docs == [text for text, _ in prepare._stdlib_docs()]  # the same order every run
    assert [t for t, _ in prepare._stdlib_docs(start=5)] == docs[5:]  # a resume starts at a document
    from pydoc_data.topics import topics
    assert len(docs) == len(files) + len(topics) and topics["assert"] in docs
    first = [(root / r).read_bytes().decode() for r in rel[:5]]
    assert docs[:5] != first  # shuffled: val (the first tokens) is not just the a-z head of the library


# -----------------------------------------------------------------------------
# the shard format

def test_shard_header_and_reader_checks(tmp_path):
    path = str(tmp_path / "s.bin")
    tokens = np.arange(1000, dtype=np.uint16) * 60
    write_shard(path, tokens)
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 1000] and len(raw) == 1024 + 2000  # llm.c's layout
    np.testing.assert_array_equal(read_shard(path), tokens)

    Path(path).write_bytes(raw[:-2])  # one token short
    with pytest.raises(ValueError, match=f"shard {path}: 3022 bytes but the header says 1000 tokens.*truncated"):
        read_shard(path)
    Path(path).write_bytes(raw[:100])
    with pytest.raises(ValueError, match=f"shard {path}: truncated: 100 bytes"):
        read_shard(path)
    Path(path).write_bytes(np.int32(20240521).tobytes() + raw[4:])
    with pytest.raises(ValueError, match=f"shard {path}: wrong magic number 20240521"):
        read_shard(path)
    Path(path).write_bytes(raw[:4] + np.int32(2).tobytes() + raw[8:])
    with pytest.raises(ValueError, match="unsupported version 2"):
        read_shard(path)
    with pytest.raises(ValueError, match="no_such.bin"):
        read_shard(str(tmp_path / "no_such.bin"))
    with pytest.raises(ValueError, match="0..65535"):
        write_shard(path, [1, 2, 70000])


def test_shard_writer_cuts_a_stream_of_uneven_pieces_exactly(tmp_path):
    stream = np.arange(1000, dtype=np.uint16)
    for val_tokens, expect in [(30, [30] + [100] * 9 + [70]), (0, [100] * 10)]:
        w = prepare.ShardWriter(str(tmp_path), f"w{val_tokens}", 100, val_tokens, 0.1)
        for piece in np.split(stream, [7, 8, 250, 251, 600]):  # pieces smaller and larger than a shard
            w.add(piece)
        shards = w.finish()
        assert [s["tokens"] for s in shards] == expect
        names = [s["file"] for s in shards]
        assert names == ([f"w{val_tokens}_val_000000.bin"] if val_tokens else []) + \
            [f"w{val_tokens}_train_{i:06d}.bin" for i in range(1, 11)]
        np.testing.assert_array_equal(np.concatenate([read_shard(tmp_path / n) for n in names]), stream)


def test_interrupted_write_leaves_no_shard(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(str(path), np.arange(10))
    assert not path.exists() and os.listdir(tmp_path) == []  # atomic_write removed its .tmp file too


# -----------------------------------------------------------------------------
# errors a user sees: one line, naming the problem and the fix

def test_vocab_too_large_for_uint16_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"--vocab_size=70000 does not fit the uint16 token shards"):
        prepare.main([f"--data_dir={tmp_path / 'data'}", "--dataset=stdlib", "--vocab_size=70000"])
    assert not (tmp_path / "data").exists()


def test_empty_corpus_after_filtering_is_an_error(tmp_path, tok_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["short", "tiny", "short"])
    with pytest.raises(SystemExit, match=r"no documents left after cleaning \(read 3: 0 without text, "
                                         r"3 shorter than min_chars=64, 0 garbage, 0 duplicates, .*\)"):
        run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}")
    assert not shard_files(tmp_path / "data" / "t")
    with pytest.raises(SystemExit, match="no documents left after cleaning"):  # the same when training
        run(tmp_path, f"--input={path}", "--tokenizer=train", "--vocab_size=300")


def test_missing_inputs_are_named(tmp_path, tok_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(SystemExit, match=f"input '{missing}' does not exist"):
        run(tmp_path, f"--input={missing}", f"--tokenizer={tok_path}")
    with pytest.raises(SystemExit, match=r"input '.*\*.parquet' matches no file"):
        run(tmp_path, f"--input={tmp_path}/*.parquet", f"--tokenizer={tok_path}")
    path = write_jsonl(tmp_path / "c.jsonl", RAW, field="content")
    with pytest.raises(SystemExit, match="has no column 'text' \\(columns: content, id\\); set --text_field"):
        run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}")
    with pytest.raises(SystemExit, match=f"tokenizer file '{tmp_path / 'x.bpe'}' not found"):
        run(tmp_path, f"--input={path}", f"--tokenizer={tmp_path / 'x.bpe'}")


def test_unreachable_hub_fails_within_seconds_naming_the_offline_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there, online or not
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"cannot reach the Hugging Face hub at 127.0.0.1:9.*--dataset=stdlib"):
        prepare.main([f"--data_dir={tmp_path / 'data'}"])  # `python prepare.py`: FineWeb-Edu, GPT-2
    assert time.time() - t0 < 60  # the probe gives up after 5 s; without it a dead route hangs for minutes
    assert not (tmp_path / "data").exists()


# the rest run prepare.py as a user does, in a fresh process, because what they see is the point:
# the exit status, one line on stderr, no traceback, and no half-written folder left behind

REPO = Path(prepare.__file__).parent
TIMEOUT = 300  # a hang guard for each run, far above the ~1-2 s they take


def script(cwd, *flags):
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT)


def assert_one_line_error(r, *names):
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    assert "Traceback" not in r.stdout
    for name in names:
        assert name in r.stderr


def test_command_line_errors_are_one_line_on_stderr(tmp_path):
    r = script(tmp_path, "--dataset=stdlib", "--vocab_size=70000")
    assert_one_line_error(r, "error: --vocab_size=70000")
    assert r.stdout == "" and not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind, bad, type_name", [
    ("jsonl", 12345, "int"),
    ("jsonl", ["a list", "of strings"], "list"),
    ("parquet", b"bytes, not text: decode them first", "bytes"),
])
def test_a_text_column_of_non_strings_is_one_line_and_leaves_no_folder(tmp_path, tok_path, kind, bad, type_name):
    # a good row first, so the bad one is found mid-stream, after the output folder was made
    rows = ["A fine document with more than enough characters in it to pass the filter.", bad]
    path = tmp_path / f"c.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    else:
        rows[0] = rows[0].encode()
        pq.write_table(pa.table({"body": pa.array(rows, pa.binary())}), path)
    r = script(tmp_path, f"--input={path}", "--text_field=body", f"--tokenizer={tok_path}", "--num_proc=1")
    assert_one_line_error(r, "column 'body'", f"holds {type_name} values, not text", "--text_field")
    assert not (tmp_path / "data").exists()  # the folder this run made, and data/ it made for it, are gone


def test_malformed_jsonl_is_one_line_naming_the_file(tmp_path, tok_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "A fine document with more than enough characters to pass."}\n{"text": "no close\n')
    r = script(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--num_proc=1")
    assert_one_line_error(r, f"cannot read --input={path}", "JSON parse error")  # datasets' own log is silent
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("how", ["a file in the path", "a read-only folder"])
def test_an_unwritable_data_dir_fails_in_one_line_before_any_work(tmp_path, how):
    if how == "a file in the path":
        (tmp_path / "data").write_text("a file where the data folder should be\n")
        data_dir, named = "data/corpora", "data/corpora"
    else:
        (tmp_path / "data").mkdir()
        os.chmod(tmp_path / "data", 0o555)
        if os.access(tmp_path / "data", os.W_OK):
            pytest.skip("this user (root?) can write to a read-only folder; the file-in-the-path case covers it")
        data_dir, named = "data", "data/stdlib"
    r = script(tmp_path, "--dataset=stdlib", f"--data_dir={data_dir}", "--num_proc=1")
    assert_one_line_error(r, named)
    assert "training a" not in r.stdout  # the check came before the tokenizer's training, not after it


def test_missing_or_null_text_is_counted_as_such(tmp_path, tok_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(BASE)] + [{"id": 5}, {"text": None, "id": 6}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=40")
    assert counts(card) == {"read": 7, "kept": 5, "missing_text": 2, "garbage": 0, "shorter_than_min_chars": 0,
                            "duplicate": 0, "contaminated": 0, "near_duplicate": 0, "line_endings_normalised": 0,
                            "control_chars_stripped": 0,
                            "nfc_normalised": 0}
    assert "| dropped: text missing or null | 2 |" in (out / "README.md").read_text()
    # the same for a null in a parquet string column
    pq.write_table(pa.table({"text": BASE + [None]}), tmp_path / "c.parquet")
    card, _ = run(tmp_path, f"--input={tmp_path / 'c.parquet'}", f"--tokenizer={tok_path}", "--min_chars=40",
                  name="p")
    assert counts(card)["missing_text"] == 1 and counts(card)["kept"] == 5


def test_command_txt_holds_the_preparing_command(tmp_path, tok_path):
    path = write_jsonl(tmp_path / "c.jsonl", BASE)
    flags = [f"--input={path}", f"--tokenizer={tok_path}", "--license_id=CC BY 4.0 (see the source's card)"]
    card, out = run(tmp_path, *flags)
    argv = [f"--data_dir={tmp_path / 'data'}", "--name=t", "--num_proc=1", *flags]  # what run() passes
    command = (out / "command.txt").read_text()
    assert command == shlex.join(["python", "prepare.py", *argv]) + "\n" == card["command"] + "\n"
    assert shlex.split(command) == ["python", "prepare.py", *argv]  # quoted so it pastes back into a shell


def test_help_prints_the_docstring_unbroken(tmp_path):
    r = script(tmp_path, "--help")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    # the docstring is raw, so its "\n" is two characters, not a line break in the middle of a sentence
    assert '"\\n"' in next(line for line in lines if "line endings to" in line)
    assert '"\\n" and "\\t"' in next(line for line in lines if "characters other than" in line)
    assert any(line.startswith("  --vocab_size=4096 ") for line in lines) and not (tmp_path / "data").exists()


def test_ctrl_c_stops_in_one_line_and_keeps_only_complete_shards(tmp_path):
    # Ctrl-C in a terminal signals the whole process group: prepare.py and its tokenizer workers. Small
    # shards, so that shards are being written when it comes; and the run cannot end before it comes, however
    # slow this test process is: its output (a line per shard, far more than a pipe holds) stops being read
    # after the first shard until the signal is sent, so prepare.py blocks on its next prints
    p = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), "--dataset=stdlib", "--num_proc=2",
                          "--bpe_train_mb=1", "--vocab_size=300", "--shard_size=2000", "--val_tokens=2000"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    lines, writing, resume = [], threading.Event(), threading.Event()

    def read_stdout():
        for line in p.stdout:
            lines.append(line)
            if line.startswith("wrote ") and not writing.is_set():
                writing.set()
                resume.wait()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    deadline = time.time() + TIMEOUT  # polled, not slept: a loaded machine only makes the wait longer
    while not writing.wait(0.05):
        if p.poll() is not None or time.time() > deadline:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"prepare.py wrote no shard (exit {p.poll()}): {''.join(lines)[-500:]}{p.stderr.read()}")
    assert "training a 300-token BPE" in "".join(lines)
    os.killpg(p.pid, signal.SIGINT)
    resume.set()
    p.wait(TIMEOUT)
    reader.join(TIMEOUT)
    err = p.stderr.read()
    assert p.returncode == 130 and err.startswith("interrupted (Ctrl-C)") and err.count("\n") == 1, err
    assert "Traceback" not in "".join(lines)
    out = tmp_path / "data" / "stdlib"
    shards = sorted(out.glob("stdlib_*.bin"))
    # no *.tmp, no card; the resume state
    assert shards and sorted(os.listdir(out)) == ["command.txt", "resume"] + [f.name for f in shards]
    assert all(len(read_shard(f)) == 2000 for f in shards)  # each complete: header, size and count agree


# -----------------------------------------------------------------------------
# resuming a killed run: the same bytes as a run that was never interrupted

def stdlib_chunks(n_chars=1000, files=120):
    """Real text in many documents: the first `files` stdlib modules cut into pieces of ~n_chars."""
    root, paths = prepare._stdlib_files()
    docs = []
    for p in paths[:files]:
        text = p.read_text(encoding="utf-8", errors="replace")
        docs += [text[i:i + n_chars] for i in range(0, len(text), n_chars)]
    return docs


def outputs(out):
    """Everything a resumed run must reproduce exactly: the shards and the tokenizer, byte for byte, and the
    card's counts (not its timestamps)."""
    card = json.loads((out / "card.json").read_text())
    files = {f.name: f.read_bytes() for f in sorted(out.glob("*.bin"))}
    return files, (out / "tokenizer.bpe").read_bytes(), {k: card[k] for k in (
        "documents", "bytes", "tokens", "shards", "pii", "decontamination", "tokenizer")}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_run_killed_anywhere_resumes_to_the_same_bytes(tmp_path, kind):
    # 2.5 MB: more than one of the pipeline's 1 MB batches and of datasets' 1000-row batches, so a resume
    # starts mid-source; small shards, so that a kill can land after some shards or in the middle of one
    docs = stdlib_chunks()
    assert len(docs) > 2000 and sum(map(len, docs)) > 2_000_000
    path = tmp_path / f"c.{kind}"
    if kind == "jsonl":
        write_jsonl(path, docs)
    else:
        pq.write_table(pa.table({"text": docs}), path, row_group_size=700)
    flags = [f"--input={path}", "--name=k", "--tokenizer=train", "--vocab_size=400", "--bpe_train_mb=1",
             "--shard_size=20000", "--val_tokens=20000"]
    prepare.main([f"--data_dir={tmp_path / 'ref'}", *flags, "--num_proc=1"])  # uninterrupted, in one process
    flags.append("--num_proc=2")  # the killed runs: batches in flight in the workers when the kill comes
    ref = outputs(tmp_path / "ref" / "k")
    assert len(ref[0]) > 20 and ref[2]["documents"]["dropped"]["near_duplicate"] > 0 and ref[2]["pii"]

    # kill -9 while the tokenizer trains, then after a few random shards (wherever the process got to by the
    # time the signal arrives: between shards, inside one, while saving state), and resume each time
    rng = np.random.default_rng(0)
    out = tmp_path / "data" / "k"
    n = len(ref[0])  # one kill in each half of the run: the later ones resume from deep inside the source
    for when in ["training a", int(rng.integers(2, n // 2)), int(rng.integers(n // 2, n - 2))]:
        p = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), f"--data_dir={tmp_path / 'data'}", *flags],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        seen = 0
        for line in p.stdout:
            seen += line.startswith("wrote ")
            if line.startswith(when) if isinstance(when, str) else seen + len(list(out.glob("*.bin"))) >= when:
                p.kill()
                break
        p.wait(TIMEOUT)
        assert p.returncode == -signal.SIGKILL, "the run ended before it was killed: shrink the shards"
        assert not (out / "card.json").exists()
    r = script(tmp_path, f"--data_dir={tmp_path / 'data'}", *flags)
    assert r.returncode == 0 and "resuming after" in r.stdout, r.stdout + r.stderr
    assert outputs(out) == ref
    assert sorted(p.name for p in out.iterdir()) == sorted(["card.json", "README.md", "command.txt",
                                                           "tokenizer.bpe", *ref[0]])  # no resume/ left


def test_rerunning_a_complete_folder_says_so(tmp_path):
    flags = [f"--data_dir={tmp_path / 'data'}", "--dataset=stdlib", "--num_proc=1", "--vocab_size=300",
             "--bpe_train_mb=1"]
    card = prepare.main(flags)
    shard = tmp_path / "data" / "stdlib" / card["shards"][0]["file"]
    before = shard.stat().st_mtime_ns
    r = script(tmp_path, *flags)
    assert r.returncode == 0 and "is already complete, made by this same command" in r.stdout
    assert "training a" not in r.stdout and shard.stat().st_mtime_ns == before  # nothing retrained or rewritten
    r = script(tmp_path, *flags[:-1], "--bpe_train_mb=2")
    assert_one_line_error(r, "holds the output of another command (--bpe_train_mb=1 there, 2 here)",
                          "--overwrite=True")


# -----------------------------------------------------------------------------
# personal data: each rule of remove_pii's docstrings, as a case

@pytest.mark.parametrize("text, expected", [
    # replaced: addresses people can be reached at, and public IP addresses
    ("Written by Greg Ward <gward@python.net>", "Written by Greg Ward <email@example.com>"),
    ("mail jane.doe+list@mail.example.co.uk.", "mail email@example.com."),
    ("<a href=\"mailto:ann@corp.org\">", "<a href=\"mailto:email@example.com\">"),
    ("https://host.org/send?to=bob@corp.org&x=1", "https://host.org/send?to=email@example.com&x=1"),
    ("the server at 203.0.113.99 is a test address, 81.2.69.160 is not", None),
    ("login from 81.2.69.160, then 2a00:1450:4009:81f::200e.",
     "login from 192.0.2.1, then 2001:db8::1."),
    # kept: versions, private ranges, code, logins in URLs
    ("* Release 4.10.2.1 (2020-01-01); python-2.7.18.1; ==4.10.2.1", None),
    ("libfoo (4.10.20.1-1) unstable; urgency=low", None),
    ("upgrade to 2.0.1.3 before Friday", None),
    ("the router is 192.168.1.1, the VPN 10.0.0.1, loopback 127.0.0.1 and ::1, link fe80::1", None),
    ("ssh deploy@build.example.org 'uptime'; git clone git@github.com:owner/repo.git", None),
    ("    @property\n    def name(self):\n        return self.x @ self.w\n@app.route('/')", None),
    ("ssh root@host; pip install pkg@1.2.3; y = x@W.T", None),
    ("clone https://user:secret@git.example.org/r.git or ftp://anon@ftp.example.org", None),
    ("at 12:30:45 the MAC 00:1a:2b:3c:4d:5e, a[1::2]", None),
])
def test_pii_replaces_addresses_and_keeps_look_alikes(text, expected):
    stats = Counter()
    if expected is None and "81.2.69.160" in text:
        expected = text.replace("81.2.69.160", "192.0.2.1")  # 203.0.113.0/24 is for documentation: kept
    assert clean.remove_pii(text, stats) == (text if expected is None else expected)
    assert clean.remove_pii(expected or text, Counter()) == (expected or text)  # placeholders stay


def test_pii_is_counted_per_kind_and_on_by_default_for_local_input(tmp_path, tok_path):
    docs = [b + " Contact ann@corp.org or bob@corp.org." for b in BASE[:2]] + [BASE[2] + " Host 81.2.69.160."]
    path = write_jsonl(tmp_path / "c.jsonl", docs + BASE[3:])
    card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=40")
    assert card["pii"] == {"email": {"documents": 2, "replaced": 4}, "ipv4": {"documents": 1, "replaced": 1},
                           "ipv6": {"documents": 0, "replaced": 0}}
    text = Tokenizer.load(tok_path).decode(token_stream(out).tolist())
    assert "ann@corp.org" not in text and "81.2.69.160" not in text and "email@example.com" in text
    assert "email addresses replaced 4 times in 2 documents" in (out / "README.md").read_text()
    card, _ = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--min_chars=40", "--pii=False", name="n")
    assert card["pii"] is None and card["bytes"]["kept"] == sum(len(d.encode()) for d in docs + BASE[3:])


# -----------------------------------------------------------------------------
# near-duplicates and decontamination

def planted_near_duplicates():
    """Real documents (stdlib prose, ~500 words each) and near-copies of them, as a crawl sees them."""
    from pydoc_data.topics import topics
    originals = [t for t in (topics[k] for k in sorted(topics)) if 400 < len(t.split()) < 800][:6]
    rng = np.random.default_rng(0)
    words = originals[2].split()
    spans = [(i, i + 5) for i in rng.choice(len(words) // 5, size=len(words) // 100, replace=False) * 5]
    edited = list(words)
    for a, b in spans:  # 5% of the words rewritten, in a few five-word phrases, as an editor would
        edited[a:b] = ["rewritten"] * (b - a)
    copies = ["Last updated: 3 March 2021\n" + originals[0],  # a changed date line...
              "Last updated: 9 July 2024\n" + originals[0],
              originals[1] + "\n\nCopyright 2024 Example Corp. All rights reserved. Privacy policy. Contact us.",
              " ".join(edited)]
    return originals, copies


def test_planted_near_duplicates_are_removed_and_shared_headers_kept(tmp_path, tok_path):
    originals, copies = planted_near_duplicates()
    licence = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:3000] if \
        Path("/usr/share/common-licenses/Apache-2.0").exists() else originals[5] * 2
    # two different modules under the same long licence header: similar only in the header
    root = Path(sysconfig.get_paths()["stdlib"])
    headed = [licence + "\n" + (root / f).read_text()[:6000] for f in ("textwrap.py", "shlex.py")]
    path = write_jsonl(tmp_path / "c.jsonl", originals + copies + headed)
    card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--pii=False")
    assert card["documents"]["dropped"]["near_duplicate"] == len(copies)
    assert card["documents"]["kept"] == len(originals) + len(headed)
    tok = Tokenizer.load(tok_path)
    assert [tok.decode(d) for d in split_docs(token_stream(out), tok.eot_token)] == originals + headed
    assert card["near_dedup"]["bands"] == 14 and card["near_dedup"]["rows"] == 8


def test_five_percent_of_words_changed_at_random_needs_a_lower_threshold():
    # each changed word breaks the 5 shingles it is in: Jaccard ~0.63, which FineWeb's 14 x 8 catches ~30% of
    # the time (NearDuplicates' docstring); 28 x 4 (~0.45) catches it, and still keeps unrelated documents
    originals, _ = planted_near_duplicates()
    rng = np.random.default_rng(1)
    words = originals[3].split()
    for i in rng.choice(len(words), size=len(words) // 20, replace=False):
        words[i] = "changed"
    docs = [clean.word_hashes(t) for t in originals + [" ".join(words)]]
    a, b = (set(clean.ngram_hashes(docs[i], 5).tolist()) for i in (3, -1))
    assert 0.55 < len(a & b) / len(a | b) < 0.7
    near = clean.NearDuplicates(28, 4)
    assert near.duplicates(docs).tolist() == [False] * len(originals) + [True]


def test_documents_sharing_a_13_gram_with_an_eval_set_are_dropped(tmp_path, tok_path):
    docs = [d for d in stdlib_chunks(2000, files=12) if len(d.split()) > 150][:12]
    words = docs[4].split()
    # three eval files in eval.py's formats, each quoting one training document (case and punctuation differ)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"query": "Q: " + " ".join(words[10:40]).upper(),
                              "choices": ["no", " ".join(words[40:60])], "gold": 1}) + "\n")
    lam = tmp_path / "lambada.jsonl"
    lam.write_text(json.dumps({"text": "Something else entirely. " + docs[7][100:400]}) + "\n"
                   + json.dumps({"text": "too short to check"}) + "\n")
    hs = tmp_path / "hellaswag.jsonl"
    hs.write_text(json.dumps({"ctx_a": docs[9][:200].replace(",", " ,"), "ctx_b": "", "activity_label": "x",
                              "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    # a passage that shares only 12 words in a row with any eval text stays
    twelve = " ".join(words[10:22])
    quote = f"An unrelated document that quotes: {twelve} and ends."
    path = write_jsonl(tmp_path / "c.jsonl", docs + [quote])
    card, out = run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", "--pii=False", "--near_dedup=False",
                    f"--decontaminate={mc},{lam},{hs}", "--min_chars=20")
    assert card["decontamination"] == {"mc.jsonl": {"documents_dropped": 1, "items_too_short": 0, "ngram": 13},
                                       "lambada.jsonl": {"documents_dropped": 1, "items_too_short": 1, "ngram": 13},
                                       "hellaswag.jsonl": {"documents_dropped": 1, "items_too_short": 0, "ngram": 13}}
    assert card["documents"]["dropped"]["contaminated"] == 3 and card["documents"]["kept"] == len(docs) - 2
    tok = Tokenizer.load(tok_path)
    kept = [tok.decode(d) for d in split_docs(token_stream(out), tok.eot_token)]
    assert kept == [d for i, d in enumerate(docs) if i not in (4, 7, 9)] + [quote]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "?"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 1: not an item of eval.py's formats"):
        run(tmp_path, f"--input={path}", f"--tokenizer={tok_path}", f"--decontaminate={bad}", name="b")


# -----------------------------------------------------------------------------
# two command-line slips

def test_a_dataset_typo_suggests_the_name_and_separator_escapes_are_read(tmp_path, tok_path):
    with pytest.raises(SystemExit, match=r"^error: unknown --dataset=stdlbi: did you mean stdlib\?"):
        prepare.main([f"--data_dir={tmp_path / 'data'}", "--dataset=stdlbi"])
    tok = Tokenizer.load(tok_path)
    (tmp_path / "all.txt").write_text("\n===\n".join(CLEAN), encoding="utf-8")
    # as a shell passes --separator='\n===\n': backslash-n, two characters, meaning a newline
    card, out = run(tmp_path, f"--input={tmp_path / 'all.txt'}", r"--separator=\n===\n", f"--tokenizer={tok_path}",
                    "--min_chars=20")
    assert [tok.decode(d) for d in split_docs(token_stream(out), tok.eot_token)] == CLEAN
    assert card["source"]["separator"] == "\n===\n"
