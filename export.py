"""
export.py: publish a trained model in the Hugging Face format, with a model card that says what it
was trained on, and optionally push it to the hub.

    python export.py --model=out-quickstart                         # -> out-quickstart-hf/
    python export.py --model=out-quickstart --push_to_hub=me/quickstart --dry_run=True
    python export.py --model=out-quickstart --push_to_hub=me/quickstart --license_id=mit

The directory loads with transformers and no custom code (AutoModelForCausalLM, AutoTokenizer):
  model.safetensors, config.json, generation_config.json  the gpt2 preset as GPT2LMHeadModel, the
                                        modern one as LlamaForCausalLM, gpt1 as OpenAIGPTLMHeadModel;
                                        hf.py maps the tensors and says why each mapping is exact
  tokenizer.json, tokenizer_config.json our BPE: our regex, our merges in trained order, the special
                                        tokens; GPT-2's vocabulary also as GPT-2's vocab.json, merges.txt
  tokenizer.bpe                         our own file, so checkpoint.open_model(dir) reads the export back
  README.md                             the model card, from the run's own files only: the checkpoint (its
                                        settings, step), log.jsonl (losses, time), the data card of the
                                        shards (data/<dataset>/card.json) and eval.py's results JSON files
A finetune.py checkpoint exports its GPT as above, and its task head as classifier_head.safetensors +
classifier_head.json (the head reads the final hidden state at the extract token, which no
transformers class does: GPT2ForSequenceClassification reads the last non-pad token, with no bias, and
has no pair or multiple-choice layouts). A LoRA checkpoint holds only adapters: merge it first
(finetune.py --merge=FILE), then export that file. After writing, the export is loaded back with
transformers (if installed) and its logits compared with ours, so a broken export never goes out.
"""
import copy
import glob
import json
import math
import os
import re
import sys
import tempfile
from datetime import datetime, timezone

import torch

import hf
from atomic import atomic_write
from bpe import PATTERNS
from checkpoint import OLD_MODEL_FLAGS, open_model
from configurator import UserError, configure, run

# ---- settings (override with a config file and/or --key=value) -----------------------------------
model = "out"              # a run directory (train.py's default out_dir) | a .pt file (e.g. finetune.py --merge's)
                           # | 'gpt2', ... | a Hugging Face directory: the same in sample, eval, export, serve
ckpt = "best"              # in a run directory: 'best' (lowest val loss) | 'last' (newest) | a file name in it
hf_dir = ""                # the directory to write; "" = <run directory>-hf, or <the source's name>-hf in .
save_dtype = "float32"     # the weights' precision in model.safetensors: 'float32' | 'bfloat16' | 'float16' (half)
results = ""               # eval.py results JSON files for the card (a glob); "" = eval_*.json beside the checkpoint
data_dir = "data"          # where the run's prepared dataset and its data card live (as for train.py)
license_id = ""            # the weights' licence as a hub id ('mit', 'apache-2.0', ...); "" = 'other', undeclared
language = "en"            # the card's language (ISO 639-1), e.g. 'en'
name = ""                  # the model's name in the card; "" = the hub repo's or hf_dir's name
push_to_hub = ""           # 'owner/name': upload the directory to the Hugging Face hub (huggingface_hub)
dry_run = False            # with push_to_hub: list what would be uploaded, upload nothing (works offline)
private = True             # a repo created by the push is private until you make it public
check = True               # load the export with transformers and compare its logits with ours
format = "hf"              # 'hf': a Hugging Face directory | 'gguf': one .gguf file for llama.cpp, in hf_dir
gguf_type = "f16"          # format=gguf: the weights' storage, 'f32' | 'f16' | 'q8_0' | 'q4_0' (blocks of 32)
# --------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMS = {"gpt2": "GPT-2: pre-LayerNorm blocks, learned positions, GELU MLP, tied head",
         "modern": "Llama-style: pre-RMSNorm blocks, rotary positions (RoPE), SwiGLU MLP, no biases",
         "gpt1": "GPT-1: post-LayerNorm blocks, learned positions, GELU MLP, tied head"}
OURS = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.bpe", "vocab.json", "merges.txt", "README.md", "classifier_head.safetensors",
        "classifier_head.json")  # what an export may hold; a re-export removes the ones it no longer writes


# ---- the model card --------------------------------------------------------------------------------

def to_yaml(value, indent=0):
    """A small YAML writer for the card's front matter: mappings, lists, and scalars written as JSON
    (a JSON string or number is a valid YAML scalar), so no quoting rule can go wrong."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{k}: {json.dumps(v, ensure_ascii=False)}")
        return "\n".join(lines)
    if isinstance(value, list):
        items = []
        for v in value:
            if isinstance(v, dict) and v:
                first, *rest = to_yaml(v, indent + 2).split("\n")
                items.append("\n".join([f"{pad}- {first.lstrip()}", *rest]))
            else:
                items.append(f"{pad}- {json.dumps(v, ensure_ascii=False)}")
        return "\n".join(items)
    return pad + json.dumps(value, ensure_ascii=False)


def training_record(state, run_dir):
    """What log.jsonl says about the run up to the exported step: training seconds (sum of ms_per_step
    over the steps each log line covers), mean tokens/s, and the last evaluation. A resumed run appends
    to the log, so a step logged twice counts once (the later line)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    lines, final = {}, None
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "step" not in r:  # finetune.py ends its log with {"final": the best model's scores}
                    final = r.get("final", final)
                    continue
                lines[(r["step"], "val_loss" in r)] = r
    step = state["iter_num"]
    train = sorted((s, r) for (s, ev), r in lines.items() if not ev and s <= step and "ms_per_step" in r)
    evals = sorted((s, r) for (s, ev), r in lines.items() if ev and s <= step)
    seconds, prev = 0.0, 0
    for s, r in train:
        seconds += (s - prev) * r["ms_per_step"] / 1000
        prev = s
    tps = [r["tokens_per_s"] for _, r in train if "tokens_per_s" in r]
    return {"log": path, "seconds": seconds, "logged_steps": prev, "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "last_eval": evals[-1][1] if evals else None,
            "final": final if final and final.get("best_step") == step else None}


