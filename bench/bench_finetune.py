"""
bench/bench_finetune.py: does pretraining plus GPT-1's fine-tuning recipe beat training on the task
alone, and how close does LoRA come at a fraction of the memory? On real data that nobody here wrote:

  SST-2 (sentiment, 2 classes) and RTE (entailment, 2 classes) from GLUE, as GLUE's tsv files, e.g.
      git clone https://github.com/eyalbd2/Reproducing-AutoPrompt    # glue_data/SST-2: train_full.tsv, dev.tsv
      git clone https://github.com/marcwww/nlu_eval                   # data/RTE: train.tsv, dev.tsv
  English prose to pretrain on: WikiText-2 (the word-level version in pytorch/examples,
      word_language_model/data/wikitext-2/{valid,test}.txt), or any text files.

    python bench/bench_finetune.py --sst2=PATH/glue_data/SST-2 --rte=PATH/data/RTE \\
        --prose='PATH/wikitext-2/*.txt' --pretrain_iters=600 --sst2_train=4000

Steps: prepare.py trains a BPE on the prose and writes shards; train.py pretrains a small GPT-2-shaped
model; then finetune.py runs each row of the table on each task, and a bag-of-words logistic regression
(scikit-learn) gives the floor. Fine-tuning sees a subset of the train split (sst2_train examples) with
10% of it carved off as val for early stopping; the accuracy reported is on GLUE's dev set, which no run
sees before its final evaluation (our "test" split). Rows:
  full     every weight, from the pretrained model (lm_coef 0.5, the paper's)
  lora     rank-8 adapters on all four projections, from the pretrained model
  qlora    the same adapters over the blocks' Linears frozen in int4 (--base_bits=4, groups of 64)
  lambda0  full fine-tuning without the auxiliary LM loss
  scratch  the same architecture from random weights (train.py's step-0 checkpoint), the task alone
  bow      bag-of-words logistic regression (unigrams and bigrams), no neural network
Wall time, trainable parameters, optimizer-state bytes and peak RSS come from finetune.py's own report.
"""
import glob
import json
import os
import shutil
import sys

from benchlib import bag_of_words, finetune_final, labelled_subset, sh, task_folder  # first: the root on sys.path
from configurator import configure

sst2 = ""                  # folder with GLUE SST-2's train (train_full.tsv or train.tsv) and dev.tsv
rte = ""                   # folder with GLUE RTE's train.tsv and dev.tsv
prose = ""                 # glob of .txt files to pretrain on
work = "data/bench_finetune"
vocab_size = 4096
pretrain_iters = 600       # train.py steps of 16 x 128 tokens
pretrain_args = "--preset=gpt2 --n_layer=4 --n_head=4 --n_embd=128 --block_size=128 --batch_size=16 " \
                "--gradient_accumulation_steps=1 --learning_rate=2e-3 --warmup_iters=50 --min_lr=2e-4 " \
                "--beta2=0.99 --dropout=0.0 --eval_interval=200 --eval_iters=10 --device=cpu --dtype=float32 --compile=False"
sst2_train = 4000          # SST-2 train examples used (of 67,349); 0 = all
rte_train = 0              # RTE train examples used (of 2,490); 0 = all
epochs = 3
learning_rate = 3e-4       # full, lambda0 and scratch; GPT-1's 6.25e-5 is for a 117M model
lora_learning_rate = 1e-3
max_len = 128
rows = "full,lora,qlora,lambda0,scratch,bow"
tasks = "sst2,rte"
threads = 1                # OMP_NUM_THREADS for every run (on 2 shared cores one thread was fastest)

PY = sys.executable


def read_tsv(path):
    """GLUE tsv: a header line, tab-separated, no quoting."""
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().rstrip("\n").split("\n")
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


def glue_task(name, src, n, fields):
    """work/<name>/: train (a seeded subset of n rows) and test (GLUE's dev set), as finetune.py reads them."""
    train = next(p for p in (os.path.join(src, "train_full.tsv"), os.path.join(src, "train.tsv")) if os.path.exists(p))
    rows, _ = labelled_subset(read_tsv(train), n, 0)
    dev = read_tsv(os.path.join(src, "dev.tsv"))
    d = task_folder(os.path.abspath(os.path.join(work, name)), {"train": rows, "test": dev}, fields + ["label"])
    return d, rows, dev


