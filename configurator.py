"""
configurator.py: the command line every script shares: its settings, and how it fails.

Settings. 
A script declares its settings as plain module-level variables with defaults, then calls

    config = configure(globals())

which applies, in order:
  1. config files named as positional arguments (plain Python that assigns the same names), e.g.
     `python train.py config/gpt1_117m.py`
  2. `--key=value` flags, e.g. `--batch_size=32 --compile=False --out_dir=out-shakespeare`

Values are parsed with ast.literal_eval (so 3e-4, True, None, (0.9, 0.95) work) and fall back to the
raw string. Every name must already exist in the script, and the value must have the default's type,
so a typo is an error that names the closest known keys instead of a silently ignored setting.
Calling configure again (a test running main() twice in one process) starts from the defaults.

Renamed settings. A script whose setting changed name passes renamed={old: (new, old default)}: the old
name still works, sets the new one, and prints one line `note: --old is deprecated in script.py; use
--new=VALUE` on stderr. Given its old default, the old name changes nothing (that default meant what the
new setting's default means) and its note says so. Old and new names both given are an error: which
one was meant?

Failing. A user's mistake (a typo, a missing file, a bad value) must end as one line that names the
problem and the fix, never as a traceback from deep inside torch. Scripts raise UserError for what
they check themselves; library modules (model.py, bpe.py, checkpoint.py, shards.py) raise ValueError,
as libraries should. Every script runs its main() through run(), the one place that turns those, and
an OSError naming a file (a read-only folder, a path that is a file), into `error: ...` on stderr
with exit status 1, and Ctrl-C into one line and status 130. TRACEBACK=1 shows the full traceback.
"""
import ast
import difflib
import io
import os
import socket
import sys
import threading
import tokenize
from urllib.parse import urlparse

_TYPES = (bool, int, float, str, tuple, list, type(None))


class UserError(SystemExit):
    """A mistake the user can fix. A SystemExit, so that it ends a script with its one line (and
    status 1) even outside run(); `except Exception` in library code does not swallow it."""

    def __init__(self, message):
        # one line, whatever the library underneath put in its message (a hub error's embedded newline)
        super().__init__("error: " + " ".join(str(message).split()))


def run(main, argv=None):
    """Call main(argv) as a script's entry point: expected failures become one line on stderr."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped; files are written atomically, so no output is half-written",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as e:
        if os.environ.get("TRACEBACK"):
            raise
        if isinstance(e, OSError) and e.filename is not None:
            what = f"{e.strerror or type(e).__name__}: {e.filename}"
            hint = {PermissionError: "; choose a folder you can write to, or fix its permissions",
                    FileExistsError: "; a file stands where a folder is needed: move it or pick another path",
                    NotADirectoryError: "; a file stands where a folder is needed: move it or pick another path",
                    }.get(type(e), "")
            raise UserError(what + hint) from None
        raise UserError(" ".join(str(e).split()) or type(e).__name__) from None


def check_hub(hint, timeout=5.0):
    """Fail within `timeout` seconds, naming hint (the offline way round), when the Hugging Face hub
    cannot be reached: datasets and huggingface_hub retry for half a minute, printing a line per try.
    The probe runs in a thread because a DNS lookup can block far longer than any socket timeout."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded from the hub; {hint}")
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


def descriptions(path):
    """{setting: its description} from a script's source: the comment after each module-level
    assignment, and the indented comment lines right below it (a long description's continuation)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                    for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
        tree = ast.parse(source)
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    lines, out = source.splitlines(), {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        end = node.end_lineno
        if end not in comments:
            continue
        parts, n = [comments[end][1]], end + 1
        while n in comments and lines[n - 1][:comments[n][0]].strip() == "" and comments[n][0] > 0:
            parts.append(comments[n][1])  # an indented comment line alone: the description goes on
            n += 1
        out[node.targets[0].id] = " ".join(p for p in parts if p)
    return out


def _known_keys(defaults):
    # the settings are the script's public module-level variables of plain types; ALL_CAPS names are
    # constants (e.g. eval.TASKS), not settings
    return {k: v for k, v in defaults.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, _TYPES)}


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key, value, default):
    """Return value converted to the default's type, or exit naming key, value and expected type."""
    if default is None or value is None:
        return value  # a None default accepts any type (e.g. top_k=None or an int)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True  # --learning_rate=1 means 1.0
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        raise UserError(f"config key '{key}' expects {type(default).__name__} "
                         f"(default {default!r}), got {value!r} of type {type(value).__name__}")
    return value


def _parse_value(raw, default):
    if isinstance(default, str):
        return raw  # a string setting takes the text as written: --out_dir=123 is the folder '123'
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def configure(defaults, argv=None, renamed=None):
    """Apply config files and --key=value flags from argv to `defaults` (a script's globals()) in place.
    renamed: {old name: (new name, old default)} for settings that changed name (see above).
    Returns the resolved settings as a dict (what checkpoints and wandb record)."""
    argv = sys.argv[1:] if argv is None else argv
    renamed = renamed or {}
    script = os.path.basename(defaults.get("__file__") or "this script")
    given = {}  # new name -> the name that set it, to catch an old and a new name both given

    def rename(key, value):
        """(the setting `key` names, value); (None, value) for an old name given its old default."""
        new, old_default = renamed.get(key, (key, None))
        if key in renamed and value == old_default:
            print(f"note: --{key}={value} is deprecated in {script} and changes nothing: drop it", file=sys.stderr)
            return None, value
        if given.setdefault(new, key) != key:
            raise UserError(f"--{given[new]} and --{key} both set {new}: pass only --{new}=...")
        if key in renamed:
            print(f"note: --{key} is deprecated in {script}; use --{new}={value}", file=sys.stderr)
        return new, value

    # the settings as the script wrote them, kept from the first call, so later calls start afresh
    pristine = defaults.setdefault("__settings__", dict(_known_keys(defaults)))
    defaults.update(pristine)
    known = dict(pristine)
    if any(a in ("-h", "--help") for a in argv):
        doc = (defaults.get("__doc__") or "").strip()
        print(doc + "\n\nsettings (override with a config file and/or --key=value):" if doc else "settings:")
        said = descriptions(defaults["__file__"]) if defaults.get("__file__") else {}
        for k, v in known.items():
            flag = f"--{k}={v!r}"
            print(f"  {flag:<30} {said[k]}" if k in said and len(flag) <= 30 else
                  f"  {flag}\n  {'':<30} {said[k]}" if k in said else f"  {flag}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in an empty namespace, then check every name it assigned
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise UserError(f"cannot read config file '{arg}': {e.strerror}")
            namespace = {}
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:
                raise UserError(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, _TYPES):
                    continue  # __builtins__, helper imports
                if key not in known and key not in renamed:
                    raise _unknown(key, known)
                key, value = rename(key, value)
                if key is not None:
                    known[key] = _coerce(key, value, defaults[key])
        else:
            if "=" not in arg:
                raise UserError(f"flag '{arg}' needs a value: write {arg}=VALUE")
            key, raw = arg[2:].split("=", 1)
            if key not in known and key not in renamed:
                raise _unknown(key, known)
            key, raw = rename(key, raw)
            if key is not None:
                known[key] = _coerce(key, _parse_value(raw, defaults[key]), defaults[key])
    defaults.update(known)
    return dict(known)