def front_matter(name, kind, results, data_card, license_id, language_code):
    """The hub's metadata: license, language, datasets, tags and a model-index of eval.py's results (the
    layout the hub validates: name, results: task {type}, dataset {type, name, config, split}, metrics)."""
    src = (data_card or {}).get("source", {})
    # the hub's metadata claims benchmark results: only whole runs on named data (a hub split, or the run's
    # own val shards), never a local file or a --limit run, which the card's table still shows as they are
    results = [r for r in results if (r.get("dataset") or {}).get("split") not in (None, "local file")
               and not (r.get("settings") or {}).get("limit")]
    index = [{"task": {"type": "text-generation" if r["task"] in ("ppl", "lambada") else "multiple-choice"},
              "dataset": {k: str(v) for k, v in r["dataset"].items()},
              "metrics": [{"type": m["metric"], "value": m["value"], "name": f"{m['metric']} ({r['task']})"}
                          for m in r["results"]]} for r in results]
    front = {"license": license_id or "other", "language": [language_code], "library_name": "transformers",
             "pipeline_tag": "text-generation", "tags": ["gpt", kind, "gpt-from-scratch"]}
    if src.get("kind") == "hugging face hub":
        front["datasets"] = [src["dataset"]]
    if index:
        front["model-index"] = [{"name": name, "results": index}]
    return "---\n" + to_yaml(front) + "\n---\n"


def finetune_data_section(spec, cfg, rec):
    """What a finetune.py run read: its task data and fields, and its scores (the checkpoint's val
    metrics, and log.jsonl's final record for the test split)."""
    what = f"`{cfg.get('data')}`" + (f" (config `{cfg['data_config']}`)" if cfg.get("data_config") else "")
    L = [f"Fine-tuned for `{spec['task']}` on {what}, reading the field(s) "
         f"{', '.join(map(str, spec.get('text_fields') or ['(not recorded)']))}"
         + (f" with the choices {', '.join(map(str, spec['choice_fields']))}" if spec.get("choice_fields") else "")
         + f" and the label field `{spec.get('label_field')}`" + (" as a real number (regression)"
                                                                  if spec.get("regression") else "") + "."]
    if spec.get("metrics"):
        L += ["", f"- val (the checkpoint's own record): {', '.join(f'{k} {v:.4f}' for k, v in spec['metrics'].items())}"]
    final = (rec or {}).get("final") or {}
    if final.get("test"):
        L += [f"- test (log.jsonl): {', '.join(f'{k} {v:.4f}' for k, v in final['test'].items())}"]
    elif spec.get("metrics"):
        L += ["- test: not scored (no test split with labels in the run's log)"]
    return L


def data_section(data_card, path, cfg, card_note=""):
    """What the data card prepare.py wrote says about the training data."""
    if not data_card:
        return [f"The run read data/{cfg['dataset']}/, whose data card ({path}) was not found when exporting, so "
                f"this card cannot describe the data." if cfg.get("dataset") else
                "No data card: this model was not trained by train.py on prepared shards."]
    src, d, t, tk = data_card["source"], data_card["documents"], data_card["tokens"], data_card["tokenizer"]
    what = {"hugging face hub": lambda: f"the hub dataset `{src['dataset']}` (config {src.get('config')}, split "
                                        f"{src.get('split')}, revision {src.get('commit', src.get('revision'))})",
            "local files": lambda: f"local files `{src['input']}` ({src['num_files']:,} files)",
            "python standard library": lambda: f"the Python {src['python']} standard library ({src['num_files']:,} "
                                               f"files)"}.get(src.get("kind"), lambda: str(src.get("kind")))()
    drop = d["dropped"]
    return [f"From the data card `{path}` that prepare.py wrote beside the shards: {what}, data card written "
            f"{data_card['created']}{card_note} by:", "", "```bash", data_card["command"], "```", "",
            f"- Licence of the data: {src.get('license')}",
            f"- Documents: {d['read']:,} read; dropped {drop['missing_text']:,} without text, {drop['garbage']:,} "
            f"mostly garbage, {drop['shorter_than_min_chars']:,} shorter than {data_card['settings']['min_chars']:,} "
            f"characters, {drop['duplicate']:,} exact duplicates; {d['kept']:,} kept",
            f"- Tokens: {t['train']:,} train, {t['val']:,} val; {t['bytes_per_token']} bytes per token (tokenizer "
            f"`{tk['name']}`, vocabulary {tk['vocab_size']:,})"]


