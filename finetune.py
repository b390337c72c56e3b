"""
finetune.py: supervised fine-tuning of a pretrained GPT for a labelled task, as GPT-1 did (Radford et
al. 2018, §3.2-3.3 and figure 1), fully or with LoRA adapters (lora.py).

    python finetune.py config/finetune_gpt1.py --model=gpt2 --data=nyu-mll/glue --data_config=sst2
    python finetune.py config/finetune_gpt1.py --model=out-gpt1 --task=entailment \\
        --data=data/rte --text_fields=sentence1,sentence2 --lora_rank=8 --learning_rate=5e-4
    python finetune.py --out_dir=out-finetune --predict=new.jsonl     # label new inputs
    python finetune.py --out_dir=out-finetune --merge=merged.pt       # one standalone checkpoint
    torchrun --standalone --nproc_per_node=8 finetune.py config/finetune_gpt1.py ...

The pretrained model reads each input as one token sequence. Three learned special tokens are added
to the tokenizer and to the embedding table (GPT-2's table has 50,304 rows for 50,257 tokens, so
they fit without resizing; a smaller table grows): start, delim and extract. The four task types of
the paper's figure 1 become (each sequence cut to max_len, see below):
  classification   start text extract                          one sequence per example
  entailment       start premise delim hypothesis extract      one sequence
  similarity       start a delim b extract, start b delim a extract: both orders, each through the
                   model, the two extract states added before the head (sentence pairs have no order)
  multiple_choice  start context delim answer_k extract, one sequence per choice; each gives one
                   score, and a softmax over the choices picks the answer
A linear head reads the final hidden state at the extract token (after dropout 0.1): classes, one
real number (regression=True, e.g. STS-B's 0-5 similarity, trained with squared error), or one
score per choice. The objective adds the language-model loss on the same sequences (§3.2):
L = task loss + lm_coef * LM loss, lm_coef = lambda = 0.5, which "improves generalization" and
speeds convergence; the LM loss scores each next token of the text (not the task tokens).

Design choices
- Mechanics. The optimizer groups, the learning-rate schedule, the optimizer step and the DDP wrap
  are training.py's, shared with train.py; the base model comes through checkpoint.open_model, as
  every script's --model does.
- Data. A Hugging Face dataset by name (datasets.load_dataset(data, data_config)), or local files
  read by rows.read_rows (eval.py's reader too): a folder with train.*, val.* (or validation, dev)
  and test.* files in .jsonl/.json/.csv/.tsv, or one file (train only). With no val split,
  val_fraction of train is carved off with the seed. Label names map to ids (a dataset's own class names, else the
  sorted values seen in train), and the mapping is saved in the checkpoint.
- Bad input stops with one line naming the split and row: a missing text or label field, a label
  never seen in training, an empty split, items with different numbers of choices. An input longer
  than max_len is cut, never dropped: one token at a time from the end of its longest text (so
  each text keeps its beginning), and the count is printed per split.
- Batches. Each example's sequences are padded on the right to the longest in the micro-batch; the
  attention is causal, so padding after a token never changes its state, and each sequence's extract
  position is read directly. batch_size is the optimizer's batch over all processes (GPT-1: 32),
  split into micro_batch_size pieces, so memory and results are independent of each other.
- LoRA (lora_rank > 0). The base weights are frozen; A and B of each target projection, the head and
  the task-token embeddings (as k extra rows, not the whole table) train. Since B starts at zero,
  step 0 computes exactly the base model. A LoRA checkpoint holds only those tensors and the base's
  path (with a checksum); --merge folds them into one standalone checkpoint in train.py's format,
  which checkpoint.load_model, sample.py and export read like any run.
- Early stopping. Every eval_interval steps (and at the end) val is scored; a better val metric
  saves best.pt, and patience evaluations without one stop the run. The best checkpoint is then
  reloaded from disk and scored on val and, where it has labels, on test.
- Transfer (transfer_layers = k >= 0). Only the token and position embeddings, the final norm (and an
  untied output layer, which the LM loss reads) and the first k blocks come from the pretrained model;
  blocks k.. start as a new GPT of the same config with the seed would (training.reinit_blocks). k = 0
  transfers the embeddings alone: GPT-1's figure 2 (left), where each transferred layer helps.
- Task distillation (teacher = a finetune.py run of the same task and labels, its model on the same
  tokenizer; Tang et al. 2019). Before training, the teacher's class (or choice) logits for every train
  input and every input of `unlabeled` (a file of the same text fields, labels ignored) are computed
  once and kept; each example's task loss is then distill.task_loss: distill_alpha * T^2 *
  KL(teacher_T || student_T) + (1 - distill_alpha) * cross-entropy with its label, the last term on
  labelled inputs only (Hinton et al. 2015). The student is --model, often smaller; the LM loss stays.
- No exact resume (no optimizer state is saved): fine-tuning runs are minutes to hours, and a
  checkpoint is the trained tensors only, so best.pt stays small for LoRA.
"""
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

import checkpoint
import distill
import lora
import process
import quantize
import training
from atomic import atomic_write
from bpe import Tokenizer
from configurator import UserError, check_hub, configure, run
from device import autocast, pick_device
from process import say
from rows import read_rows
from score import pad_right

# ---- settings (override with a config file and/or --key=value) -----------------------------------
# I/O
model = "gpt2"                # the pretrained model, as every script's --model= takes it: a train.py run
                              # dir (its best.pt), a .pt file, 'gpt2', 'gpt2-medium', ... or a Hugging Face dir
out_dir = "out-finetune"      # best.pt and log.jsonl go here
# data
data = ""                     # a hub dataset ('nyu-mll/glue'), a folder of train/val/test files, one file
                              # (train), or a file per split: train=sts-train.csv,val=sts-dev.csv,test=sts-test.csv
data_config = ""              # the hub dataset's configuration ('sst2', 'rte', 'stsb'); "" = none
header = True                 # csv/tsv: the first row names the columns; False = no header row: name the
                              # columns by number from 0 (--text_fields=5,6 --label_field=4)
delimiter = "auto"            # csv/tsv: 'auto' (a tab if the first line has more tabs than commas) | ',' | 'tab' | ...
task = "classification"       # 'classification' | 'entailment' | 'similarity' | 'multiple_choice'
text_fields = "sentence"      # comma-separated: the text (classification), the two texts (entailment,
                              # similarity), or the context (multiple_choice: one or more fields, joined)
context_separator = " "       # multiple_choice: put between context fields (Story Cloze's four sentences)
choice_fields = ""            # multiple_choice: one field holding a list of answers, or one field per answer
label_field = "label"         # a class name or id; a number with regression; multiple_choice: the right
                              # choice's number, counted from label_base
label_base = 0                # multiple_choice: the number of the first choice: 0, or 1 for labels 1..k
                              # (Story Cloze's AnswerRightEnding is 1 or 2)
