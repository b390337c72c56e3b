"""
checkpoint.py: the one checkpoint format, and open_model, which every script uses to get a model.

A checkpoint is one file, ckpt_<step>.pt in a run directory, holding a dict:
    version        VERSION below; a reader refuses any other
    model          the state_dict, saved from the uncompiled, unwrapped module (no "_orig_mod." keys)
    model_args     the GPTConfig as a dict: enough to rebuild the model with no other file
    tokenizer      the .bpe file's text: a checkpoint carries the tokenizer it was trained with
    iter_num       optimizer steps taken
    optimizer, scaler, best_val_loss, evals_since_best, data (the loader position), rng (every rank's
                   RNG states), config (the run's settings): what an exact resume needs
best.pt is a hard link to the step checkpoint with the lowest val loss; the newest keep_last step
checkpoints are kept. Writes are atomic (atomic.py), so a crash mid-save keeps the previous files.

Safe loading. Unpickling can run arbitrary code, so a checkpoint someone sent you must not be
unpickled freely. Everything in ours is a tensor or a plain Python value (the NumPy and Python RNG
states are stored as a tensor and lists, see rng_state), so every load uses torch.load's
weights_only=True, which refuses anything else. mmap=True maps the file instead of reading it: eight
ranks resuming a 1.5B-parameter run (18 GB with AdamW's moments) share the page cache rather than
each holding a copy in RAM, and only the tensors that are used are ever read.
"""
import glob
import os
import pickle
import random
import shutil
import warnings
import zipfile
from typing import NamedTuple, Optional

import numpy as np
import torch

import hf
from atomic import atomic_write
import quantize
from bpe import Tokenizer
from model import GPT, GPTConfig

VERSION = 2  # 2: RNG states as tensors and lists, for weights_only loading. Bump on any layout change.


# ---- RNG states as plain values -----------------------------------------------------------------

def rng_state(device_type):
    """Every RNG a training step draws from, as tensors and lists (loadable with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ('MT19937', (624,) uint32, int, int, float)
    version, internal, gauss_next = random.getstate()        # (3, 625 ints, float or None)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,  # the current GPU's
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(r, device_type):
    torch.set_rng_state(r["torch"])
    if r["cuda"] is not None and device_type == "cuda":
        torch.cuda.set_rng_state(r["cuda"])
    keys, pos, has_gauss, gauss = r["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = r["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- writing and finding checkpoints in a run directory --------------------------------------------

def step_checkpoints(run_dir):
    """The step checkpoints in run_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), "ckpt_[0-9]*.pt")))


def save_step(state, run_dir, is_best=False, keep_last=2):
    """Write state as run_dir/ckpt_<iter_num>.pt, point best.pt at it when is_best, and delete all but
    the newest keep_last step checkpoints. Returns the path written."""
    path = os.path.join(run_dir, f"ckpt_{state['iter_num']:06d}.pt")
    atomic_write(path, lambda f: torch.save(state, f))
    if is_best:  # a hard link costs no copy; filesystems without links get a copy
        best, tmp = os.path.join(run_dir, "best.pt"), os.path.join(run_dir, "best.pt.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, best)
    for old in step_checkpoints(run_dir)[:-max(1, keep_last)]:
        os.remove(old)
    return path


def find(run_dir, which="best"):
    """The checkpoint file that `which` names in run_dir: "best" (lowest val loss; the newest step
    checkpoint if the run never evaluated), "last" (the newest), or a file name or path."""
    if which not in ("best", "last"):
        inside = os.path.join(run_dir, which)
        for path in (which, inside) if os.path.dirname(which) else (inside, which):
            if os.path.isfile(path):
                return path
        raise ValueError(f"checkpoint {which} is neither in {run_dir}/ nor a file; "
                         f"pass --ckpt=best, last, a file name in the run or a path")
    if not os.path.isdir(run_dir):
        raise ValueError(f"no run directory {run_dir}/; train one first (python train.py ...)")
    found = step_checkpoints(run_dir)
    best = os.path.join(run_dir, "best.pt")
    if which == "best" and os.path.exists(best):
        return best
    if not found:
        raise ValueError(f"{run_dir}/ holds no checkpoint (best.pt or ckpt_*.pt); train first")
    return found[-1]


# ---- reading ------------------------------------------------------------------------------------

def load(path):
    """The checkpoint dict at path, tensors on the CPU (memory-mapped): a checkpoint of this version, or a
    quantized model (quantize.save_quantized's format). Refuses, with a ValueError naming the file,
    anything else and anything that carries code."""
    try:
        with warnings.catch_warnings():  # torch's notice about the int8 weights' storage
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds pickled Python objects, not only tensors and plain "
                         f"values, and unpickling them could run code ({str(e).splitlines()[0][:120]}); "
                         f"load only checkpoints written by train.py") from None
    except Exception as e:  # missing, truncated, not a torch file
        if os.path.isfile(path) and not zipfile.is_zipfile(path):  # torch.save has written zip files since 1.6
            raise ValueError(f"cannot read checkpoint {path}: it is not a checkpoint, not a file torch.save wrote "
                             f"(train.py and finetune.py write .pt checkpoints); point --model at a run directory "
                             f"or one of its .pt files") from None
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(e).split())[:300]}") from None
    if isinstance(state, dict) and state.get("format") == quantize.FORMAT:
        return state
    if not isinstance(state, dict) or state.get("version") != VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is checkpoint version {got}, this code reads version {VERSION}; use the "
                         f"train.py/sample.py that wrote it")
    return state