def training_section(state, run_dir, block_size, data_card):
    """The run's settings (the checkpoint), its steps and tokens, and what log.jsonl says."""
    cfg = (state or {}).get("config") or {}
    if not cfg:
        return ["No train.py settings in the checkpoint: the weights were trained elsewhere."]
    keys = ("preset", "n_layer", "n_head", "n_embd", "block_size", "dropout", "optimizer", "learning_rate", "min_lr",
            "warmup_iters", "max_iters", "weight_decay", "beta1", "beta2", "grad_clip", "batch_size",
            "gradient_accumulation_steps", "dtype", "device", "seed", "init_from", "model", "task", "lora_rank",
            "epochs")
    L = ["The run's settings (from the checkpoint):", "", "| setting | value |", "|---|---|",
         *[f"| {k} | {cfg[k]!r} |" for k in keys if cfg.get(k) is not None], ""]
    step = state["iter_num"]
    if "gradient_accumulation_steps" in cfg:  # a train.py run: the global batch is accumulation x batch x T
        T = cfg.get("block_size") or block_size
        per_step = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * T
        epochs = f", {step * per_step / data_card['tokens']['train']:.2f} epochs of the train split" \
            if data_card else ""
        L += [f"- Steps: {step:,} of {per_step:,} tokens ({cfg['gradient_accumulation_steps']} x {cfg['batch_size']} "
              f"x {T}): {step * per_step:,} tokens{epochs}"]
    rec = training_record(state, run_dir) if run_dir else None
    if rec:
        L += [f"- Training time: {rec['seconds'] / 60:.1f} minutes over the {rec['logged_steps']:,} logged steps "
              f"(log.jsonl; evaluations not counted)"
              + (f", {rec['tokens_per_s']:,.0f} tokens/s on average" if rec["tokens_per_s"] else "")]
        ev = rec["last_eval"]
        if ev and "val_bpb" not in ev:  # finetune.py's evaluations: its task metrics on val
            L += [f"- Last evaluation (step {ev['step']:,}): " + ", ".join(
                f"{k} {v:.4f}" for k, v in ev.items() if k.startswith("val_") and isinstance(v, (int, float)))]
        elif ev:
            L += [f"- Last evaluation (step {ev['step']:,}): train loss {ev['train_loss']:.4f}, val loss "
                  f"{ev['val_loss']:.4f} nats/token, val {ev['val_bpb']:.4f} bits/byte"]
    if "best_val_loss" in state and math.isfinite(state["best_val_loss"]):
        L += [f"- Best val loss: {state['best_val_loss']:.4f}"]
    return L + [f"- Hardware: not recorded in the run's files; its settings asked for device {cfg.get('device')!r}, "
                f"dtype {cfg.get('dtype')!r}"]