regression = False            # a real-valued label: one output, squared error, Pearson and Spearman
val_fraction = 0.1            # carved off train (with the seed) when the data has no val split
max_len = 0                   # tokens per sequence, task tokens included; 0 = the model's block_size
# objective (GPT-1 §3.2)
lm_coef = 0.5                 # lambda: L = task loss + lm_coef * LM loss; 0 turns the LM loss off
head_dropout = 0.1            # "dropout to the classifier with a rate of 0.1" (§4.1)
dropout = 0.1                 # the transformer's own dropouts while fine-tuning (GPT-1 kept its 0.1)
# LoRA (Hu et al. 2021); lora_rank = 0 fine-tunes every weight
lora_rank = 0                 # the adapters' rank, e.g. 8; 0 = full fine-tuning
lora_alpha = 16.0             # the update is scaled by alpha / rank
lora_dropout = 0.0            # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # any of these projections
base_bits = 32                # with lora_rank: 4 freezes the blocks' Linears in int4 under the adapters (QLoRA,
                              # Dettmers et al. 2023): an eighth of float32's bytes, plus scales; CPU only
base_group_size = 64          # base_bits=4: weights per int4 scale and zero (32, 64, 128, 256)
# transfer and task distillation
transfer_layers = -1          # -1 = the whole pretrained model; k >= 0 = its embeddings, final norm and first
                              # k blocks, the rest initialised fresh with the seed (GPT-1's figure 2, left)
teacher = ""                  # a finetune.py run (or its .pt) of this task whose outputs the model learns
                              # (task distillation, Tang et al. 2019); "" = learn from the labels alone
unlabeled = ""                # with teacher: a file of more inputs (the text fields; labels ignored)
distill_alpha = 0.5           # the task loss: alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
distill_temperature = 2.0     # T: both distributions softened by it (Hinton et al. 2015)
# optimizer: AdamW, linear warmup then linear decay to 0
batch_size = 32               # examples per optimizer step, over all processes
micro_batch_size = 32         # examples per forward pass per process: lower it if memory runs out
epochs = 3                    # passes over train (GPT-1: 3)
max_iters = 0                 # optimizer steps; 0 = epochs x steps per epoch
learning_rate = 6.25e-5       # GPT-1's, for 117M parameters; smaller models want more (docs/finetune.md)
warmup_frac = 0.002           # the fraction of all steps spent warming up (GPT-1: 0.2%)
weight_decay = 0.01           # on matrices and embeddings only
beta1 = 0.9                   # AdamW's moment decay rates and epsilon
beta2 = 0.999                 # (Adam's defaults, which GPT-1 used)
eps = 1e-8                    # added to the second moment's root
grad_clip = 1.0               # 0 = off
# evaluation and early stopping
eval_interval = 200           # steps between val evaluations (and one at the end)
patience = 0                  # stop after this many evaluations without a better val metric; 0 = off
metric = "auto"               # 'accuracy' | 'f1' | 'mcc' | 'pearson' | 'spearman' | 'loss'; auto =
                              # accuracy, or pearson with regression
log_interval = 10             # steps between log lines
# prediction and merging: either one runs on out_dir's best.pt (or ckpt) instead of training
ckpt = "best"                 # 'best' | 'last' | a file name in out_dir | a .pt path
predict = ""                  # a file of inputs (the same fields; .jsonl/.json/.csv/.tsv) to label
predict_out = ""              # where the predictions go; "" = <predict>.predictions.jsonl
merge = ""                    # write a standalone checkpoint (LoRA folded in) to this path
# system
device = "auto"               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"                # 'float32' | 'bfloat16' | 'float16'; auto = bfloat16 on GPUs that have it
seed = 1337                   # the head's and task tokens' init, the val carve-out, the batch order
# --------------------------------------------------------------------------------------------------

TASKS = {"classification": 1, "entailment": 2, "similarity": 2, "multiple_choice": 1}  # texts per input
SPECIAL = ("<|start|>", "<|delim|>", "<|extract|>")
VAL_NAMES = ("validation", "val", "dev", "valid")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


# ---- input transformations (figure 1) --------------------------------------------------------------

def fit(parts, budget):
    """Cut token lists to budget tokens in all: one token at a time from the end of the longest
    ("longest first"), so each part keeps its beginning. Returns (parts, tokens cut)."""
    parts, cut = [list(p) for p in parts], 0
    while sum(map(len, parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))  # the first on ties
        parts[longest].pop()
        cut += 1
    return parts, cut


def transform(kind, texts, choices, special, max_len):
    """Token lists -> the sequences one example is read as, and the tokens cut to fit max_len.
    texts: its text fields' ids; choices: each answer's ids (multiple_choice); special: the ids of
    (start, delim, extract)."""
    start, delim, extract = special
    if kind == "classification":
        (a,), cut = fit(texts, max_len - 2)
        return [[start, *a, extract]], cut
    if kind in ("entailment", "similarity"):
        (a, b), cut = fit(texts, max_len - 3)
        seqs = [[start, *a, delim, *b, extract]]
        if kind == "similarity":  # no inherent order: both, added later (§3.3)
            seqs.append([start, *b, delim, *a, extract])
        return seqs, cut
    seqs, cut = [], 0
    for answer in choices:  # each choice on its own: the context is cut only as much as it needs
        (ctx, ans), c = fit([texts[0], answer], max_len - 3)
        seqs.append([start, *ctx, delim, *ans, extract])
        cut += c
    return seqs, cut


def collate(examples, special, device):
    """A list of examples ({"seqs": [[ids]], "y": label}) -> the tensors one forward pass needs:
    idx (N, T) every sequence, right-padded; last (N,) each one's extract position; targets (N, T)
    the next text token at each position, -1 where there is none (padding, task tokens)."""
    seqs = [s for ex in examples for s in ex["seqs"]]
    idx = pad_right(seqs)  # (N, T), padded with id 0: read by no earlier position
    T = idx.size(1)
    last = torch.tensor([len(s) - 1 for s in seqs])
    targets = torch.full_like(idx, -1)
    targets[:, :-1] = idx[:, 1:]
    pad = torch.arange(T)[None, :] >= last[:, None]  # at the extract token and after: nothing to predict
    targets[pad | torch.isin(targets, torch.tensor(special))] = -1
    return idx.to(device), last.to(device), targets.to(device)


# ---- the model: a GPT with a task head -----------------------------------------------------------

class TaskTokens(nn.Module):
    """An embedding table whose rows from `first` on (the task tokens) are a separate, trainable
    (k, C) parameter, so LoRA trains k rows rather than the whole frozen (V, C) table."""

    def __init__(self, wte, first, k):
        super().__init__()
        self.wte, self.first = wte, first
        self.rows = nn.Parameter(wte.weight[first:first + k].detach().clone())

    def forward(self, idx):  # (B, T) -> (B, T, C)
        new = (idx >= self.first)[..., None]
        return torch.where(new, self.rows[(idx - self.first).clamp(0, len(self.rows) - 1)], self.wte(idx))

    def merged(self):
        """The plain table with the trained rows written into it."""
        with torch.no_grad():
            self.wte.weight[self.first:self.first + len(self.rows)] = self.rows
        return self.wte


