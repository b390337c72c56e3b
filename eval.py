"""
eval.py: measure a model the way the field does: perplexity and bits per byte on text, zero-shot
multiple choice (HellaSwag, ARC/PIQA/COPA-style sets), LAMBADA, GPT-1's zero-shot classification, and
completions to read.

    python eval.py --model=out-quickstart                             # val shards: ppl, bits/byte
    python eval.py --model=out-quickstart --task=ppl --data=notes.txt --stride=64
    python eval.py --model=gpt2 --task=hellaswag                      # Rowan/hellaswag, 10,042 items
    python eval.py --model=out --task=mc --data=arc_easy.jsonl        # {"query", "choices", "gold"}
    python eval.py --model=gpt2 --task=lambada --prompts=prompts.txt  # + completions beside the numbers
    python eval.py --model=out --task=zeroshot --data=sst2/test.jsonl --text_field=sentence  # " very" positive?

Any model checkpoint.open_model takes: a train.py or finetune.py run, a checkpoint file, GPT-2's
weights, or a Hugging Face directory written by export.py. The numbers go to one results JSON (model,
data, metric, value, count and the command; eval_<task>.json in the run directory by default), which
export.py puts in the model card, and to a table on stdout with reference values where known.

Perplexity. Documents are scored separately, each after <|endoftext|> (the boundary every document
follows in the shards), every token exactly once. A document longer than the context is read through
a sliding window: the window moves `stride` tokens at a time and scores only the tokens the previous
window did not, so each of them has at least window - stride tokens of context; the last window is a
full one ending at the last token (as lm-evaluation-harness does), and stride = window gives plain
chunks. Reported: tokens, bytes, nats per token, perplexity = exp(nats per token), and bits per byte
= nats / ln 2 / bytes, which does not depend on the tokenizer, so models with different vocabularies
compare.

Multiple choice, as lm-evaluation-harness scores it, so the numbers agree with it exactly (a test
checks this against lm-eval itself on an exported model). Each choice is a continuation of the query,
after target_delimiter (" "); its score is the summed log-probability of its tokens. Tokenization:
trailing whitespace of the query moves into the continuation; query + continuation is encoded as a
whole, the query alone, and the continuation is the tail of the whole (so the tokens at the seam are
those the model would see); an empty query starts from <|endoftext|>; inputs longer than the context
keep their last tokens. acc picks the choice with the largest sum; acc_norm divides each sum by the
choice's length in characters (Python len, without the delimiter), which removes the bias towards
short answers. HellaSwag items get lm-eval's preprocessing (activity label, ctx_a + capitalised
ctx_b, "[title]" -> ". ", bracketed tags removed). Home-made scorers differ from lm-eval by tokenizing
query and choice apart, by normalising by tokens, or by adding a BOS: each moves the numbers.
LAMBADA (the OpenAI version lm-eval calls lambada_openai): the last word after a space is the
continuation; acc counts items whose every token is the greedy choice, perplexity is exp(-mean
log-likelihood of the word).

Zero-shot classification, GPT-1's heuristic (Radford et al. 2018, §5): "For SST-2 we append the token
very to each example and restrict the language model's output distribution to only the words positive
and negative and guess the token it assigns higher probability to." Each labelled row becomes a
multiple-choice item, scored as above: the query is its text + suffix (" very"), the choices are the
verbalizers (" negative", " positive" after the delimiter), and acc picks the larger summed
log-probability. Label i (an integer, or the i-th of the file's sorted label names) is verbalizer i.
Chance is 1 / the number of verbalizers; the majority-class rate is what always guessing the commonest
label would score.
"""
import glob
import json
import math
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import numpy as np
import torch

from atomic import atomic_write
from bpe import Tokenizer
from checkpoint import OLD_MODEL_FLAGS, open_model
from configurator import UserError, check_hub, configure, run
from decode import generate, sampling_problem
from device import autocast, for_inference, pick_device
import quantize as q
from quantize import MODES
from rows import read_rows
from score import bits_per_byte, pad_right, target_log_probs
from shards import read_shard

# ---- settings (override with a config file and/or --key=value) -----------------------------------
model = "out"              # a run directory (train.py's default out_dir) | a .pt file | 'gpt2', 'gpt2-medium',
                           # ... | a Hugging Face directory (export.py's): the same in sample, eval, export, serve