def model_card(name, kind, model, tok, n_params, state, source, run_dir, data_card, data_card_path, results,
               license_id, language_code, head, card_note=""):
    """README.md: the front matter, then the card, every figure taken from the run's files."""
    c = model.config
    cfg = (state or {}).get("config") or {}
    base = cfg.get("model") or cfg.get("init_from")  # finetune.py's base: --model, --init_from in older runs
    origin = (f"trained with this repository's {'finetune.py' if head else 'train.py'} and exported from "
              f"`{source}` at step {state['iter_num']:,}" if state else f"exported from `{source}`")
    specials = ", ".join(s.replace("|", "\\|") for s in tok.special_tokens)  # \| keeps the table's columns
    L = [front_matter(name, kind, results, data_card, license_id, language_code), f"# {name}", "",
         f"A {n_params:,}-parameter decoder-only Transformer ({FORMS[kind]}), {origin} by export.py. transformers "
         f"loads it as `{hf.ARCHITECTURES[kind]}`, with no custom code.", "",
         "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
         f'tok = AutoTokenizer.from_pretrained("{name}")', f'model = AutoModelForCausalLM.from_pretrained("{name}")',
         'inputs = tok("def ", return_tensors="pt")',
         "print(tok.decode(model.generate(**inputs, max_new_tokens=64, do_sample=True, top_k=200)[0]))", "```", "",
         "## Architecture", "", "| | |", "|---|---|", f"| transformers class | `{hf.ARCHITECTURES[kind]}` |",
         f"| parameters | {n_params:,} (the exported tensors; " + ("the tied embedding and head once) |" if c.tie_weights
                                                                    else "the embedding and the untied head each) |"),
         f"| layers, heads, width | {c.n_layer}, {c.n_head}, {c.n_embd} |",
         f"| MLP | {dict(swiglu='SwiGLU', relu2='ReLU squared', gelu='GELU (tanh form)')[c.mlp]}, hidden width {c.mlp_hidden:,} |",
         f"| context | {c.block_size:,} tokens" + (f"; RoPE, theta {c.rope_theta:g}" if c.pos == "rope" else "") + " |",
         f"| vocabulary | {c.vocab_size:,} tokens (`{tok.name}`; special: {specials}) |", "",
         "## Training data", "",
         *(finetune_data_section(head["finetune"], cfg, training_record(state, run_dir) if run_dir else None)
           + ["", "The pretrained model it started from: " + (f"`{base}`." if base else "not recorded.")]
           if head else data_section(data_card, data_card_path, cfg, card_note)), "",
         "## Training", "", *training_section(state, run_dir, c.block_size, data_card), ""]
    if head:
        spec = head["finetune"]
        labels = f" with labels {', '.join(map(str, spec['labels']))}" if spec.get("labels") else ""
        L += ["## Task head", "", f"Fine-tuned for `{spec['task']}`{labels}. The head is in "
              f"`classifier_head.safetensors` (weight, bias) and `classifier_head.json`: a linear layer on the final "
              f"hidden state (after the last norm) at the extract token, which ends every input sequence. Task "
              f"tokens: {', '.join(f'{s} = {i}' for s, i in head['special'].items())}.", ""]
    L += ["## Evaluation", ""]
    if results:
        def data_of(r):
            limit = (r.get("settings") or {}).get("limit")
            local = (r.get("dataset") or {}).get("split") == "local file"
            return (f"local file {os.path.basename(str(r.get('data')))}" if local else str(r.get("data"))) + \
                (f" (first {limit:,} items only)" if limit else "")
        L += ["With eval.py (lm-evaluation-harness's scoring for multiple choice):", "",
              "| task | data | metric | value | count |", "|---|---|---|---|---|",
              *[f"| {r['task']} | {data_of(r)} | {m['metric']} | {m['value']:.4f} | {m['count']:,} |"
                for r in results for m in r["results"]],
              "", "Commands:", "", "```bash", *[r["command"] for r in results], "```", ""]
    else:
        L += ["No eval.py results were found for this checkpoint.", ""]
    seen = f"the {data_card['tokens']['train']:,} training tokens" if data_card else "the text"
    filtered = ("the data card above says what the data was and how it was filtered (exact deduplication and "
                "garbage filters: no personal-data filtering)") if data_card else "no data card says what the data was"
    L += ["## Intended use and limitations", "",
          f"A small research and teaching model: it continues text like {seen} it saw, and nothing more. It has no "
          f"instruction tuning and no safety training; it writes fluent-looking text that is often wrong, so do not "
          f"rely on what it says or use it to make decisions about people. Outside its training data's language and "
          f"domain it does poorly.", "",
          "## Privacy and licences", "",
          f"A language model can reproduce passages of its training data, including any personal information the "
          f"data held; {filtered}. The training data's licence: "
          f"{(data_card or {}).get('source', {}).get('license', 'not recorded')}. The weights' licence: "
          f"{license_id or 'not declared by the exporter (other)'}. Terms of the data's licence may apply to uses "
          f"of a model trained on it.", ""]
    return "\n".join(L)


# ---- the script ------------------------------------------------------------------------------------