class TaskModel(nn.Module):
    """The GPT and a linear head on the final hidden state at each sequence's extract token."""

    def __init__(self, gpt, kind, n_out, head_dropout, n_choices=None):
        super().__init__()
        self.gpt, self.kind, self.n_choices = gpt, kind, n_choices
        self.drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(gpt.config.n_embd, n_out)
        nn.init.normal_(self.head.weight, std=0.02)  # as every GPT weight
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, last, targets=None):
        """idx (N, T), last (N,) -> outputs (B, n_out), one row per example (B = N / sequences per
        example; multiple_choice: n_out = the number of choices), and the LM loss per example (B,)
        if targets are given."""
        h = self.gpt.hidden_states(idx)  # (N, T, C)
        x = h[torch.arange(len(idx), device=idx.device), last]  # (N, C) the extract tokens' states
        if self.kind == "similarity":
            x = x.view(-1, 2, x.size(-1)).sum(1)  # (B, C): the two orders, added element-wise
        out = self.head(self.drop(x))  # (B, n_out), or (N, 1) for multiple choice
        if self.kind == "multiple_choice":
            out = out.view(-1, self.n_choices)  # (B, K): one score per choice, for a softmax over them
        if targets is None:
            return out, None
        tok = F.cross_entropy(self.gpt.head(h).flatten(0, 1), targets.flatten(), ignore_index=-1,
                              reduction="none").view_as(targets)  # (N, T), 0 where ignored
        per_seq = tok.sum(1) / (targets >= 0).sum(1).clamp(min=1)  # mean over each sequence's text
        return out, per_seq.view(len(out), -1).mean(1)  # (B,): mean over an example's sequences


def task_loss(out, y, spec):
    """Per-example task loss (B,): squared error for regression, else cross-entropy over the outputs
    (the classes, or the choices)."""
    if spec["regression"]:
        return (out[:, 0].float() - y) ** 2
    return F.cross_entropy(out.float(), y, reduction="none")


def objective(model, batch, y, spec, coef, teacher_out=None):
    """(L, task loss, LM loss), each summed over the batch's examples: L = task + coef * LM (§3.2). Given
    the teacher's outputs (B, K), the task loss is distillation's (distill.task_loss; y = -1: no label)."""
    idx, last, targets = batch
    out, lm = model(idx, last, targets if coef else None)
    task = task_loss(out, y, spec) if teacher_out is None else \
        distill.task_loss(out, teacher_out, y, distill_alpha, distill_temperature)
    lm = lm if lm is not None else torch.zeros_like(task)
    return (task + coef * lm).sum(), task.sum(), lm.sum()


def grow_vocab(gpt, vocab_size):
    """Make the model accept ids up to vocab_size - 1. The table is padded to a multiple of 64 rows,
    so new tokens usually fit; otherwise it grows (old rows kept, the tied head re-tied)."""
    c = gpt.config
    c.vocab_size = vocab_size
    wte = gpt.transformer.wte
    if c.padded_vocab_size > wte.num_embeddings:
        bigger = nn.Embedding(c.padded_vocab_size, c.n_embd).to(wte.weight.device, wte.weight.dtype)
        head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False).to(wte.weight.device, wte.weight.dtype)
        for new, old in ((bigger, wte), (head, gpt.lm_head)):
            nn.init.normal_(new.weight, std=0.02)
            with torch.no_grad():
                new.weight[:old.weight.size(0)] = old.weight
        gpt.transformer.wte, gpt.lm_head = bigger, head
        if c.tie_weights:
            gpt.transformer.wte.weight = gpt.lm_head.weight


def fingerprint(gpt):
    """A checksum of the base weights: a LoRA checkpoint refuses a base that has changed since. The
    table's padding rows are left out: from_pretrained fills them at random on every load."""
    V = gpt.config.vocab_size
    return float(sum((w[:V] if k in ("transformer.wte.weight", "lm_head.weight") else w).double().abs().sum()
                     for k, w in gpt.state_dict().items()))


def build(gpt, tok, spec, head_dropout_p=0.0):
    """The base GPT made ready for spec's task: task tokens in tokenizer and table, LoRA if asked.
    Returns (TaskModel, tokenizer with the task tokens)."""
    known = set(tok.special_tokens)
    tok = tok.with_special_tokens(SPECIAL)
    special = [tok.special_tokens[s] for s in SPECIAL]
    if gpt.config.vocab_size < tok.vocab_size:
        grow_vocab(gpt, tok.vocab_size)
    with torch.no_grad():  # new tokens start random, N(0, 0.02) as GPT-1 initialised every weight
        for s in SPECIAL:
            if s not in known:
                nn.init.normal_(gpt.transformer.wte.weight[tok.special_tokens[s]], std=0.02)
    if spec["lora"]:
        if spec["lora"].get("bits", 32) == 4:  # QLoRA: the blocks' Linears in int4 (round to nearest), frozen
            for block in gpt.transformer.h:
                for name, m in list(block.named_modules()):
                    if isinstance(m, nn.Linear):
                        parent, _, child = name.rpartition(".")
                        setattr(block.get_submodule(parent), child, quantize.rtn(m, spec["lora"]["group_size"]))
        lora.add(gpt, spec["lora"]["targets"], spec["lora"]["rank"], spec["lora"]["alpha"], spec["lora"]["dropout"])
        first = min(special)
        gpt.transformer.wte = TaskTokens(gpt.transformer.wte, first, tok.vocab_size - first)
    n_out = 1 if spec["regression"] or spec["task"] == "multiple_choice" else len(spec["labels"])
    model = TaskModel(gpt, spec["task"], n_out, head_dropout_p, spec["n_choices"])
    spec["special"] = special
    return model, tok


def load_finetuned(path):
    """(TaskModel in eval mode on the CPU, tokenizer, spec, state) from a finetune.py checkpoint: a
    full or merged one (the whole model), or a LoRA one (its adapters on top of the base it names)."""
    state = checkpoint.load(path)
    spec = state.get("finetune")
    if spec is None:
        raise ValueError(f"{path} is not a finetune.py checkpoint (it has no task head)")
    if "model" in state:
        gpt = checkpoint.build_model(state)
        tok = Tokenizer.loads(state["tokenizer"], source=path)
        model = TaskModel(gpt, spec["task"], state["head"]["weight"].size(0), 0.0, spec["n_choices"])
    else:
        gpt, tok, _ = checkpoint.load_model(spec["base"])
        if not math.isclose(fingerprint(gpt), spec["base_fingerprint"], rel_tol=1e-9):
            raise ValueError(f"{path}: its base {spec['base']} has changed since the adapters were trained; "
                             f"use the same base, or a checkpoint written with --merge")
        model, tok = build(gpt, tok, dict(spec))
        _, unexpected = model.gpt.load_state_dict(state["adapters"], strict=False)  # the rest is the base
        if unexpected:
            raise ValueError(f"{path}: adapter tensors {unexpected[:3]} do not fit the base {spec['base']}")
    model.head.load_state_dict(state["head"])
    return model.eval(), tok, spec, state