ckpt = "best"              # in a run directory: 'best' (lowest val loss) | 'last' (newest) | a file name in it
task = "ppl"               # 'ppl' | 'hellaswag' | 'mc' | 'lambada' | 'zeroshot' | 'none' (only the completions
                           # of `prompts`)
data = ""                  # ppl: "" = the run's val shards, or data/<name>, *.bin, a .txt file (glob: one document
                           # each), .jsonl/.parquet (one per row); hellaswag: "" = the hub's Rowan/hellaswag
                           # validation, or a local jsonl in its format; mc: a jsonl of {"query", "choices",
                           # "gold"}; lambada: "" = the hub's EleutherAI/lambada_openai test, or a jsonl of {"text"};
                           # zeroshot: a labelled .jsonl/.csv/.tsv (text_field, label_field)
text_field = "text"        # ppl on .jsonl/.parquet, zeroshot: the column holding each document
label_field = "label"      # zeroshot: the column holding the label (an id from 0, or a name)
suffix = " very"           # zeroshot: appended to each text (GPT-1 §5)
verbalizers = "negative,positive"  # zeroshot: the word for each label, in label order, comma-separated
data_dir = "data"          # where train.py's prepared datasets live: data/<dataset>/ for the val shards
limit = 0                  # only the first N documents or items (0 = all): a quick look
window = 0                 # context each prediction may see, in tokens; 0 = the model's block_size
stride = 0                 # ppl: tokens the window moves per step; 0 = window // 2 (smaller: more context, slower)
batch_size = 8             # sequences per forward pass
target_delimiter = " "     # mc/hellaswag: between query and choice (lm-evaluation-harness's default)
prompts = ""               # a file of prompts to complete (one per line, or .jsonl {"prompt"}); any task
max_new_tokens = 64        # prompts: tokens to generate for each
temperature = 0.0          # 0 = greedy: the same completions every run
top_k = None               # prompts: sample from the k likeliest tokens only; None = all
seed = 1337                # prompts: the sampling seed (with temperature > 0)
quantize = "none"          # 'none' | 'int8' | 'int4' | 'int4-gptq': also score the quantized model (quantize.py, CPU)
                           # and report what it costs; int4-gptq calibrates on train shards (calibration_data)
group_size = 128           # int4: weights per scale and zero (32, 64, 128 or 256)
calibration_data = ""      # int4-gptq: a prepared dataset folder (data/<name>); "" = the run's own train shards
save_quantized = ""        # a file to keep the quantized model in: --model=FILE reads it back, calibration done
out = ""                   # results JSON; "" = eval_<task>.json in the run directory (here for other models)
device = "auto"            # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"             # 'auto' = bfloat16 on GPUs that have it, float32 on CPU | 'float32' | ...
# --------------------------------------------------------------------------------------------------

TASKS = ("ppl", "hellaswag", "mc", "lambada", "zeroshot", "none")
HUB = {"hellaswag": ("Rowan/hellaswag", None, "validation"),  # (name, config, split), as lm-eval loads them
       "lambada": ("EleutherAI/lambada_openai", "default", "test")}
# Published results to print beside ours: GPT-2 124M under lm-evaluation-harness's protocol, which is
# ours. (llm.c's "completion style" HellaSwag, normalised by tokens, gives acc_norm 0.2955: another metric.)
REFERENCES = {
    ("hellaswag", "acc"): (0.2892, "GPT-2 124M, lm-eval (llm.c dev/data/hellaswag.py)"),
    ("hellaswag", "acc_norm"): (0.3114, "GPT-2 124M, lm-eval (llm.c dev/data/hellaswag.py)"),
    ("lambada", "acc"): (0.3256, "GPT-2 124M, lm-eval lambada_openai (lm-eval #2159)"),
    ("lambada", "perplexity"): (40.0554, "GPT-2 124M, lm-eval lambada_openai (lm-eval #2159)"),
}


# ---- scoring: the one loop every task goes through ----------------------------------------------------