def main(argv=None):
    configure(globals(), argv, renamed={**OLD_MODEL_FLAGS, "dtype": ("save_dtype", "float32"),
                                        "license": ("license_id", "")})  # dtype is compute precision elsewhere
    if save_dtype not in DTYPES:
        raise UserError(f"save_dtype={save_dtype!r} is not one of {', '.join(DTYPES)}")
    if push_to_hub and not re.fullmatch(r"[\w.-]+/[\w.-]+", push_to_hub):
        raise UserError(f"push_to_hub={push_to_hub!r} must be a hub repo id, owner/name")
    if dry_run and not push_to_hub:
        raise UserError("dry_run=True lists what push_to_hub would upload: add --push_to_hub=owner/name")
    if license_id and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license_id):
        raise UserError(f"license_id={license_id!r} is not a hub licence id such as mit, apache-2.0, cc-by-4.0 "
                        f"or other")
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        raise UserError("export needs the safetensors package: pip install safetensors==0.8.0") from None

    # ---- the model and everything the run wrote about it --------------------------------------------
    opened = open_model(model, ckpt)
    gpt, tok, state, source, run_dir, where = opened
    if format != "hf":  # llama.cpp's one-file format instead of the directory (the functions at the end)
        return export_gguf(gpt, tok, state, where)
    try:
        kind = hf.architecture(gpt.config)
    except ValueError as e:
        raise UserError(f"{where} cannot be exported: {e}")
    if "<|endoftext|>" not in tok.special_tokens:
        raise UserError(f"the tokenizer {tok.name} has no <|endoftext|>, which the export uses as bos and eos")
    # beside a run directory (out-quickstart -> out-quickstart-hf); any other source by its name, here
    dest = hf_dir or (os.path.normpath(model) if os.path.isdir(model) and state is not None else
                      os.path.splitext(os.path.basename(os.path.normpath(model)))[0]) + "-hf"
    if glob.glob(os.path.join(glob.escape(dest), "*.pt")):
        raise UserError(f"{dest}/ holds checkpoints: export to another --hf_dir, not into a run directory")
    card_name = name or push_to_hub or os.path.basename(os.path.normpath(dest))

    # ---- the files, in memory first (nothing is written until everything was built) ----------------
    tensors = {k: v.detach().to(DTYPES[save_dtype]).contiguous().clone() for k, v in hf.hf_state_dict(gpt).items()}
    n_params = sum(v.numel() for v in tensors.values())
    eot = tok.eot_token
    files = {"config.json": json.dumps(hf.hf_config(gpt.config, eot) | {"torch_dtype": save_dtype}, indent=2),
             "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot,
                                                   "pad_token_id": eot}, indent=2),
             "tokenizer.bpe": tok.dumps()}
    try:
        files.update(hf.tokenizer_files(tok, gpt.config.block_size))
    except ValueError as e:
        raise UserError(str(e))
    head = None
    if state is not None and state.get("head") is not None and state.get("finetune"):
        spec = state["finetune"]
        spec = {**spec, **{k: public_name(spec[k]) for k in ("base", "merged_from") if spec.get(k)}}
        head = {"finetune": json.loads(json.dumps(spec, default=str)),
                "special": {s: i for s, i in tok.special_tokens.items() if s != "<|endoftext|>"}}
        files["classifier_head.json"] = json.dumps({
            "reads": "the final hidden state (after the last norm) at each sequence's extract token",
            "layer": "linear: weight (n_out, n_embd), bias (n_out)", **head}, indent=2)
    result_files = sorted(glob.glob(results)) if results else \
        sorted(glob.glob(os.path.join(glob.escape(run_dir), "eval_*.json"))) if run_dir else []
    evals = []
    for f in result_files:
        with open(f) as fh:
            r = json.load(fh)
        if not same_file(r.get("source"), source) or (state is not None and r.get("step") != state["iter_num"]):
            print(f"warning: {f} scored {r.get('source')} (step {r.get('step')}), not the exported {where}: left out "
                  f"of the card", file=sys.stderr)
            continue
        evals.append(r)
    cfg = (state or {}).get("config") or {}
    card_path = os.path.join(data_dir, cfg["dataset"], "card.json") if cfg.get("dataset") else None
    data_card, card_note = None, ""
    if card_path and os.path.exists(card_path):
        with open(card_path) as fh:
            data_card = json.load(fh)
        # prepare.py re-run after training rewrites the card: say so rather than date the model's data by it
        saved = datetime.fromtimestamp(os.path.getmtime(source), timezone.utc)
        if datetime.fromisoformat(data_card["created"]) > saved:
            card_note = (f", after this checkpoint was saved ({saved.isoformat(timespec='seconds')}): prepare.py was "
                         f"re-run since, so the card describes the data as prepared then, which may differ from "
                         f"what the model read")
            print(f"warning: {card_path} was written after {source}: the card says prepare.py was re-run since",
                  file=sys.stderr)
    elif card_path:
        print(f"warning: no data card at {card_path}: the model card cannot describe the training data "
              f"(run from the folder that holds data/, or set --data_dir)", file=sys.stderr)
    files["README.md"] = model_card(card_name, kind, gpt, tok, n_params, state, source, run_dir, data_card,
                                    card_path, evals, license_id, language, head, card_note)
    # nothing that names this machine leaves it: absolute paths become their last component
    # (the tokenizer files are data: a token may well read "/home")
    files = {fname: text if fname.startswith(("tokenizer.", "vocab.", "merges.")) else local_paths_removed(text)
             for fname, text in files.items()}

    if dry_run:  # a dry run writes nothing: it says what export and push would write and upload
        sizes = {"model.safetensors": sum(v.numel() * v.element_size() for v in tensors.values())}
        sizes.update({fname: len(text.encode()) + 1 for fname, text in files.items()})
        print(f"dry run: nothing written; would write {len(sizes) + bool(head)} files to {dest}/ and upload them "
              f"({sum(sizes.values()):,} bytes or so) to https://huggingface.co/{push_to_hub} "
              f"({'private' if private else 'public'}):")
        for fname in sorted(sizes) + (["classifier_head.safetensors"] if head else []):
            print(f"  {fname}")
        return

    # ---- write --------------------------------------------------------------------------------------
    os.makedirs(dest, exist_ok=True)
    atomic_write(os.path.join(dest, "model.safetensors"),
                 safetensors_bytes(tensors, metadata={"format": "pt"}))
    if head:
        atomic_write(os.path.join(dest, "classifier_head.safetensors"), safetensors_bytes(
            {k: v.detach().float().contiguous().clone() for k, v in state["head"].items()}, metadata={"format": "pt"}))
    for fname, text in files.items():
        atomic_write(os.path.join(dest, fname), text if text.endswith("\n") else text + "\n")
    written = {"model.safetensors", *files} | ({"classifier_head.safetensors"} if head else set())
    for stale in set(OURS) - written:  # left by an earlier export of another kind (e.g. GPT-2's vocab.json)
        if os.path.exists(os.path.join(dest, stale)):
            os.remove(os.path.join(dest, stale))
    print(f"exported {where} as {hf.ARCHITECTURES[kind]} ({n_params:,} parameters, {save_dtype}) to {dest}/")
    for fname in sorted(written):
        print(f"  {fname:<30} {os.path.getsize(os.path.join(dest, fname)):>14,} bytes")
    if check:
        verify(dest, gpt, tok)

    # ---- push ---------------------------------------------------------------------------------------
    if push_to_hub:
        push(dest, push_to_hub, sorted(written), where)