def merged_state(model, state):
    """The checkpoint dict of a LoRA run as one standalone model: adapters folded into the weights,
    the task-token rows into the table; train.py's format plus the head."""
    lora.merge(model.gpt)
    model.gpt.transformer.wte = model.gpt.transformer.wte.merged()  # (a tied head shares the table)
    out = {k: v for k, v in state.items() if k != "adapters"}
    out["model"] = model.gpt.state_dict()
    out["finetune"] = {**state["finetune"], "lora": None, "merged_from": state["finetune"].get("base")}
    return out


# ---- data ----------------------------------------------------------------------------------------

def load_splits(data, data_config, label_field):
    """{split: list of row dicts} for train, val and test (those present): a hub dataset through
    datasets.load_dataset, or local files read here (so a bad file names its line). Each row carries
    "__row__", where it is in its file ("data/train.csv line 7"), for error messages. Class ids of a hub
    ClassLabel become its names (-1, GLUE's unlabelled test rows, becomes None). Returns (splits, class
    names or None)."""
    files = split_files(data)
    if files is not None:
        splits = {split: read_rows(f, "data", header, delimiter) for split, f in files.items()}
        for split, rows in splits.items():
            if not rows:
                raise UserError(f"the {split} split is empty ({files[split]}); give it some rows (or drop the file)")
        return splits, None
    import datasets  # imported only here: ~2 s, and not needed to predict, merge or read local files
    datasets.disable_progress_bars()
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:  # datasets retries for half a minute, a line per try; a cache needs HF_HUB_OFFLINE=1
        check_hub(f"--data={data!r} is a dataset on the hub; pass local files instead (--data=FOLDER, FILE, or "
                  f"train=FILE,val=FILE), or set HF_HUB_OFFLINE=1 to read a copy datasets has cached")
    try:
        ds = datasets.load_dataset(data, data_config or None)
        ds = {("val" if k in VAL_NAMES else k): v for k, v in ds.items()}
    except Exception as e:  # offline, a typo in the name: one line, not a traceback
        raise UserError(f"cannot load data={data!r} data_config={data_config!r}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}")
    names = None
    feature = ds["train"].features.get(label_field) if "train" in ds else None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    splits = {}
    for split in ("train", "val", "test"):
        if split in ds:
            rows = ds[split].to_list()
            for i, r in enumerate(rows):
                r["__row__"] = f"{data} {split} row {i + 1}"
                if names:
                    v = r.get(label_field)
                    r[label_field] = names[v] if isinstance(v, int) and 0 <= v < len(names) else None
            splits[split] = rows
    return splits, names


def split_files(data):
    """{split: local file} that data names (a folder of train/val/test files, one file, or
    split=file pairs), or None for a hub dataset."""
    if "=" in data:
        files = {}
        for pair in split_names(data):
            split, _, path = pair.partition("=")
            split = "val" if split in VAL_NAMES else split
            if split not in ("train", "val", "test") or not path:
                raise UserError(f"data={data!r}: each file is given as train=PATH, val=PATH or test=PATH, "
                                f"comma-separated; got {pair!r}")
            if not os.path.isfile(path):
                raise UserError(f"data={data!r}: no file {path}")
            files[split] = path
    elif os.path.isdir(data):
        files = {}
        for f in sorted(os.listdir(data)):
            stem, ext = os.path.splitext(f)
            split = "train" if stem == "train" else "val" if stem in VAL_NAMES else "test" if stem == "test" else None
            if split and ext in EXTENSIONS:
                if split in files:
                    raise UserError(f"{data}/ has two {split} files ({os.path.basename(files[split])}, {f}); keep one")
                files[split] = os.path.join(data, f)
        if "train" not in files:
            raise UserError(f"{data}/ has no train file; name them train, val (or validation, dev) and test, "
                            f"each .jsonl, .json, .csv or .tsv, or name each file: --data=train=A.csv,val=B.csv")
    elif os.path.isfile(data):
        files = {"train": data}
    else:
        return None
    if "train" not in files:
        raise UserError(f"data={data!r} names no train file")
    return files


def fields_of(r):
    return ", ".join(repr(str(k)) for k in r if k != "__row__")


def check_fields(rows, spec, split):
    """The named fields exist in the first row; if not, say which there are, and that a header row
    that looks like data means header=False."""
    r = rows[0]
    for kind, names in (("text_fields", spec["text_fields"]), ("choice_fields", spec["choice_fields"]),
                        ("label_field", [spec["label_field"]])):
        for f in names:
            if f not in r:
                where = r.get("__row__", f"{split} row 1")
                hint = ("; if that first row is data, the file has no header row: pass --header=False and name "
                        "the columns by number from 0 (e.g. --text_fields=5,6 --label_field=4)") \
                    if header and where.endswith(" line 2") else ""
                raise UserError(f"{where}: no field {f!r} for --{kind} (the fields are {fields_of(r)}){hint}")


def label_names(rows, field):
    """The sorted distinct labels of rows, as text; numbers in numeric order (2 before 10)."""
    def number_first(s):
        try:
            return 0, float(s), s
        except ValueError:
            return 1, 0.0, s
    return sorted({str(r[field]) for r in rows if not missing(r.get(field))}, key=number_first)


def is_number(s):
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def missing(v):
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def make_examples(rows, spec, tok, split, need_labels):
    """Rows -> examples {"seqs": token sequences, "y": label id / value / choice index or None}.
    Returns (examples, inputs cut to fit max_len, tokens cut). Bad rows are a UserError naming them
    as they are in their file. multiple_choice joins its context fields with context_separator."""
    if not rows:
        raise UserError(f"the {split} split is empty; give it some rows (or drop the file)")
    mc = spec["task"] == "multiple_choice"
    texts, counts = [], []
    for i, r in enumerate(rows):
        where = r.get("__row__", f"{split} row {i + 1}")
        parts = []
        for f in spec["text_fields"]:
            if r.get(f) is None:
                raise UserError(f"{where} has no field '{f}' (its fields: {fields_of(r)}); set --text_fields")
            parts.append(str(r[f]))
        texts += [spec.get("context_separator", " ").join(parts)] if mc else parts
        choices = []
        if mc:
            cf = spec["choice_fields"]
            for f in cf:
                if f not in r:
                    raise UserError(f"{where} has no field '{f}' (its fields: {fields_of(r)}); set --choice_fields")
            choices = list(r[cf[0]]) if len(cf) == 1 and isinstance(r[cf[0]], (list, tuple)) else [r[f] for f in cf]
            if len(choices) != spec["n_choices"]:
                raise UserError(f"items with different numbers of choices: {where} has {len(choices)}, "
                                f"others {spec['n_choices']}; every item needs the same number")
            texts += [str(c) for c in choices]
        counts.append(len(texts) - sum(counts))
    ids = tok.encode_batch(texts)  # special-token text in the data stays ordinary text
    examples, n_cut, tokens_cut, k = [], 0, 0, 0
    nt = 1 if mc else len(spec["text_fields"])
    for i, r in enumerate(rows):
        pieces, k = ids[k:k + counts[i]], k + counts[i]
        seqs, cut = transform(spec["task"], pieces[:nt], pieces[nt:], spec["special"], spec["max_len"])
        n_cut, tokens_cut = n_cut + (cut > 0), tokens_cut + cut
        examples.append({"seqs": seqs, "y": label_of(r, r.get("__row__", f"{split} row {i + 1}"), spec, need_labels)})
    return examples, n_cut, tokens_cut


