#!/usr/bin/env python3
"""
bench/gpt1_data.py: build the data for GPT-1 at laptop scale from pinned commits of three public GitHub
repositories: an English prose corpus (Project Gutenberg books), GLUE SST-2 and GLUE RTE, the last two
as finetune.py data folders (train/val/test .jsonl; test is GLUE's public dev set, val is held out of
GLUE train with seed 0, no text shared between splits). Standard library only.

    git clone https://github.com/rcdm-uga/Gutenberg_Text mirrors/rcdm-uga+Gutenberg_Text/repo
    git clone https://github.com/eyalbd2/Reproducing-AutoPrompt mirrors/eyalbd2+Reproducing-AutoPrompt/repo
    git clone https://github.com/amrnag/Specialized-Transformers mirrors/amrnag+Specialized-Transformers/repo
    python bench/gpt1_data.py --mirrors=mirrors --out=gpt1_data     # ~20 s; writes corpus/, sst2/, rte/

The commits read are pinned below (GUTENBERG, SST2, RTE); the output is the same bytes on every run.
Licences: the Gutenberg texts are public domain in the USA (the Project Gutenberg header, licence and
every paragraph naming it are removed, as its terms ask); SST-2 and RTE carry no licence of their own
(GLUE defers to the original datasets): research use, with citation.
"""
import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import unicodedata

GUTENBERG = ("rcdm-uga/Gutenberg_Text", "a0b16d35a9851168ce9ac649851c17b7ab08d48e")
SST2 = ("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11")
RTE = ("amrnag/Specialized-Transformers", "fa673a93a5c27cb1f5954ac2a8a49eec6fcba6b9")
SEED = 0


# ---------------------------------------------------------------- git helpers
def gitdir(mirrors, repo):
    d = os.path.join(mirrors, repo.replace("/", "+"), "repo")
    if not os.path.isdir(d):
        sys.exit(f"no snapshot of {repo} at {d}")
    return d