def same_file(a, b):
    """Whether two paths name one file (a run's best.pt is a hard link to its step checkpoint)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return a is not None and a == b


def local_prefixes():
    """The folders whose names say whose machine this is: here, the home folder, the temporary folder,
    this repository, Python's installation (the Python licence's path in a stdlib data card)."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = {os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir(), here, sys.prefix, sys.base_prefix,
             sys.exec_prefix, "/tmp", "/home", "/Users", "/root"}
    found |= {os.path.realpath(p) for p in found}
    return sorted((p.rstrip("/") for p in found if len(p.rstrip("/")) > 1), key=len, reverse=True)


def local_paths_removed(text):
    """text with every absolute path under a local_prefixes folder cut to its last component."""
    for prefix in local_prefixes():
        text = re.sub(re.escape(prefix) + r"(?:/[^\s'\"`|,;)\]}]*)?(?![\w.-])",
                      lambda m: os.path.basename(m.group(0).rstrip("/")) or ".", text)
    return text


def public_name(path):
    """A model source as the card may name it: a hub name as it is, a local path by its file name."""
    return os.path.basename(os.path.normpath(path)) if os.path.isabs(path) or os.path.exists(path) else path


def verify(dest, gpt, tok):
    """Load the export with transformers and compare its logits and tokenizer with ours."""
    try:
        import transformers
    except ImportError:
        print(f"warning: NOT VERIFIED: transformers is not installed, so {dest}/ was not loaded back and compared "
              f"with this model; to verify: pip install transformers, then run export.py again", file=sys.stderr)
        return
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(dest)
    text = "def main(argv=None):\n    config = configure(globals(), argv)  # Ünïcödé, 漢字 and 🙂\n"
    ids = tok.encode(text)[:gpt.config.block_size]
    if their_tok.encode(text)[:len(ids)] != ids:
        raise UserError(f"check failed: {dest}/tokenizer.json encodes the sample text differently from {tok.name}")
    x = torch.tensor([ids])
    ref = gpt
    if save_dtype != "float32":  # compare with our model's weights rounded as the file rounded them
        ref = copy.deepcopy(gpt)
        for p in ref.parameters():
            p.data = p.data.to(DTYPES[save_dtype]).float()
    with torch.no_grad():
        diff = (theirs(x).logits.float() - ref(x)[0]).abs().max().item()
    print(f"check: transformers' {type(theirs).__name__} and AutoTokenizer load {dest}/; the same {len(ids)} token "
          f"ids, logits within {diff:.1e} of ours")
    if diff > 1e-3:
        raise UserError(f"check failed: the exported model's logits differ from ours by {diff:.3g}")


def push(dest, repo, names, where):
    """Upload dest/ to the hub repo (created if needed), or with dry_run list what would go."""
    total = sum(os.path.getsize(os.path.join(dest, f)) for f in names)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=dest, repo_id=repo, allow_patterns=names,
                                 commit_message=f"export.py: {where}")
    except Exception as e:  # offline, no token, no permission: one line, with the fix
        raise UserError(f"could not push {dest}/ to {repo} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                        f"check the network and your token (huggingface-cli login, or HF_TOKEN)") from None
    print(f"pushed {len(names)} files ({total:,} bytes) to https://huggingface.co/{repo} ({info})")



# ---- GGUF, for llama.cpp ---------------------------------------------------------------------------
# GGUF is llama.cpp's one-file format: metadata (the architecture's sizes, the tokenizer) as typed
# key-value pairs, then the tensors, each in its own storage type. llama.cpp has no class per model:
# an architecture name says which graph to build and which tensor names it reads. Ours map onto two:
#   modern -> llama  token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
#                    ffn_gate, ffn_up, ffn_down}, output_norm, output (left out when tied)
#   gpt2   -> gpt2   token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm,
#                    ffn_up, ffn_down} with their biases, output_norm (the head is always tied)
# The tensors are hf.py's (tested against transformers), renamed by the gguf package's own name table
# and laid out as llama.cpp's converter lays out a Hugging Face checkpoint; the file is written by the
# gguf package (gguf.GGUFWriter, gguf.quants), the Python half of llama.cpp, not by hand.

GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),  # gguf_type -> (tensor type, file type)
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# our split regexes -> the tokenizer.ggml.pre under which llama.cpp splits text the same way:
#   gpt-2      GPT-2's own pattern (llama.cpp runs it as hand-written code, unicode.cpp); ours is
#              tiktoken's possessive spelling of it, which matches the same pieces
#   llama-bpe  Llama 3's pattern, which is cl100k's: \s*[\r\n]+ and cl100k's \s*[\r\n] match the same
#              text, and the possessive quantifiers change nothing there. It also looks a whole piece
#              up before merging (ignore_merges), as tiktoken does; "dbrx" (cl100k itself) does not
GGUF_PRE = {PATTERNS["gpt2"]: "gpt-2", PATTERNS["cl100k"]: "llama-bpe"}