def label_of(r, where, spec, need_labels):
    v = r.get(spec["label_field"])
    if missing(v):
        if need_labels:
            raise UserError(f"{where} has no label field '{spec['label_field']}' (its fields: {fields_of(r)}); "
                            f"set --label_field")
        return None
    if spec["regression"]:
        try:
            return float(v)
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {v!r} is not a number, as regression needs") from None
    if spec["task"] == "multiple_choice":
        base, n = spec.get("label_base", 0), spec["n_choices"]
        if isinstance(v, bool) or not str(v).strip().isdigit() or not base <= int(v) < base + n:
            raise UserError(f"{where}: label {v!r} is not a choice number {base}..{base + n - 1}: labels count the "
                            f"choices from label_base={base}" + ("; if yours count from 1, pass --label_base=1"
                                                                  if base == 0 else ""))
        return int(v) - base
    if str(v) not in spec["labels"]:
        shown = ", ".join(spec["labels"][:10]) + (f", ... ({len(spec['labels'])} in all)" if len(spec["labels"]) > 10
                                                   else "")
        raise UserError(f"{where}: label {str(v)!r} never occurs in training (labels: {shown}); fix the row or "
                        f"the label field")
    return spec["labels"].index(str(v))


def labels_tensor(examples, spec):
    """(B,) label ids (or values); -1 for an input without one (an unlabeled input a teacher labels)."""
    y = [-1 if ex["y"] is None else ex["y"] for ex in examples]
    return torch.tensor(y, dtype=torch.float32 if spec["regression"] else torch.long)


# ---- evaluation ----------------------------------------------------------------------------------

def outputs(model, examples, spec, mb, ctx, dev, rank=0, world=1):
    """The model's outputs (n, n_out) for every example, float32 on the CPU, in order. Under DDP each
    rank runs every world-th micro-batch and all ranks gather the whole."""
    model.eval()
    mine = []
    with torch.no_grad():
        for c in range(rank, math.ceil(len(examples) / mb), world):
            with ctx:
                out, _ = model(*collate(examples[c * mb:(c + 1) * mb], spec["special"], dev)[:2])
            mine.append((c, out.float().cpu()))
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
        mine = sorted(x for part in every for x in part)
    return torch.cat([o for _, o in sorted(mine, key=lambda x: x[0])]) if mine else torch.zeros(0, 1)


def rankdata(x):
    """Ranks 1..n with ties given their average rank (what Spearman's rho correlates)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)  # sorted unique values
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else 0.0  # 0 for a constant side (scipy: nan)


def metrics(out, y, spec):
    """Scores of outputs (n, n_out) against labels y (n,): accuracy, and for two classes F1 of class 1,
    Matthews correlation (any number of classes); regression: Pearson and Spearman; the loss."""
    m = {"loss": float(task_loss(out, y, spec).mean())}
    if spec["regression"]:
        p = out[:, 0]
        return {**m, "pearson": pearson(p, y), "spearman": pearson(rankdata(p), rankdata(y))}
    pred = out.argmax(1)
    m["accuracy"] = float((pred == y).double().mean())
    if spec["task"] == "multiple_choice":
        return m
    k = out.size(1)
    if k == 2:
        tp, fp, fn = [int(((pred == a) & (y == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
        m["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    cm = torch.zeros(k, k, dtype=torch.float64)  # confusion matrix, rows true, columns predicted
    cm.index_put_((y, pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    t, p, n, c = cm.sum(1), cm.sum(0), cm.sum(), cm.trace()
    denom = ((n * n - p @ p) * (n * n - t @ t)).sqrt()  # Gorodkin's multiclass form, as sklearn
    m["mcc"] = float((c * n - t @ p) / denom) if denom > 0 else 0.0
    return m


def main_metric(spec):
    name = metric if metric != "auto" else "pearson" if spec["regression"] else "accuracy"
    allowed = ("loss", "pearson", "spearman") if spec["regression"] else \
        ("loss", "accuracy") if spec["task"] == "multiple_choice" else ("loss", "accuracy", "mcc") + \
        (("f1",) if len(spec["labels"]) == 2 else ())
    if name not in allowed:
        raise UserError(f"metric={name!r} does not apply here; choose one of {', '.join(allowed)}")
    return name


def show(m):
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def peak_memory(device_type):
    """Peak memory of this process so far: the GPU's allocations, or on CPU the resident set size."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated(), "GPU memory allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "RSS of the process"


def score(model, examples, spec, ctx, dev, rank, world):
    """metrics of the model on examples (all ranks take part, see outputs)."""
    return metrics(outputs(model, examples, spec, micro_batch_size, ctx, dev, rank, world),
                   labels_tensor(examples, spec), spec)


# ---- the steps of main -----------------------------------------------------------------------------

def split_names(s):
    return [f.strip() for f in s.split(",") if f.strip()]


def run_merge(path):
    """Write the fine-tuned model at path as one standalone checkpoint to `merge` (LoRA folded in)."""
    if os.path.isdir(merge):
        raise UserError(f"--merge={merge} is a folder; name the checkpoint file to write, e.g. "
                        f"--merge={os.path.join(merge, 'merged.pt')}")
    model, _, spec, state = load_finetuned(path)
    if spec["lora"]:
        state = merged_state(model, state)
    atomic_write(merge, lambda f: torch.save(state, f))
    how = "LoRA merged into the weights" if spec["lora"] else "it was already full"
    if spec["lora"] and spec["lora"].get("bits", 32) == 4:
        how += ("; the 4-bit base dequantized to float32, as LoRA's update is not on the 4-bit grid: it computes "
                "what the QLoRA model did, at float size")
    print(f"wrote {merge}: {path} as one standalone model ({how})")