@torch.no_grad()
def score(model, rows, batch_size, ctx=None, device="cpu", desc="scoring"):
    """rows: (tokens, k) pairs: the model reads tokens[:-1], and the last k next-token predictions are
    scored. Returns one (sum of log-probabilities, every scored token greedy?) per row, in order.
    Rows run longest first (less padding; a progress bar with an ETA on stderr). Only the scored
    positions go through the head: the (T, vocab) logits of a long row are never materialised."""
    from tqdm import tqdm
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="seq", file=sys.stderr, disable=len(rows) < 2 * batch_size,
               mininterval=2)
    for b in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[b:b + batch_size]]
        x = pad_right([tokens[:-1] for tokens, _ in batch])  # (B, T), right-padded: see score.py
        r, c, y = [], [], []
        for j, (tokens, k) in enumerate(batch):
            n = len(tokens) - 1
            r += [j] * k
            c += range(n - k, n)
            y += [int(t) for t in tokens[n - k + 1:]]
        with ctx if ctx is not None else nullcontext():
            h = model.hidden_states(x.to(device))  # (B, T, C)
            hs = h[torch.tensor(r, device=device), torch.tensor(c, device=device)]  # (N, C) scored positions
            logp, greedy = target_log_probs(model, hs, torch.tensor(y, device=device))
        logp, greedy = logp.cpu(), greedy.cpu()
        at = 0
        for j, (_, k) in enumerate(batch):  # float32 sums, as lm-eval sums its log-probabilities
            out[order[b + j]] = (float(logp[at:at + k].sum()), bool(greedy[at:at + k].all()))
            at += k
        bar.update(len(batch))
    bar.close()
    return out


# ---- perplexity ---------------------------------------------------------------------------------------

def windows(n, window, stride):
    """The sliding window over a document of n tokens after its prefix token: positions 0..n, of which
    1..n are predicted. Yields (start, end, first): the model reads positions start..end-1 and the
    predictions of positions first..end are scored. Every position 1..n is scored exactly once, with
    at least window - stride tokens before it (or all there are); the last window is a full one."""
    done = 0
    while done < n:
        end = min(done + stride if done else window, n)
        yield max(0, end - window), end, done + 1
        done = end


def perplexity(model, docs, token_bytes, prefix, window, stride, batch_size, ctx=None, device="cpu"):
    """docs: token lists, scored separately, each after the prefix token(s). token_bytes[id]: the UTF-8
    bytes an id spells. Returns the totals and the derived figures."""
    rows, ntok, nbytes, token_bytes = [], 0, 0, np.asarray(token_bytes)
    for doc in docs:
        seq = np.concatenate([np.asarray(prefix, dtype=np.int64), np.asarray(doc, dtype=np.int64)])
        scored = len(seq) - 1  # every token after the prefix (without one, the first has no context)
        for start, end, first in windows(scored, window, stride):
            rows.append((seq[start:end + 1], end - first + 1))  # views, not copies: val sets can be large
        ntok += scored
        nbytes += int(token_bytes[seq[1:]].sum())
    nats = -sum(lp for lp, _ in score(model, rows, batch_size, ctx, device, "perplexity"))
    per_token = nats / max(ntok, 1)
    return {"documents": len(docs), "windows": len(rows), "tokens": ntok, "bytes": nbytes,
            "nats_per_token": per_token, "perplexity": math.exp(per_token),
            "bits_per_byte": bits_per_byte(nats, max(nbytes, 1))}