def git_show(gd, commit, path):
    return subprocess.run(["git", f"--git-dir={gd}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout


def ls_tree(gd, commit):
    """[(blob sha, size or None, path)] of every file at commit."""
    out = subprocess.run(["git", f"--git-dir={gd}", "ls-tree", "-r", "-l", "-z", commit], check=True,
                         capture_output=True).stdout
    files = []
    for rec in out.split(b"\0"):
        if rec:
            meta, path = rec.split(b"\t", 1)
            _, kind, sha, size = meta.split()
            if kind == b"blob":
                files.append((sha.decode(), int(size) if size.isdigit() else None, path.decode("utf-8")))
    return files


class Blobs:
    """Reads blobs one at a time through one `git cat-file --batch`; get() is None for a blob the
    snapshot lacks (it holds no file of 4 MiB or more)."""

    def __init__(self, gd):
        self.p = subprocess.Popen(["git", f"--git-dir={gd}", "cat-file", "--batch"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)

    def get(self, sha):
        self.p.stdin.write(sha.encode() + b"\n")
        self.p.stdin.flush()
        head = self.p.stdout.readline().split()
        if len(head) != 3:
            return None
        data = self.p.stdout.read(int(head[2]))
        self.p.stdout.read(1)
        return data

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- GLUE tasks
def read_glue_tsv(data, header=True):
    """GLUE's .tsv: tab-separated, unquoted (a quote character is text), "\n" line ends."""
    lines = data.decode("utf-8").split("\n")
    head = lines[0].split("\t") if header else None
    rows = [ln.split("\t") for ln in (lines[1:] if header else lines) if ln.strip()]
    return head, rows


def holdout(rows, text_of, n_val, seed=SEED):
    """(train, val): n_val rows drawn with random.Random(seed) from a shuffle of the row indices, skipping
    rows whose text occurs more than once in the file, so no val text is also a train text. Both keep the
    file's order."""
    count = {}
    for r in rows:
        count[text_of(r)] = count.get(text_of(r), 0) + 1
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set()
    for i in order:
        if len(val) == n_val:
            break
        if count[text_of(rows[i])] == 1:
            val.add(i)
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def build_sst2(mirrors, out):
    repo, commit = SST2
    gd = gitdir(mirrors, repo)
    splits = {}
    for name, path in (("train", "glue_data/SST-2/train_full.tsv"), ("test", "glue_data/SST-2/dev.tsv")):
        head, rows = read_glue_tsv(git_show(gd, commit, path))
        assert head == ["sentence", "label"], head
        splits[name] = [{"sentence": s.strip(), "label": int(l), "idx": i} for i, (s, l) in enumerate(rows)]
    assert len(splits["train"]) == 67349 and len(splits["test"]) == 872
    train, val = holdout(splits["train"], lambda r: r["sentence"], 872)
    os.makedirs(os.path.join(out, "sst2"), exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", splits["test"])):
        write_jsonl(os.path.join(out, "sst2", f"{name}.jsonl"), rows)
    return {"train": len(train), "val": len(val), "test": len(splits["test"])}


def build_rte(mirrors, out):
    repo, commit = RTE
    gd = gitdir(mirrors, repo)
    # that repository split GLUE's RTE train.tsv (2,490 rows) into train.tsv (2,127, with header) and
    # val.tsv (363, no header); joined and sorted by GLUE's index they are GLUE's train.tsv again.
    h1, a = read_glue_tsv(git_show(gd, commit, "data/RTE/train.tsv"))
    _, b = read_glue_tsv(git_show(gd, commit, "data/RTE/val.tsv"), header=False)
    h2, dev = read_glue_tsv(git_show(gd, commit, "data/RTE/dev.tsv"))
    assert h1 == h2 == ["index", "sentence1", "sentence2", "label"], (h1, h2)

    def rows(rs):
        rs = sorted(rs, key=lambda r: int(r[0]))
        assert all(len(r) == 4 and r[3] in ("entailment", "not_entailment") for r in rs)
        return [{"sentence1": r[1].strip(), "sentence2": r[2].strip(), "label": r[3], "idx": int(r[0])}
                for r in rs]

    full, test = rows(a + b), rows(dev)
    assert [r["idx"] for r in full] == list(range(2490)) and [r["idx"] for r in test] == list(range(277))
    train, val = holdout(full, lambda r: (r["sentence1"], r["sentence2"]), 277)
    os.makedirs(os.path.join(out, "rte"), exist_ok=True)
    for name, rs in (("train", train), ("val", val), ("test", test)):
        write_jsonl(os.path.join(out, "rte", f"{name}.jsonl"), rs)
    return {"train": len(train), "val": len(val), "test": len(test)}


# ---------------------------------------------------------------- Gutenberg corpus
START = re.compile(r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG|^\s*\*END\*?\s*THE SMALL PRINT"
                   r"|^\s*\*{3}\s*START OF THIS PROJECT|^\s*\*{3}\s*START OF THE PROJECT", re.I)
END = re.compile(r"^\s*\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG|^\s*End of (the |this )?Project Gutenberg"
                 r"|^\s*End of The Project Gutenberg|^\s*\*{3}\s*END OF THE PROJECT", re.I)
CREDITS = re.compile(r"^\s*(Produced by|E-?text prepared by|This e-?(text|book) was (produced|prepared)"
                     r"|Transcribed (from|by)|Prepared by|Updated editions will replace)", re.I)
PG_MENTION = re.compile(r"Project\s+Gutenberg|gutenberg\.(org|net)|www\.pgdp\.net|Distributed Proofread", re.I)
ILLUSTRATION = re.compile(r"^\[(Illustration|Frontispiece)[^\]]*\]$", re.I | re.S)
TRANSCRIBER = re.compile(r"^\s*\[?Transcriber(\'|\u2019)?s? ?Notes?", re.I)
EBOOK_NO = re.compile(r"\[E-?(?:Book|Text) #(\d+)\]", re.I)
LANGUAGE = re.compile(r"^Language:\s*(.+)$", re.M)
SKIP_TITLE = re.compile(r"\bIndex of\b|\bComplete\b|\bWorks\b", re.I)
STOP = set("the of and to a in that is was he it for with as his on be at by i had not are but from or "
           "have an they which you were her she this all there been one their so if we would no what "
           "my when who will more him me them into out up then".split())


def decode(data):
    for enc in ("utf-8", "cp1252", "latin-1"):
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            pass


def reflow(par):
    """Join a hard-wrapped prose paragraph into one line; leave verse, tables and headings alone."""
    lines = par.split("\n")
    indented = sum(ln[:1].isspace() for ln in lines)
    if len(lines) > 1 and all(len(ln.strip()) >= 45 for ln in lines[:-1]) and 2 * indented < len(lines):
        return " ".join(ln.strip() for ln in lines)
    return par


def clean_book(raw):
    """(header, body) of a Project Gutenberg .txt, or (None, reason) if its markers are not found."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if START.search(ln)), None)
    if start is None:
        return None, "no start marker"
    end = next((i for i in range(start + 1, len(lines)) if END.search(lines[i])), None)
    if end is None:
        return None, "no end marker"
    header = "\n".join(lines[:start])
    body = "\n".join(ln.rstrip() for ln in lines[start + 1:end])
    pars = [p.strip("\n") for p in re.split(r"\n\s*\n", body)]
    pars = [p for p in pars if p.strip()]
    while pars and CREDITS.search(pars[0]):  # production credits right after the start marker
        pars.pop(0)
    pars = [p for p in pars if not PG_MENTION.search(p) and not ILLUSTRATION.match(p.strip())
            and not TRANSCRIBER.match(p)]
    pars = [reflow(re.sub(r"_([^_]+)_", r"\1", p)) for p in pars]  # _italics_ -> italics
    body = unicodedata.normalize("NFC", "\n\n".join(pars)).strip() + "\n"
    return header, body


def english_share(body, n=20000):
    words = re.findall(r"[a-z]+", body[:400000].lower())[:n]
    return sum(w in STOP for w in words) / max(1, len(words))


def slug(s):
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")[:60] or "untitled"


def build_corpus(mirrors, out, target_mb):
    """Round robin over authors (each author's files in a seeded shuffle): take each author's next file
    that passes the filters, until target_mb MB of cleaned text. Only the files looked at are cleaned."""
    repo, commit = GUTENBERG
    gd = gitdir(mirrors, repo)
    files = [f for f in ls_tree(gd, commit) if f[2].endswith(".txt")]
    stats = {"txt_files": len(files), "duplicate_blob": 0, "skipped_title": 0, "examined": 0,
             "absent_in_snapshot": 0, "no_markers": 0, "not_english": 0, "duplicate_ebook": 0, "too_short": 0, "overlaps_chosen": 0,
             "decoded_non_utf8": 0}
    seen_blob, by_author = set(), {}
    for sha, _, path in sorted(files, key=lambda f: f[2]):
        if sha in seen_blob:
            stats["duplicate_blob"] += 1
            continue
        seen_blob.add(sha)
        author, _, title = path.partition("/")
        title = title[:-4].replace("\r", " ").strip()
        if SKIP_TITLE.search(title):
            stats["skipped_title"] += 1
            continue
        by_author.setdefault(author.strip(), []).append((sha, path, title))
    rng = random.Random(SEED)
    for a in sorted(by_author):
        rng.shuffle(by_author[a])
    blobs, seen_ebook, seen_par, chosen, total = Blobs(gd), set(), set(), [], 0

    def next_book(author):
        while by_author[author]:
            sha, path, title = by_author[author].pop(0)
            stats["examined"] += 1
            data = blobs.get(sha)
            if data is None:
                stats["absent_in_snapshot"] += 1
                continue
            text, enc = decode(data)
            stats["decoded_non_utf8"] += enc != "utf-8"
            header, body = clean_book(text)
            if header is None:
                stats["no_markers"] += 1
                continue
            lang = LANGUAGE.search(header)
            if (lang and "english" not in lang.group(1).lower()) or english_share(body) < 0.30:
                stats["not_english"] += 1
                continue
            m = EBOOK_NO.search(header)
            key = ("ebook", m.group(1)) if m else ("title", title.lower())
            if key in seen_ebook:
                stats["duplicate_ebook"] += 1
                continue
            seen_ebook.add(key)
            if len(body) < 20000:
                stats["too_short"] += 1
                continue
            # a book that repeats another chosen one (an excerpt, a collection holding it, another
            # edition): >10% of its long paragraphs (over 300 characters) already seen
            hashes = {hashlib.md5(re.sub(r"[^a-z]", "", p.lower()).encode()).digest()
                      for p in body.split("\n\n") if len(p) > 300}  # letters only: editions differ in spacing
            if hashes and len(hashes & seen_par) > 0.1 * len(hashes):
                stats["overlaps_chosen"] += 1
                continue
            seen_par.update(hashes)
            return {"author": author, "title": title, "path": path, "blob": sha,
                    "ebook": m.group(1) if m else "", "text": body}
        return None

    target = target_mb * 1e6
    while total < target and any(by_author.values()):
        for a in sorted(by_author):
            if total >= target:
                break
            b = next_book(a)
            if b:
                chosen.append(b)
                total += len(b["text"].encode("utf-8"))
    blobs.close()
    # files named in a seeded random order, so a sorted glob (prepare.py's val = first tokens) is a mix
    rng.shuffle(chosen)
    cdir = os.path.join(out, "corpus")
    os.makedirs(cdir, exist_ok=True)
    for f in os.listdir(cdir):
        if f.endswith(".txt"):
            os.remove(os.path.join(cdir, f))
    with open(os.path.join(out, "corpus_manifest.tsv"), "w", encoding="utf-8") as man:
        man.write("file\tbytes\tsha256\tebook\tauthor\ttitle\tsource_path\tsource_blob\n")
        for i, b in enumerate(chosen):
            name = f"{i:04d}_{slug(b['author'].split(',')[0])}_{slug(b['title'])}.txt"
            data = b["text"].encode("utf-8")
            with open(os.path.join(cdir, name), "wb") as f:
                f.write(data)
            man.write("\t".join([name, str(len(data)), hashlib.sha256(data).hexdigest(), b["ebook"], b["author"],
                                 b["title"].replace("\t", " "), b["path"].replace("\r", "\\r"), b["blob"]]) + "\n")
    stats.update(books=len(chosen), authors=len({b["author"] for b in chosen}),
                 bytes=sum(len(b["text"].encode("utf-8")) for b in chosen))
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirrors", required=True, help="folder of <owner>+<name>/repo git clones")
    ap.add_argument("--out", required=True, help="folder to write corpus/, sst2/ and rte/ into")
    ap.add_argument("--target_mb", type=float, default=100)
    ap.add_argument("--only", default="sst2,rte,corpus")
    args = ap.parse_args()
    report = {}
    for part in args.only.split(","):
        if part == "sst2":
            report["sst2"] = build_sst2(args.mirrors, args.out)
        elif part == "rte":
            report["rte"] = build_rte(args.mirrors, args.out)
        elif part == "corpus":
            report["corpus"] = build_corpus(args.mirrors, args.out, args.target_mb)
        print(part, json.dumps(report[part]), flush=True)


if __name__ == "__main__":
    main()