def run_predict(path, dev, ctx):
    """Label the rows of `predict` with the fine-tuned model at path; write one JSON line per row: the
    row, its prediction and the probabilities."""
    model, tok, spec, _ = load_finetuned(path)
    model.to(dev)
    rows = read_rows(predict, "predict", header, delimiter)
    examples, n_cut, tokens_cut = make_examples(rows, spec, tok, predict, need_labels=False)
    if n_cut:
        print(f"{n_cut} of {len(rows)} inputs longer than max_len={spec['max_len']} were cut ({tokens_cut} tokens)")
    out = outputs(model, examples, spec, micro_batch_size, ctx, dev)
    dest = predict_out or os.path.splitext(predict)[0] + ".predictions.jsonl"
    lines = []
    for r, o in zip(rows, out):
        r = {k: v for k, v in r.items() if k != "__row__"}  # the row as its file gives it
        if spec["regression"]:
            r = {**r, "prediction": float(o[0])}
        elif spec["task"] == "multiple_choice":
            r = {**r, "prediction": int(o.argmax()), "probabilities": [round(float(p), 6) for p in o.softmax(0)]}
        else:
            probs = o.softmax(0)
            r = {**r, "prediction": spec["labels"][int(probs.argmax())],
                 "probabilities": {name: round(float(p), 6) for name, p in zip(spec["labels"], probs)}}
        lines.append(json.dumps(r, ensure_ascii=False))
    atomic_write(dest, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} predictions to {dest}")



def load_base():
    """The pretrained model the setting `model` names (checkpoint.open_model): (gpt, tokenizer,
    description, base), base being how a LoRA checkpoint finds it again: the absolute path of the file
    or Hugging Face directory read (a run's best.pt by its file name), or a hub name."""
    try:
        opened = checkpoint.open_model(model)
    except ValueError as e:
        raise UserError(f"model={model!r}: {e}")
    base = os.path.abspath(opened.path) if os.path.exists(opened.path) else opened.path
    return opened.model, opened.tokenizer, opened.description, base


def transfer(gpt, where):
    """Keep the pretrained gpt's embeddings, final norm and first transfer_layers blocks; start the others
    as a new model of its config would (training.reinit_blocks, seeded by `seed`)."""
    k, L = transfer_layers, gpt.config.n_layer
    if k > L:
        raise UserError(f"transfer_layers={k}, but {where} has {L} blocks; pass 0..{L}, or -1 for the whole model")
    training.reinit_blocks(gpt, k, seed)
    kept = ["token embeddings"] + ["position embeddings"] * (gpt.transformer.wpe is not None) + \
        ["final norm"] * gpt.config.prenorm + ["output layer"] * (not gpt.config.tie_weights)
    say(f"transfer_layers={k}: from {where} the {', '.join(kept)} and the first {k} of {L} blocks; "
        f"{L - k} block(s) initialised fresh (seed {seed})")


def outputs_meaning(spec):
    """What a model's outputs are, in words: a teacher's must be the student's, column for column."""
    if spec["task"] == "multiple_choice":
        return f"multiple_choice over {spec['n_choices']} choices"
    return f"{spec['task']} with regression" if spec["regression"] else \
        f"{spec['task']} into {', '.join(spec['labels'])}"


def open_teacher(spec, tok, T):
    """The fine-tuned model `teacher` names (a finetune.py run or its .pt, read by load_finetuned),
    checked against this run: the same task and labels (or number of choices), the same tokenizer with
    the same task tokens (it reads the student's token ids), a context of at least max_len. Returns
    (TaskModel, path)."""
    try:
        path = teacher if os.path.isfile(teacher) else checkpoint.find(teacher)
        model, teacher_tok, theirs, _ = load_finetuned(path)
    except ValueError as e:
        raise UserError(f"teacher={teacher!r}: {e}") from None
    if outputs_meaning(theirs) != outputs_meaning(spec):
        raise UserError(f"teacher {path} was fine-tuned for {outputs_meaning(theirs)}, this run is "
                        f"{outputs_meaning(spec)}; distil from a teacher of the same task and labels")
    if teacher_tok.dumps() != tok.dumps():
        raise UserError(f"teacher {path} reads the {teacher_tok.name} tokenizer ({teacher_tok.vocab_size} tokens), "
                        f"--model the {tok.name} tokenizer ({tok.vocab_size}); distil from a teacher fine-tuned from "
                        f"a model with the student's tokenizer")
    if model.gpt.config.block_size < T:
        raise UserError(f"teacher {path} has a context of {model.gpt.config.block_size} tokens, shorter than "
                        f"max_len={T}; pass --max_len={model.gpt.config.block_size}")
    return model, path


def load_unlabeled(spec, tok):
    """The inputs of the file `unlabeled` as examples without labels (any label field is ignored)."""
    if not os.path.isfile(unlabeled):
        raise UserError(f"unlabeled={unlabeled!r}: no such file; give a file of inputs (.jsonl, .json, .csv, .tsv)")
    rows = [{k: v for k, v in r.items() if k != spec["label_field"]}
            for r in read_rows(unlabeled, "unlabeled", header, delimiter)]
    exs, n_cut, tokens_cut = make_examples(rows, spec, tok, "unlabeled", need_labels=False)
    say(f"unlabeled: {len(exs):,} inputs" + (f"; {n_cut:,} longer than max_len={spec['max_len']} were cut "
                                            f"({tokens_cut:,} tokens)" if n_cut else ""))
    return exs


def teach(model, path, examples, spec, ctx, dev, rank, world):
    """Put the teacher's outputs (K,) for each example into it as "teacher", in batches of
    micro_batch_size (every rank computes its share and receives the whole, see outputs)."""
    t0 = time.time()
    out = outputs(model.to(dev), examples, spec, micro_batch_size, ctx, dev, rank, world)  # (n, K)
    for ex, o in zip(examples, out):
        ex["teacher"] = o
    y = labels_tensor(examples, spec)
    agree = float((out.argmax(1) == y)[y >= 0].double().mean())  # train's inputs all have labels
    say(f"teacher {path}: outputs for {int((y >= 0).sum()):,} train and {int((y < 0).sum()):,} unlabeled inputs "
        f"in {time.time() - t0:.1f} s; it agrees with {agree:.1%} of the train labels")