def gguf_architecture(config):
    """'llama' or 'gpt2': the llama.cpp architecture that computes what our GPT computes; a ValueError
    naming the switch that has no counterpart there, or that the check (transformers) cannot read."""
    c = config
    for switch, value in (("qk_norm", c.qk_norm), ("logit_softcap", c.logit_softcap)):
        if value:
            raise ValueError(f"{switch}={value}: llama.cpp's llama and gpt2 architectures have no {switch}")
    if c.mlp == "relu2":
        raise ValueError("mlp=relu2: llama.cpp's llama architecture gates with SiLU (SwiGLU) and gpt2's MLP is "
                         "GELU; neither squares a ReLU")
    if not c.prenorm:
        raise ValueError("prenorm=False (the gpt1 preset): llama.cpp has no post-norm GPT-1 architecture")
    form = (c.norm, c.pos, c.mlp)
    if form == ("rmsnorm", "rope", "swiglu"):
        if c.bias:  # llama.cpp reads optional Llama biases, transformers' GGUF loader drops them
            raise ValueError("bias=True on the modern preset: transformers' GGUF loader (the check) drops Llama "
                             "biases; train with bias=False")
        return "llama"
    if form == ("layernorm", "learned", "gelu"):
        if not c.tie_weights:
            raise ValueError("tie_weights=False on the gpt2 preset: export supports GPT-2's tied head only")
        if c.mlp_hidden != 4 * c.n_embd:  # transformers' GGUF loader takes GPT-2's MLP width as 4 * n_embd
            raise ValueError(f"ffn_hidden={c.mlp_hidden} on the gpt2 preset: transformers' GGUF loader (the check) "
                             f"reads GPT-2's MLP as 4*n_embd={4 * c.n_embd} wide")
        return "gpt2"
    raise ValueError(f"norm={c.norm}, pos={c.pos}, mlp={c.mlp}: llama.cpp's llama architecture is rmsnorm, rope, "
                     f"swiglu and its gpt2 one layernorm, learned, gelu")