def build_model(state):
    """The GPT a checkpoint dict describes, with its weights (on the CPU)."""
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model


class Opened(NamedTuple):
    """What a script reading a model gets from open_model."""
    model: GPT                # on the CPU, in eval mode
    tokenizer: Tokenizer
    state: Optional[dict]     # the checkpoint dict (config, iter_num, head, ...); None for Hugging Face weights
    path: str                 # the checkpoint file read; for Hugging Face weights, the hub name or directory
    run_dir: Optional[str]    # the folder holding the checkpoint (its log.jsonl, eval_*.json); None for HF
    description: str          # one line for the log: "out/best.pt (step 400)", or the hub name or directory


# The reading scripts' old names for --model (configurator.configure's renamed=): a run was --out_dir=DIR,
# anything else --init_from=NAME, whose default 'resume' meant "the run in out_dir". Each old name
# maps to (new name, its old default), and its old default changes nothing.
OLD_MODEL_FLAGS = {"out_dir": ("model", "out"), "init_from": ("model", "resume")}


def open_model(source, which="best"):
    """An Opened model from any source a script may be pointed at:
      - a run directory of train.py or finetune.py (its checkpoint `which`: best, last, or a file
        name in the run; see find)
      - a checkpoint file (.pt)
      - a GPT-2 name on the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl)
      - a local Hugging Face directory (config.json + weights): GPT-2, or a Llama or OpenAI GPT of
        our presets' forms (export.py's output, see hf.py), with GPT-2's tokenizer or, if the
        directory holds one, its tokenizer.bpe
    A checkpoint file is read once: the model, its tokenizer and its state come from the same load.
    Bad sources are a ValueError naming the fix."""
    hf_dir = os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json"))
    if (hf_dir or source in hf.GPT2_NAMES or os.path.isfile(source)) and which != "best":
        raise ValueError(f"--ckpt={which} picks a checkpoint inside a run directory, and {source} is not one; "
                         f"drop --ckpt, or pass --model=RUN_DIR")
    if hf_dir or source in hf.GPT2_NAMES:
        model = hf.from_pretrained(source)
        bpe = os.path.join(source, "tokenizer.bpe") if hf_dir else ""
        tok = Tokenizer.load(bpe) if os.path.exists(bpe) else Tokenizer.gpt2()
        if tok.vocab_size != model.config.vocab_size:
            raise ValueError(f"{source}: the model has {model.config.vocab_size} tokens, its tokenizer "
                             f"({tok.name}) {tok.vocab_size}; put the matching tokenizer.bpe beside config.json")
        return Opened(model.eval(), tok, None, source, None, source)
    if os.path.isfile(source):
        path = source
    elif os.path.isdir(source) or which not in ("best", "last"):
        path = find(source, which)
    else:
        raise ValueError(f"no model at {source!r}: --model takes a run directory (train one first: python "
                         f"train.py ...), a checkpoint file, a Hugging Face directory or one of "
                         f"{', '.join(hf.GPT2_NAMES)}")
    state = load(path)
    if state.get("format") == quantize.FORMAT:  # int8 or int4 weights: the quantized model, on the CPU
        model, tok = quantize.from_state(state, path)
        return Opened(model, tok, None, path, None, f"{path} ({state['mode']} weights)")
    if "model" not in state:  # a finetune.py LoRA checkpoint: adapters and a reference to the base
        raise ValueError(f"{path} holds LoRA adapters, not a whole model; fold them into one first: "
                         f"python finetune.py --out_dir={os.path.dirname(path) or '.'} --merge=merged.pt")
    tok = Tokenizer.loads(state["tokenizer"], source=f"{path} (its embedded tokenizer)")
    return Opened(build_model(state).eval(), tok, state, path, os.path.dirname(path) or ".",
                  f"{path} (step {state['iter_num']})")


def load_quantized(path):
    """(model, tokenizer) from a file of quantize.save_quantized: the model on the CPU in eval mode.
    Anything else is refused, with a ValueError naming the file."""
    state = load(path)
    if state.get("format") != quantize.FORMAT:
        raise ValueError(f"{path} is not a quantized model of format {quantize.FORMAT} (save_quantized writes them)")
    return quantize.from_state(state, path)


def load_model(source, which="best"):
    """(model, tokenizer, description): open_model for the callers that need only those three."""
    opened = open_model(source, which)
    return opened.model, opened.tokenizer, opened.description
