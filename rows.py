"""
rows.py: the rows of a local data file as dicts, one reader for every script that takes labelled or
itemised files: finetune.py's train/val/test, unlabeled and predict files, eval.py's multiple-choice,
HellaSwag, LAMBADA and zero-shot files, and clean.py's decontamination sets (so prepare.py drops what
eval.py will score, read the same way).

Formats. A .jsonl/.json file is JSON lines, or one JSON list of objects; a .csv/.tsv file is a table;
any other file is JSON if it opens with "{" or "[", else a table. A table's delimiter is given, or
guessed from the first line (a tab if it has more tabs than commas, or if the file is .tsv), so
STS-B's tab-separated sts-*.csv reads as it ships. A tab-separated table is read unquoted, as GLUE
writes it: a quote character there is text (a review that opens with one would otherwise swallow the
lines after it). A comma-separated table is quoted as csv.writer quotes. With header=False the columns
are named "0", "1", ...; empty cells stay "" and blank lines are skipped.

Every row carries "__row__", where it is in its file ("data/train.csv line 7"), so a caller's error
names the line a user can open. Every failure (unreadable, not UTF-8, bad JSON, bad csv) is one
UserError naming the file and the line.
"""
import csv
import io
import json
import os

from configurator import UserError


def read_rows(path, what, header=True, delimiter="auto"):
    """[{field: value, "__row__": "PATH line N"}] of one local file; `what` names the file in an error
    ("cannot read predict file x.jsonl: ..."). delimiter: 'auto', 'tab' or one character."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not part of the first name
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json") or (ext not in (".csv", ".tsv") and text.lstrip()[:1] in ("{", "[")):
        return json_rows(path, text)
    return table_rows(path, text, header, delimiter)


def json_rows(path, text):
    """JSON lines, or one JSON list, each item an object."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path} is not a JSON list ({e})") from None
        where = [f"{path} item {i + 1}" for i in range(len(items))]
    else:
        items, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{path} line {n} is not JSON ({e}); give one JSON object per line") from None
                where.append(f"{path} line {n}")
    for w, r in zip(where, items):
        if not isinstance(r, dict):
            raise UserError(f"{w} is {type(r).__name__}, not an object of fields")
    return [{**r, "__row__": w} for w, r in zip(where, items)]


def table_rows(path, text, header, delimiter):
    """A csv/tsv table: the first row names the columns (or header=False: they are numbered)."""
    first = text.split("\n", 1)[0]
    d = {"auto": "\t" if path.lower().endswith(".tsv") or first.count("\t") > first.count(",") else ",",
         "tab": "\t", "\\t": "\t"}.get(delimiter, delimiter)
    if len(d) != 1:
        raise UserError(f"delimiter={delimiter!r} must be one character, 'tab' or 'auto'")
    reader = csv.reader(io.StringIO(text), delimiter=d, quoting=csv.QUOTE_NONE if d == "\t" else csv.QUOTE_MINIMAL)
    try:
        table = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num} is not valid csv ({e})") from None
    if not table:
        return []
    if header:
        (_, names), table = table[0], table[1:]
    else:
        names = [str(i) for i in range(max(len(cells) for _, cells in table))]
    return [{**dict(zip(names, cells)), "__row__": f"{path} line {n}"} for n, cells in table]