def main():
    configure(globals())
    if not (prose and (sst2 or rte)):
        raise SystemExit("give --prose='FILES' and --sst2=DIR and/or --rte=DIR (see the docstring)")
    os.makedirs(work, exist_ok=True)
    work_abs = os.path.abspath(work)
    logs = os.path.join(work_abs, "logs")
    os.makedirs(logs, exist_ok=True)
    results = {}

    # ---- pretraining -----------------------------------------------------------------------------------
    base_run = os.path.join(work_abs, "out-pretrain")
    scratch_run = os.path.join(work_abs, "out-scratch")
    name = "bench_finetune_prose"
    if not os.path.exists(os.path.join(base_run, "best.pt")):
        files = sorted(glob.glob(prose))
        print(f"prepare.py: {len(files)} prose files, BPE of {vocab_size}", flush=True)
        dt = sh([PY, "prepare.py", f"--input={prose}", f"--name={name}", "--tokenizer=train", f"--vocab_size={vocab_size}",
                 "--separator=\n = ", "--val_fraction=0.05"], os.path.join(logs, "prepare.log"), threads)
        print(f"  {dt:.0f} s", flush=True)
        shutil.rmtree(base_run, ignore_errors=True)
        print(f"train.py: {pretrain_iters} steps", flush=True)
        dt = sh([PY, "train.py", f"--dataset={name}", f"--out_dir={base_run}", f"--max_iters={pretrain_iters}",
                 *pretrain_args.split()], os.path.join(logs, "pretrain.log"), threads)
        evals = [json.loads(line) for line in open(os.path.join(base_run, "log.jsonl")) if "val_bpb" in line]
        results["pretrain"] = {"seconds": dt, "val_bpb": evals[-1]["val_bpb"], "steps": pretrain_iters}
        print(f"  {dt:.0f} s, val {evals[-1]['val_bpb']:.3f} bits/byte", flush=True)
    if not os.path.exists(os.path.join(scratch_run, "best.pt")):  # the same shapes, random weights: step 0
        shutil.rmtree(scratch_run, ignore_errors=True)
        sh([PY, "train.py", f"--dataset={name}", f"--out_dir={scratch_run}", "--max_iters=0", *pretrain_args.split()],
           os.path.join(logs, "scratch.log"), threads)

    # ---- fine-tuning -------------------------------------------------------------------------------------
    specs = {"sst2": (sst2, sst2_train, ["sentence"], "classification"),
             "rte": (rte, rte_train, ["sentence1", "sentence2"], "entailment")}
    runs = {"full": (base_run, ["--lm_coef=0.5", f"--learning_rate={learning_rate}"]),
            "lora": (base_run, ["--lm_coef=0.5", "--lora_rank=8", "--lora_alpha=16", f"--learning_rate={lora_learning_rate}"]),
            "qlora": (base_run, ["--lm_coef=0.5", "--lora_rank=8", "--lora_alpha=16", f"--learning_rate={lora_learning_rate}",
                                 "--base_bits=4", "--base_group_size=64"]),
            "lambda0": (base_run, ["--lm_coef=0", f"--learning_rate={learning_rate}"]),
            "scratch": (scratch_run, ["--lm_coef=0", f"--learning_rate={learning_rate}"])}
    for t in tasks.split(","):
        src, n, fields, kind = specs[t]
        if not src:
            continue
        d, train_rows, dev_rows = glue_task(t, src, n, fields)
        results[t] = {"train_examples": len(train_rows), "dev_examples": len(dev_rows)}
        for row in rows.split(","):
            print(f"{t} {row} ...", flush=True)
            if row == "bow":
                results[t][row] = bag_of_words(train_rows, dev_rows, fields)
            else:
                base, extra = runs[row]
                out = os.path.join(work_abs, f"out-{t}-{row}")
                shutil.rmtree(out, ignore_errors=True)
                dt = sh([PY, "finetune.py", "config/finetune_gpt1.py", f"--model={base}", f"--data={d}",
                         f"--task={kind}", f"--text_fields={','.join(fields)}", f"--out_dir={out}", f"--epochs={epochs}",
                         f"--max_len={max_len}", "--eval_interval=50", "--patience=0", "--device=cpu", "--dtype=float32",
                         *extra], os.path.join(logs, f"{t}-{row}.log"), threads)
                final = finetune_final(out)
                results[t][row] = {"accuracy": final["test"]["accuracy"], "val_accuracy": final["val"]["accuracy"],
                                   "trainable_params": final["trainable_params"],
                                   "optimizer_state_bytes": final["optimizer_state_bytes"],
                                   "peak_memory_bytes": final["peak_memory_bytes"], "seconds": dt,
                                   "block_weight_bytes": final.get("block_weight_bytes"),
                                   "best_step": final["best_step"]}
            r = results[t][row]
            print(f"  dev accuracy {r['accuracy']:.3f}, {r['seconds']:.0f} s", flush=True)
            with open(os.path.join(work_abs, "results.json"), "w") as f:
                json.dump(results, f, indent=1)

    # ---- the table -------------------------------------------------------------------------------------
    mib = lambda b: "-" if b is None else f"{b / 2**20:.2f} MiB"  # noqa: E731
    for t in tasks.split(","):
        if t not in results:
            continue
        print(f"\n{t}: {results[t]['train_examples']} train examples (10% of them val), GLUE dev "
              f"({results[t]['dev_examples']}) accuracy\n")
        print("| run | accuracy | trainable params | optimizer state | block weights | peak RSS | wall time |\n"
              "|---|---|---|---|---|---|---|")
        for row in rows.split(","):
            r = results[t].get(row)
            if r:
                print(f"| {row} | {r['accuracy']:.3f} | {r['trainable_params']:,} | {mib(r['optimizer_state_bytes'])} "
                      f"| {mib(r.get('block_weight_bytes'))} | {mib(r['peak_memory_bytes'])} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