def load_task(max_len, base):
    """The task's splits ({split: rows}) and its spec: what the checkpoint records to read inputs and
    labels again (fields, label names, number of choices, max_len, LoRA settings, the base). With no
    val split, val_fraction of train is carved off with the seed: the same rows every run."""
    fields, cfields = split_names(text_fields), split_names(choice_fields)
    if len(fields) != TASKS[task] and not (task == "multiple_choice" and fields):
        raise UserError(f"task={task} reads {TASKS[task]} text field(s), got text_fields={text_fields!r}")
    if label_base not in (0, 1) or (label_base and task != "multiple_choice"):
        raise UserError(f"label_base={label_base}: multiple_choice labels count the choices from 0 or from 1; "
                        f"other tasks' labels are class names")
    if (task == "multiple_choice") != bool(cfields):
        raise UserError("choice_fields names the answers of a multiple_choice task, and only of one")
    splits, class_names = load_splits(data, data_config, label_field)
    if "train" not in splits:
        raise UserError(f"data={data!r} has no train split (it has {', '.join(splits) or 'none'})")
    if "val" not in splits:
        rows = splits["train"][:]  # each keeps its "__row__", so errors still name its line in the file
        random.Random(seed).shuffle(rows)
        n_val = max(1, round(val_fraction * len(rows)))
        if not 0 < val_fraction < 1 or len(rows) - n_val < 1:
            raise UserError(f"no val split, and val_fraction={val_fraction} of {len(rows)} train rows leaves none "
                            f"to train or to validate on; add a val file or change val_fraction")
        splits["val"], splits["train"] = rows[:n_val], rows[n_val:]
        say(f"no val split: {n_val} of the {len(rows)} train rows carved off as val (seed {seed})")
    spec = {"task": task, "text_fields": fields, "choice_fields": cfields, "label_field": label_field,
            "regression": regression, "max_len": max_len, "labels": None, "n_choices": None,
            "context_separator": context_separator, "label_base": label_base,
            "lora": dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=split_names(lora_targets),
                         bits=base_bits, group_size=base_group_size) if lora_rank else None, "base": base}
    check_fields(splits["train"], spec, "train")
    if not regression and task != "multiple_choice":
        spec["labels"] = class_names or label_names(splits["train"], label_field)
        numbers = [float(x) for x in spec["labels"] if is_number(x)]
        if not class_names and len(numbers) == len(spec["labels"]) > 1 and \
                (len(numbers) > 20 or any(x != int(x) for x in numbers)):
            raise UserError(f"'{label_field}' holds {len(numbers)} distinct numbers ({', '.join(spec['labels'][:5])}, "
                            f"...), real values rather than classes: pass --regression=True")
        if len(spec["labels"]) < 2:
            raise UserError(f"train has {len(spec['labels'])} distinct label(s) in '{label_field}'; a classifier needs two")
    if task == "multiple_choice":
        c = splits["train"][0].get(cfields[0])
        spec["n_choices"] = len(c) if len(cfields) == 1 and isinstance(c, (list, tuple)) else len(cfields)
    return splits, spec


def encode(splits, spec, tok):
    """{split: examples} (see make_examples); a test split without labels is counted, not kept."""
    examples = {}
    for split, rows in splits.items():
        labelled = split != "test" or any(not missing(r.get(label_field)) for r in rows)
        exs, n_cut, tokens_cut = make_examples(rows, spec, tok, split, need_labels=labelled)
        if labelled:
            examples[split] = exs
        say(f"{split}: {len(exs):,} examples" + ("" if labelled else " without labels (not scored)") +
            (f"; {n_cut:,} longer than max_len={spec['max_len']} were cut from the end of their longest text "
             f"({tokens_cut:,} tokens in all)" if n_cut else ""))
    return examples


def save_finetuned(model, tok, spec, config, trainable, step, m):
    """Write step's model as out_dir's best.pt (and its one step checkpoint): the trained tensors, the
    head, the tokenizer with its task tokens, and spec with the val metrics m."""
    gpt = model.gpt
    state = training.checkpoint_entries(gpt.config, step, tok, config, head=model.head.state_dict(),
                                        finetune={**spec, "metrics": m})
    if spec["lora"]:  # the trained tensors only; the base is named in spec
        state["adapters"] = {n.removeprefix("gpt."): p.detach() for n, p in trainable if n.startswith("gpt.")}
    else:
        state["model"] = gpt.state_dict()
    return checkpoint.save_step(state, out_dir, is_best=True, keep_last=1)