def rope_rows_interleaved(w, n_head):
    """Reorder the rows of a query or key projection (out, in) for llama.cpp's llama architecture.
    Our apply_rope (as Hugging Face's Llama) rotates each head's pair (i, i + hd/2); llama.cpp's
    rotates adjacent pairs (2i, 2i + 1), with the same angle for pair i. Within each head, rows
    [0 .. hd/2-1 | hd/2 .. hd-1] become [0, hd/2, 1, hd/2+1, ...]: each of its pairs is one of ours,
    so every head's q.k scores are unchanged (llama.cpp's converter does the same to Llama
    checkpoints, and transformers' GGUF loader undoes it)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(gpt, arch):
    """[(GGUF name, float32 array)] of every tensor the architecture reads, matrices (out, in) as
    nn.Linear holds them, the padded vocabulary rows dropped (hf.hf_state_dict drops them)."""
    import gguf
    c = gpt.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, c.n_layer)
    out = []
    for key, w in hf.hf_state_dict(gpt).items():
        w = w.detach().float()
        if arch == "gpt2" and key.endswith(hf._CONV1D):
            w = w.t()  # Hugging Face's Conv1D (in, out) back to (out, in): ggml's row is an output's weights
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            w = rope_rows_interleaved(w, c.n_head)
        module, part = key.rsplit(".", 1)
        out.append((f"{table.get_name(module)}.{part}", w.contiguous().numpy()))
    return out


def gguf_storage(w, kind, keep_f32=False):
    """How one float32 tensor goes into the file: (data for GGUFWriter, ggml type, the float32 values
    llama.cpp reads back). Vectors (norm gains, biases) and keep_f32 tensors stay F32, as llama.cpp's
    converter keeps them. Q8_0 and Q4_0 cut each row into blocks of 32 values with one float16 scale
    (8 and 4 bits a value); a matrix whose rows are not a multiple of 32 falls back to F16."""
    import gguf
    import numpy as np
    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if w.ndim == 1 or keep_f32 else Q[GGUF_TYPES[kind][0]]
    if qtype in (Q.Q8_0, Q.Q4_0) and w.shape[-1] % 32:
        qtype = Q.F16
    if qtype == Q.F32:
        return w, qtype, w
    if qtype == Q.F16:
        half = w.astype(np.float16)
        return half, qtype, half.astype(np.float32)
    blocks = gguf.quants.quantize(w, qtype)
    return blocks, qtype, gguf.quants.dequantize(blocks, qtype)


def gguf_vocab(tok, block_size):
    """(tokens, token types, merges) for tokenizer.ggml.*: the very vocabulary and merges hf.py writes
    into tokenizer.json, each token spelled in GPT-2's byte-to-character alphabet, the special tokens
    as themselves (type CONTROL, matched whole; the others NORMAL), merges as 'left right' in order."""
    import gguf
    spec = json.loads(hf.tokenizer_files(tok, block_size)["tokenizer.json"])
    tokens, types = [None] * tok.vocab_size, [gguf.TokenType.NORMAL] * tok.vocab_size
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    for added in spec["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], gguf.TokenType.CONTROL
    if None in tokens:
        raise ValueError(f"the tokenizer {tok.name} has no token with id {tokens.index(None)}")
    return tokens, types, [f"{a} {b}" for a, b in spec["model"]["merges"]]  # no token holds a space: Ġ is one


def export_gguf(gpt, tok, state, where):
    """format=gguf: write <hf_dir>/model-<gguf_type>.gguf, check it with transformers, push it."""
    if format != "gguf":
        raise UserError(f"format={format!r} is not 'hf' (a Hugging Face directory) or 'gguf' (llama.cpp)")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf_type={gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    try:
        import gguf
    except ImportError:
        raise UserError("format=gguf needs llama.cpp's gguf package: pip install gguf==0.19.0") from None
    c = gpt.config
    try:
        arch = gguf_architecture(c)
        if tok.pattern not in GGUF_PRE:
            raise ValueError(f"the tokenizer {tok.name} splits text with its own regex, which no llama.cpp "
                             f"pre-tokenizer runs (it knows bpe.py's 'gpt2' and 'cl100k'); llama.cpp would "
                             f"tokenize differently")
        if "<|endoftext|>" not in tok.special_tokens:
            raise ValueError(f"the tokenizer {tok.name} has no <|endoftext|>, which the export uses as bos and eos")
        tokens, types, merges = gguf_vocab(tok, c.block_size)
    except ValueError as e:
        raise UserError(f"{where} cannot be exported to GGUF: {e}")
    dest = hf_dir or (os.path.normpath(model) if os.path.isdir(model) and state is not None else
                      os.path.splitext(os.path.basename(os.path.normpath(model)))[0]) + "-hf"  # as for format=hf
    if glob.glob(os.path.join(glob.escape(dest), "*.pt")):
        raise UserError(f"{dest}/ holds checkpoints: export to another --hf_dir, not into a run directory")
    path = os.path.join(dest, f"model-{gguf_type}.gguf")

    w = gguf.GGUFWriter(None, arch)  # the metadata, in the key names llama.cpp reads
    w.add_name(name or push_to_hub or os.path.basename(os.path.normpath(dest)))
    w.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
    if gguf_type.startswith("q"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.mlp_hidden)
    w.add_head_count(c.n_head)
    if arch == "llama":
        w.add_head_count_kv(c.n_head)  # no grouped-query attention: a key and value head per query head
        w.add_layer_norm_rms_eps(1e-6)  # model.make_norm's RMSNorm
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.n_embd // c.n_head)  # every channel of a head is rotated
        w.add_vocab_size(tok.vocab_size)
    else:
        w.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, GPT-2's
    w.add_tokenizer_model("gpt2")  # byte-level BPE with merges, whatever the architecture
    w.add_tokenizer_pre(GGUF_PRE[tok.pattern])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_token)
    w.add_eos_token_id(tok.eot_token)
    w.add_add_bos_token(False)  # we train and sample without a BOS; llama-bpe would add one unless told
    w.add_add_eos_token(False)
    counts = {}
    for tname, array in gguf_tensors(gpt, arch):
        data, qtype, _ = gguf_storage(array, gguf_type, keep_f32=tname == "position_embd.weight")
        w.add_tensor(tname, data, raw_dtype=qtype if data.dtype == "uint8" else None)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    os.makedirs(dest, exist_ok=True)
    tmp = path + ".tmp"  # as atomic.atomic_write: a reader sees the old file or the new one
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(f"exported {where} as llama.cpp's {arch} architecture, {gguf_type}, to {path} "
          f"({os.path.getsize(path):,} bytes; tensors: {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))})")
    if check:
        verify_gguf(path, gpt, tok)
    if push_to_hub:
        push(dest, push_to_hub, [os.path.basename(path)], where)


def gguf_reference(gpt, kind):
    """A copy of our model holding each weight as a gguf_type file stores it (what llama.cpp reads): a
    row's quantization blocks lie within the row, so quantizing our matrices whole gives the same
    values as quantizing the row slices and row reorderings the file holds."""
    ref = copy.deepcopy(gpt)
    with torch.no_grad():
        for key, p in ref.state_dict().items():
            if p.dim() == 2:
                _, _, back = gguf_storage(p.float().numpy(), kind, keep_f32=key == "transformer.wpe.weight")
                p.copy_(torch.from_numpy(back))
    return ref


def verify_gguf(path, gpt, tok):
    """Load the file with transformers' GGUF loader (which reads it with the gguf package and
    dequantizes it) and compare its tokenizer and logits with ours."""
    try:
        import transformers
    except ImportError:
        print("check: transformers is not installed; the GGUF was not loaded back (pip install transformers)")
        return
    transformers.logging.set_verbosity_error()
    folder, fname = os.path.split(path)
    # transformers' loader reads gpt2.context_length as n_ctx, not as n_positions, the rows of the position
    # table, which it would leave at GPT-2's 1024: it needs telling (llama.cpp takes the table's size from it)
    sizes = {"n_positions": gpt.config.block_size} if gpt.config.pos == "learned" else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32,
                                                               **sizes).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    text = "def main(argv=None):\n    config = configure(globals(), argv)  # Ünïcödé, 漢字 and 🙂\n"
    ids = tok.encode(text)[:gpt.config.block_size]
    if their_tok.encode(text, add_special_tokens=False)[:len(ids)] != ids:
        raise UserError(f"check failed: the tokenizer in {path} encodes the sample text differently from {tok.name}")
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = theirs(x).logits.float()
        diff = (logits - gguf_reference(gpt, gguf_type)(x)[0]).abs().max().item()
        moved = (logits - gpt(x)[0]).abs().max().item()
    print(f"check: transformers loads {path}; the same {len(ids)} token ids, logits within {diff:.1e} of ours with "
          f"the weights as stored ({gguf_type} moved them by up to {moved:.1e})")
    if diff > 1e-3:
        raise UserError(f"check failed: the GGUF model's logits differ from ours by {diff:.3g}")


if __name__ == "__main__":
    run(main)