def text_documents(path, field):
    """Documents from .txt files (a glob; one document per file) or the rows of .jsonl/.json/.parquet."""
    files = sorted(glob.glob(path))
    if not files:
        raise UserError(f"data={path!r} matches no file; pass a text file, a .jsonl/.parquet, data/<name> or *.bin")
    for f in files:
        if f.endswith((".jsonl", ".json")):
            with open(f, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        elif f.endswith(".parquet"):
            import pyarrow.parquet as pq  # comes with datasets
            rows = pq.read_table(f, columns=[field]).to_pylist()
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()
            continue
        for i, r in enumerate(rows):
            if not isinstance(r.get(field), str):
                raise UserError(f"{f} row {i + 1} has no text in field '{field}'; set --text_field")
            yield r[field]


def shard_documents(files, eot):
    """The documents of token shards: every document follows an <|endoftext|>, so cut there."""
    tokens = np.concatenate([read_shard(f) for f in files]).astype(np.int64)
    cuts = np.flatnonzero(tokens == eot)
    bounds = [*cuts.tolist(), len(tokens)]
    docs = [tokens[a + 1:b] for a, b in zip(bounds, bounds[1:]) if b > a + 1]
    if len(tokens) and (not len(cuts) or cuts[0] > 0):
        docs.insert(0, tokens[:bounds[0]])  # a head before the first <|endoftext|>
    return docs


# ---- multiple choice and LAMBADA ------------------------------------------------------------------------

def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness splits them (see the docstring).
    Special-token text is a special token, as in the Hugging Face tokenizer lm-eval runs."""
    enc = lambda s: tok.encode(s, allowed_special="all")  # noqa: E731
    if context == "":
        cont = enc(continuation)
        return ([tok.eot_token], cont) if cont[:1] != [tok.eot_token] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def loglikelihoods(model, tok, pairs, window, batch_size, ctx=None, device="cpu", desc="choices"):
    """(context, continuation) strings -> (log-likelihood of the continuation, greedy?) each."""
    rows = []
    for context, continuation in pairs:
        c, k = encode_pair(tok, context, continuation)
        if not k or len(k) > window:
            raise UserError(f"continuation {continuation[:60]!r} is {len(k)} tokens; it must be 1..{window}")
        rows.append(((c + k)[-(window + 1):], len(k)))  # keep the last window + 1 tokens, as lm-eval
    return score(model, rows, batch_size, ctx, device, desc)


def hellaswag_item(doc):
    """A HellaSwag row (hub or original jsonl) -> {"query", "choices", "gold"}, lm-eval's preprocessing."""
    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")  # WikiHow's bracketed tags
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": clean(doc["activity_label"] + ": " + ctx), "choices": [clean(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


def multiple_choice(model, tok, items, window, batch_size, delimiter=" ", ctx=None, device="cpu"):
    """items: {"query", "choices", "gold"}. Returns (metrics, per-item records)."""
    pairs = [(it["query"], delimiter + ch) for it in items for ch in it["choices"]]
    lls = iter(loglikelihoods(model, tok, pairs, window, batch_size, ctx, device, "choices"))
    acc = acc_norm = chance = 0.0
    records = []
    for it in items:
        ll = [next(lls)[0] for _ in it["choices"]]
        pred = int(np.argmax(ll))  # the first of equal maxima, as numpy's argmax in lm-eval
        pred_norm = int(np.argmax(np.array(ll) / np.array([float(len(ch)) for ch in it["choices"]])))
        acc += pred == it["gold"]
        acc_norm += pred_norm == it["gold"]
        chance += 1 / len(it["choices"])
        records.append({"gold": it["gold"], "loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm})
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "chance": chance / n}, records


def lambada(model, tok, texts, window, batch_size, ctx=None, device="cpu"):
    """LAMBADA: predict each passage's last word. Returns (metrics, per-item records)."""
    pairs = [(" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]) for t in texts]
    res = loglikelihoods(model, tok, pairs, window, batch_size, ctx, device, "lambada")
    n = max(len(res), 1)
    return ({"acc": sum(g for _, g in res) / n, "perplexity": math.exp(-sum(ll for ll, _ in res) / n)},
            [{"loglikelihood": ll, "greedy": g} for ll, g in res])


def zeroshot_items(rows):
    """Labelled rows -> multiple-choice items (see the docstring): query = text + suffix, choices = the
    verbalizers, gold = the label's number: an integer label as it is, a name by its place among the sorted
    names in the file."""
    words = [w.strip() for w in verbalizers.split(",")]
    if len(words) < 2 or not all(words):
        raise UserError(f"verbalizers={verbalizers!r}: give a word per label, comma-separated, e.g. negative,positive")
    for i, r in enumerate(rows):
        if not (isinstance(r.get(text_field), str) and r.get(label_field) not in (None, "")):
            raise UserError(f"{data} row {i + 1} has no text in '{text_field}' or no label in '{label_field}'; "
                            f"set --text_field and --label_field")
    labels = [str(r[label_field]).strip() for r in rows]
    names = sorted(set(labels))
    gold = [int(x) for x in labels] if all(x.isdigit() for x in labels) else [names.index(x) for x in labels]
    if gold and max(gold) >= len(words):
        raise UserError(f"{data}: labels {', '.join(names[:5])} need {max(gold) + 1} verbalizers, and "
                        f"verbalizers={verbalizers!r} has {len(words)}; give one word per label")
    return [{"query": r[text_field] + suffix, "choices": words, "gold": g} for r, g in zip(rows, gold)]


def hub_rows(name, config, split):
    """A hub dataset split's rows, through datasets (the one place eval.py needs the network)."""
    if not any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                        "HF_DATASETS_OFFLINE")):
        # datasets retries for half a minute, a line per try: a 5 s probe fails fast instead
        check_hub(f"pass --data=FILE.jsonl in {name}'s format, or set HF_HUB_OFFLINE=1 to read a copy datasets "
                  f"has cached")
    try:
        import datasets
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, renamed, a proxy: one line, with the way round it
        raise UserError(f"could not load {name} ({split}) from the Hugging Face hub ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); check the network, or pass --data=FILE.jsonl "
                        f"in its format") from None


# ---- the script ----------------------------------------------------------------------------------------

def main(argv=None):
    configure(globals(), argv, renamed=OLD_MODEL_FLAGS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if task not in TASKS:
        raise UserError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if batch_size < 1 or limit < 0 or window < 0 or stride < 0 or max_new_tokens < 1:
        raise UserError(f"need batch_size >= 1, max_new_tokens >= 1 and limit, window, stride >= 0; got "
                        f"batch_size={batch_size}, max_new_tokens={max_new_tokens}, limit={limit}, window={window}, "
                        f"stride={stride}")
    if problem := sampling_problem(temperature, top_k, None):  # before the scoring, not after it
        raise UserError(problem[1])
    if task == "mc" and not data:
        raise UserError("task=mc needs --data=FILE.jsonl, one {\"query\", \"choices\", \"gold\"} per line")
    if task == "zeroshot" and not data:
        raise UserError("task=zeroshot needs --data=FILE (.jsonl, .csv or .tsv) with a text and a label column "
                        "(--text_field, --label_field)")
    if task == "none" and not prompts:
        raise UserError("task=none only writes completions: pass --prompts=FILE")
    if quantize not in MODES:
        raise UserError(f"quantize={quantize!r} is not one of {', '.join(map(repr, MODES))}")
    dev, device_type, ptdtype = pick_device(device, dtype)
    ctx = autocast(device_type, ptdtype)
    if quantize != "none" and device_type != "cpu":
        raise UserError(f"quantize={quantize} runs on the CPU only (torch's int8 and int4 CPU kernels); add "
                        f"--device=cpu")

    # ---- the model ----------------------------------------------------------------------------------
    opened = open_model(model, ckpt)
    gpt, tok, state = opened.model, opened.tokenizer, opened.state  # state: a checkpoint's run settings and step
    W = window or gpt.config.block_size
    if W > gpt.config.block_size:
        raise UserError(f"window={W} is longer than the model's context {gpt.config.block_size}")
    S = stride or max(1, W // 2)
    if S > W:
        raise UserError(f"stride={S} is larger than the window {W}: tokens would be skipped; use stride <= window")
    gpt = for_inference(gpt, dev, device_type, ptdtype)
    dest = out or os.path.join(opened.run_dir or ".", f"eval_{task}{'_' + _stem(data) if data else ''}.json")

    # ---- the data -----------------------------------------------------------------------------------
    docs = items = label = dataset = None
    if task == "ppl":
        docs, label, dataset = ppl_data(tok, state)
        docs = docs[:limit] if limit else docs
    elif task != "none":
        items, label, dataset = task_items()
    if task != "none" and not (docs if task == "ppl" else items):
        raise UserError(f"{label}: no documents or items to score")

    # ---- scoring ------------------------------------------------------------------------------------
    print(f"evaluating {opened.description}: {gpt.num_params(non_embedding=False) / 1e6:.2f}M parameters, {tok.name} "
          f"tokenizer, on {dev} in {str(ptdtype).removeprefix('torch.')}", file=sys.stderr)

    def evaluate(m):
        if task == "ppl":
            prefix = [tok.eot_token] if "<|endoftext|>" in tok.special_tokens else []
            return perplexity(m, docs, tok.token_byte_lengths(), prefix, W, S, batch_size, ctx, dev), None
        if task == "lambada":
            return lambada(m, tok, items, W, batch_size, ctx, dev)
        if task in ("hellaswag", "mc", "zeroshot"):
            return multiple_choice(m, tok, items, W, batch_size, target_delimiter, ctx, dev)
        return {}, None

    t0 = time.time()
    metrics, records = evaluate(gpt)
    seconds = time.time() - t0
    if task == "zeroshot":  # what always guessing the commonest label scores
        metrics["majority"] = float(np.bincount([it["gold"] for it in items]).max() / len(items))
    n = metrics.get("tokens") if task == "ppl" else len(items or [])
    shown = {"ppl": ("perplexity", "bits_per_byte", "nats_per_token"), "lambada": ("acc", "perplexity"),
             "hellaswag": ("acc", "acc_norm"), "mc": ("acc", "acc_norm"), "zeroshot": ("acc",), "none": ()}[task]
    results = [{"metric": k, "value": metrics[k], "count": n} for k in shown]
    if quantize != "none":
        quantized = quantized_model(gpt, tok, state, W)
        qm, _ = evaluate(quantized)
        results += [{"metric": f"{k} ({quantize})", "value": qm[k], "count": n, "change": qm[k] - metrics[k]}
                    for k in shown]
        metrics.update({"weight_bytes": q.weight_bytes(gpt), f"weight_bytes_{quantize}": q.weight_bytes(quantized)})

    # ---- completions --------------------------------------------------------------------------------
    completions = []
    if prompts:
        torch.manual_seed(seed)
        for p in read_prompts(prompts):
            ids = tok.encode(p, allowed_special="all") if p else [tok.eot_token]  # "" starts a document
            ids = ids[-(gpt.config.block_size - 1):]
            with ctx:
                y = generate(gpt, torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k,
                             eos_token=tok.eot_token)[0, len(ids):].tolist()
            y = y[:y.index(tok.eot_token)] if tok.eot_token in y else y
            completions.append({"prompt": p, "completion": tok.decode(y)})

    # ---- report -------------------------------------------------------------------------------------
    # published figures, beside ours only where the data is the benchmark itself (the hub's split)
    refs = {m: ref for (t, m), ref in REFERENCES.items() if t == task and not data}
    report = {
        "model": opened.description, "source": opened.path, "step": state.get("iter_num") if state else None,
        "task": task, "data": label, "dataset": dataset, "results": results,
        "details": {k: v for k, v in metrics.items() if k not in shown},
        "references": [{"metric": m, "value": v, "source": s} for m, (v, s) in refs.items()],
        "settings": {"window": W, "stride": S if task == "ppl" else None, "limit": limit, "device": dev,
                     "target_delimiter": target_delimiter, "dtype": str(ptdtype).removeprefix("torch.")},
        "command": shlex.join(["python", "eval.py", *argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "items": records,  # per item: the log-likelihood of every choice, as lm-eval logs its samples
        "completions": completions}
    atomic_write(dest, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if results:
        print(f"{'task':<10} {'data':<34} {'metric':<22} {'value':>10} {'count':>10}  reference")
        for r in results:
            print(f"{task:<10} {label[-34:]:<34} {r['metric']:<22} {r['value']:>10.4f} {r['count']:>10,}  "
                  f"{'%g %s' % refs[r['metric']] if r['metric'] in refs else ''}")
        for k in ("chance", "majority") if task in ("hellaswag", "mc", "zeroshot") else ():
            if k in metrics:
                print(f"{'':<10} {'':<34} {k:<22} {metrics[k]:>10.4f}")
    for c in completions:
        print(f"--- {c['prompt']!r}\n{c['prompt']}{c['completion']}")
    print(f"wrote {dest} ({seconds:.1f}s)", file=sys.stderr)
    return report


def quantized_model(gpt, tok, state, window):
    """The model in `quantize`'s weights, saved to save_quantized if asked. int4-gptq calibrates on
    calibration rows of a prepared dataset's train shards: the run's own unless calibration_data names one."""
    if getattr(gpt, "quantization", None):
        raise UserError(f"--model is already quantized ({gpt.quantization['mode']}); drop --quantize")
    calibration = None
    if quantize == "int4-gptq":
        folder = calibration_data or (os.path.join(data_dir, state["config"]["dataset"]) if state else "")
        if not folder:
            raise UserError("quantize=int4-gptq calibrates on train shards: pass --calibration_data=data/<name> "
                            "(a folder prepare.py wrote)")
        print(f"GPTQ: calibrating on {folder}", file=sys.stderr)
        calibration = q.calibration_rows(folder, T=min(window, 512))
    try:
        quantized = q.quantize(gpt, quantize, calibration, group_size)
    except ValueError as e:
        raise UserError(str(e))
    if save_quantized:
        q.save_quantized(quantized, save_quantized, tok)
        print(f"wrote {save_quantized} ({quantize}): read it back with --model={save_quantized}", file=sys.stderr)
    return quantized


def task_items():
    """(items, label, dataset card fields) for hellaswag, lambada, mc and zeroshot: a local file, or the hub."""
    local = {"type": "local", "name": os.path.basename(data), "split": "local file"}
    if task == "zeroshot":
        return zeroshot_items(read_rows(data, "zeroshot")[:limit or None]), data, local
    if task == "mc":
        items = read_rows(data, "mc")[:limit or None]
        for it in items:
            ok = isinstance(it.get("query"), str) and isinstance(it.get("choices"), list) \
                and len(it["choices"]) >= 2 and all(isinstance(c, str) for c in it["choices"]) \
                and isinstance(it.get("gold"), int) and 0 <= it["gold"] < len(it["choices"])
            if not ok:
                raise UserError(f"{it['__row__']}: an item is {{\"query\": str, \"choices\": [2+ str], "
                                f"\"gold\": index of the right choice}}")
        return items, data, local
    hub, hub_config, split = HUB[task]
    rows = read_rows(data, task) if data else hub_rows(hub, hub_config, split)
    rows = rows[:limit] if limit else rows
    label = data or f"{hub} ({split})"
    name = {"hellaswag": "HellaSwag", "lambada": "LAMBADA (OpenAI)"}[task]
    # a local file is named as itself, not as the benchmark whose format it has
    dataset = local if data else \
        {"type": hub, "name": name, **({"config": hub_config} if hub_config else {}), "split": split}
    try:
        items = [hellaswag_item(r) for r in rows] if task == "hellaswag" else [r["text"] for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{label}: a row lacks {e} (or has a bad value); {task} rows need "
                        + ("ctx_a, ctx_b, activity_label, endings and label" if task == "hellaswag" else "text"))
    return items, label, dataset


def ppl_data(tok, state):
    """(documents as token lists, label, dataset card fields) for task=ppl."""
    src = data
    if not src:
        if not state or not state.get("config", {}).get("dataset"):
            raise UserError("this model has no run settings naming its dataset: pass --data=a text file, a "
                            ".jsonl/.parquet, data/<name> (prepared val shards) or *.bin")
        src = os.path.join(data_dir, state["config"]["dataset"])
    if os.path.isdir(src) or src.endswith(".bin"):
        files = sorted(glob.glob(os.path.join(src, "*_val_*.bin"))) if os.path.isdir(src) else sorted(glob.glob(src))
        if not files:
            raise UserError(f"no val shards (*_val_*.bin) in {src}/; prepare the data (prepare.py) or pass a text file")
        bpe = os.path.join(os.path.dirname(files[0]), "tokenizer.bpe")
        try:
            theirs = Tokenizer.load(bpe) if os.path.exists(bpe) else tok
            docs = shard_documents(files, tok.eot_token)
        except ValueError as e:
            raise UserError(str(e))
        same = (theirs.merges, theirs.pattern, theirs.name if theirs.merges is None else "") == \
            (tok.merges, tok.pattern, tok.name if tok.merges is None else "")  # a fine-tuned model may add specials
        if not same or any(tok.special_tokens.get(s) != i for s, i in theirs.special_tokens.items()):
            raise UserError(f"{files[0]} was tokenized with {bpe}, which is not this model's tokenizer ({tok.name}); "
                            f"score the text itself (a .txt or .jsonl) instead")
        if any(len(d) and d.max() >= tok.vocab_size for d in docs):
            raise UserError(f"{files[0]} holds token ids outside this model's vocabulary ({tok.vocab_size})")
        name = os.path.basename(os.path.dirname(os.path.abspath(files[0])))
        return docs, f"{src} (val shards)", {"type": name, "name": f"{name} val shards", "split": "val"}
    if src.lower().endswith((".csv", ".tsv")):  # read as text it would score its commas and header
        raise UserError(f"task=ppl scores documents from .txt, .jsonl or .parquet files, not a table ({src}); "
                        f"write its text column as .jsonl ({{\"text\": ...}} per line) and pass that")
    docs = tok.encode_batch(list(text_documents(src, text_field)))
    return docs, src, {"type": "local", "name": os.path.basename(src), "split": "local file"}


def read_prompts(path):
    """Prompts from a .jsonl of {"prompt"} or a text file, one prompt per line."""
    if path.endswith(".jsonl"):
        return [r.get("prompt", "") for r in read_rows(path, "prompts")]
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read prompts file {path}: {e.strerror}")


def _stem(path):
    """A file-name-safe short name for a data path."""
    base = os.path.basename(os.path.normpath(path)).split(".")[0] or "data"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base)


if __name__ == "__main__":
    run(main)