def main(argv=None):
    config = configure(globals(), argv, renamed={"init_from": ("model", "gpt2")})  # the flag's old name
    for k in ("batch_size", "micro_batch_size", "eval_interval", "log_interval", "epochs"):
        if config[k] < 1:
            raise UserError(f"{k}={config[k]} must be at least 1")
    if task not in TASKS:
        raise UserError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if regression and task == "multiple_choice":
        raise UserError("regression=True applies to classification, entailment and similarity, not multiple_choice")
    if transfer_layers < -1 or (transfer_layers >= 0 and lora_rank):
        raise UserError(f"transfer_layers={transfer_layers}: -1 (the whole model) or k >= 0 blocks, and not with "
                        f"LoRA, which would freeze the fresh blocks at random; drop --lora_rank or --transfer_layers")
    if unlabeled and not teacher:
        raise UserError("unlabeled inputs are labelled by a teacher: add --teacher=RUN, a finetune.py run of the task")
    if teacher and (regression or not 0 <= distill_alpha <= 1 or distill_temperature <= 0):
        raise UserError(f"teacher: distillation learns class or choice probabilities, with 0 <= distill_alpha <= 1 "
                        f"and distill_temperature > 0 (got regression={regression}, distill_alpha={distill_alpha}, "
                        f"distill_temperature={distill_temperature})")
    if base_bits not in (32, 4) or (base_bits == 4 and not lora_rank):
        raise UserError(f"base_bits={base_bits}: 32 (float), or 4 under LoRA adapters (QLoRA): add --lora_rank=8")
    if base_bits == 4 and base_group_size not in quantize.GROUP_SIZES:
        raise UserError(f"base_group_size={base_group_size} is not one of {quantize.GROUP_SIZES}")
    dev, device_type, ptdtype = pick_device(device, dtype)
    if base_bits == 4 and device_type != "cpu":
        raise UserError(f"base_bits=4 runs on the CPU (torch's int4 kernel here is a CPU kernel), not {dev}; add "
                        f"--device=cpu, or fine-tune with base_bits=32")
    ctx = autocast(device_type, ptdtype)
    torch.manual_seed(seed)

    # ---- the jobs that use a fine-tuned model: merge it, or label new inputs ----------------------
    if merge or predict:
        try:
            path = checkpoint.find(out_dir, ckpt)
        except ValueError:
            raise UserError(f"no fine-tuned model {ckpt!r} in {out_dir}/: fine-tune first, or point --out_dir "
                            f"(and --ckpt) at a finetune.py run") from None
        try:
            if merge:
                run_merge(path)
            if predict:
                run_predict(path, dev, ctx)
        except ValueError as e:
            raise UserError(str(e))
        return

    # ---- setup: processes ------------------------------------------------------------------------
    distributed, rank, local_rank, world = process.from_env()
    master = rank == 0
    if batch_size % world:
        raise UserError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
    process.start(dev)
    if not data:
        raise UserError("no data: pass --data=a hub dataset name, a folder of train/val/test files, or a file")
    # rank 0's verdict reaches every rank: a refusal on rank 0 alone would leave the others in a collective
    process.agree(f"{out_dir}/ already holds checkpoints of another run; use a new --out_dir (or delete it)"
                  if master and checkpoint.step_checkpoints(out_dir) else None)

    # ---- the pretrained model, the task's data, and the model made ready for the task ---------------
    gpt, tok, where, base = load_base()
    if transfer_layers >= 0:
        transfer(gpt, where)
    T = max_len or gpt.config.block_size
    if not 8 <= T <= gpt.config.block_size:
        raise UserError(f"max_len={max_len} must be between 8 and the model's block_size {gpt.config.block_size}")
    splits, spec = load_task(T, base)
    spec["base_fingerprint"] = fingerprint(gpt) if lora_rank else None
    torch.manual_seed(seed)  # the same head, task tokens and A matrices on every rank
    training.set_dropout(gpt, dropout)
    try:
        model, tok = build(gpt, tok, spec, head_dropout)
    except ValueError as e:
        raise UserError(str(e))
    teacher_model, teacher_path = open_teacher(spec, tok, T) if teacher else (None, None)
    examples = encode(splits, spec, tok)
    train_ex = examples["train"]
    if teacher:  # its outputs on every input, once: the soft targets; unlabeled inputs join train
        train_ex = train_ex + (load_unlabeled(spec, tok) if unlabeled else [])
        teach(teacher_model, teacher_path, train_ex, spec, ctx, dev, rank, world)
        del teacher_model  # not needed again: free its memory for the student
    steps_per_epoch = len(train_ex) // batch_size
    if steps_per_epoch < 1:
        raise UserError(f"train has {len(train_ex)} examples, fewer than batch_size={batch_size}; lower --batch_size")
    total = max_iters or epochs * steps_per_epoch
    goal = main_metric(spec)
    higher = goal != "loss"

    # ---- optimizer, and the run directory -----------------------------------------------------------
    model.to(dev)
    torch.manual_seed(seed + rank)  # dropout masks differ between ranks
    optimizers = training.configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), eps, device_type)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    # lm_coef = 0 with an untied head leaves lm_head unused, which DDP must be told
    wrapped = training.wrap_ddp(model, local_rank, device_type, find_unused=lm_coef == 0) if distributed else model
    if master:
        os.makedirs(out_dir, exist_ok=True)
    process.check_shared(out_dir)  # every rank reads best.pt back at the end: refuse an unshared out_dir now
    if master:
        log = process.Log(os.path.join(out_dir, "log.jsonl"), total)
        training.print_config(config)
        print(f"model: {where}, {tok.name} tokenizer + {', '.join(SPECIAL)} at ids {spec['special']}")
        print(f"{'LoRA rank ' + str(lora_rank) if lora_rank else 'full fine-tuning'}: {n_train:,} of {n_all:,} "
              f"parameters train ({n_train / n_all:.2%})")
        print(f"{total} steps of {batch_size} examples ({steps_per_epoch} per epoch), val metric {goal}")

    # ---- the loop: shuffled epochs, each rank its share of every batch -----------------------------
    per_rank = batch_size // world
    step, best, evals_since_best, t0, t_start = 0, None, 0, time.time(), time.time()
    sums = torch.zeros(3, device=dev)  # L, task, LM: summed on the device between log lines
    warmup_iters = round(warmup_frac * total)
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        at = (step % steps_per_epoch) * batch_size
        batch = [train_ex[i] for i in order[at:at + batch_size][rank::world]]
        lr = training.get_lr(step, warmup_iters, total, learning_rate, 0.0, decay="linear")  # to 0 at the end (GPT-1)
        training.set_lr(optimizers, lr)
        chunks = [batch[i:i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]
        for j, chunk in enumerate(chunks):
            y = labels_tensor(chunk, spec).to(dev)
            soft = torch.stack([ex["teacher"] for ex in chunk]).to(dev) if teacher else None  # (B, K)
            with wrapped.no_sync() if distributed and j < len(chunks) - 1 else nullcontext():
                with ctx:
                    loss, task_sum, lm_sum = objective(wrapped, collate(chunk, spec["special"], dev), y, spec, lm_coef,
                                                       soft)
                scaler.scale(loss / per_rank).backward()  # / per_rank: the batch mean (DDP averages ranks)
            sums += torch.stack([loss.detach(), task_sum.detach(), lm_sum.detach()]).float()
        training.optimizer_step(optimizers, scaler, model.parameters(), grad_clip)
        step += 1

        if step % log_interval == 0 or step == total:
            if distributed:
                dist.all_reduce(sums)
            n = (step - 1) % log_interval + 1  # steps since the last log line
            L, tl, ll = (sums / (n * batch_size)).tolist()
            dt = (time.time() - t0) / n
            if master:
                log({"step": step, "epoch": step // steps_per_epoch + (step % steps_per_epoch > 0),
                     "loss": L, "task_loss": tl, "lm_loss": ll, "lr": lr, "ms_per_step": 1000 * dt,
                     "examples_per_s": batch_size / dt,
                     "eta": process.duration((total - step) * (time.time() - t_start) / step)})
            training.stop_if_not_finite(L, "the loss", step, out_dir)
            sums.zero_()
            t0 = time.time()
        if step % eval_interval == 0 or step == total:
            t_eval = time.time()
            m = score(model, examples["val"], spec, ctx, dev, rank, world)
            value = m[goal]
            improved = best is None or (value > best if higher else value < best)
            best, evals_since_best = (value, 0) if improved else (best, evals_since_best + 1)
            if master:
                log({"step": step, **{f"val_{k}": v for k, v in m.items()}, "best": best}, prefix="eval ")
                if improved:
                    print(f"saved {save_finetuned(model, tok, spec, config, trainable, step, m)} (best val {goal} "
                          f"so far)", flush=True)
            if improved:  # the others wait on the CPU, not in the next step's all-reduce (process.py)
                process.wait_for_rank0()
            model.train()
            if patience and evals_since_best >= patience:
                say(f"early stop at step {step}: {patience} evaluations without a better val {goal}")
                break
            t0 += time.time() - t_eval  # evaluating and saving do not count against the step time

    # ---- the best model, reloaded from disk: its val and test scores --------------------------------
    opt_bytes = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t))
    peak, what = peak_memory(device_type)
    process.wait_for_rank0()  # rank 0 has written best.pt
    best_path = os.path.join(out_dir, "best.pt")
    model, _, _, state = load_finetuned(best_path)
    model.to(dev)
    results = {"best_step": state["iter_num"], "trainable_params": n_train, "optimizer_state_bytes": opt_bytes,
               "peak_memory_bytes": peak, "train_seconds": time.time() - t_start,
               "block_weight_bytes": sum(quantize.weight_bytes(b) for b in model.gpt.transformer.h)}
    for split in ("val", "test"):
        if split in examples:
            results[split] = score(model, examples[split], spec, ctx, dev, rank, world)
    if master:
        print(f"best checkpoint {best_path} (step {results['best_step']}): "
              + "; ".join(f"{s} {show(results[s])}" for s in ("val", "test") if s in results))
        if "test" not in results:
            print("test: none with labels, so not scored")
        print(f"memory: {n_train:,} trainable parameters, optimizer state {opt_bytes / 2**20:,.1f} MiB, "
              f"peak {what} {peak / 2**20:,.0f} MiB")
        log.write({"final": results})
        log.file.close()
    process.leave_together()
    return results


if __name__ == "__main__":
    run(main)
