"""
bench/bench_gpt1.py: GPT-1's evidence (Radford et al. 2018) at laptop scale, as one command. Does generative
pretraining help most where labels are few (learning curves against the same model from random weights and
a bag of words)? How much does each transferred layer add (§5, figure 2 left)? Does the language model learn
the task before it sees a label (the zero-shot heuristic over pretraining, figure 2 right)? What does the
auxiliary LM loss add (table 5)? And does a small student distilled from the fine-tuned model on unlabelled
text beat the same student trained on the labels alone?

    python bench/gpt1_data.py --mirrors=mirrors --out=gpt1_data          # corpus/, sst2/, rte/
    python bench/bench_gpt1.py --corpus='gpt1_data/corpus/*.txt' --pretrain_args=config/gpt1_laptop.py \\
        --task=gpt1_data/sst2,gpt1_data/rte --out=gpt1.json              # gpt1.json and the figure gpt1.png
    python bench/bench_gpt1.py --pretrained=out-gpt1 --pretrain_args=config/gpt1_laptop.py --task=...

Steps: prepare.py trains a BPE on the corpus and writes shards; train.py pretrains, keeping every step
checkpoint (for the zero-shot curve; or --pretrained names a run that did); train.py --max_iters=0 writes the
same architecture at random weights (scratch) and the student's. Each fine-tuning run sees a seeded random N
rows of the task's train split (the seed index is also finetune.py's seed), the val split as given for early
stopping, and is scored on the test split: finetune.py's final record in its log.jsonl. Rows:
  pretrained      config/finetune_gpt1.py from the pretrained model (lm_coef 0.5)    at every label count
  scratch         the same, from random weights (the architecture alone)             at every label count
  bag_of_words    logistic regression on unigram and bigram counts (scikit-learn)    at every label count
  no_aux_lm       pretrained with lm_coef=0                                          at ablation_labels
  layers_K        pretrained, the embeddings and the first K blocks transferred, K = 0..n_layer (--transfer_layers)
  zeroshot        eval.py --task=zeroshot (text + " very": negative or positive? bad or good?) on each checkpoint,
                  the test split of every one-text task; chance and the majority class beside it
  distilled       the student (student_args) fine-tuned with the pretrained row's model at ablation_labels
                  (same seed) as --teacher, on the rest of train without labels (--unlabeled)
  student_alone   the same student on the labels alone
A task whose rows have sentence1 and sentence2 runs as entailment, one with sentence as classification.
Each finished (row, task, labels, seed) is a file in work/results/, so a run that stops goes on where it
stopped; --parts runs a subset. The JSON (--out) has one entry per row, task and label count (per-seed test
accuracies, mean, sample std, wall seconds); the PNG beside it draws the curves in the paper's style.
"""
import glob
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import bag_of_words, finetune_final, labelled_subset, read_jsonl, sh, task_folder, write_jsonl  # first
import checkpoint
from atomic import atomic_write
from configurator import configure

corpus = ""                # .txt/.jsonl files to pretrain on (a glob; prepare.py --input)
pretrained = ""            # or an existing train.py run (out_dir) whose step checkpoints ckpt_*.pt were kept
pretrain_args = "config/gpt1_laptop.py"  # train.py's config file and/or --key=value overrides (shape, steps)
prepare_args = "--vocab_size=8192 --bpe_train_mb=40"  # prepare.py --tokenizer=train's (config/gpt1_laptop.py's)
task = ""                  # finetune.py data folders (train/val/test .jsonl), comma-separated
labels = "250,1000,4000,all"  # labelled train rows per run: the learning curves' points
seeds = 3                  # label subsets (and finetune.py seeds) per point
large_seeds = 1            # seeds at label counts above ablation_labels: the slowest runs, and the least noisy
layers_seeds = 1           # seeds of each layers_K row: n_layer + 1 runs per seed, the bench's largest part
ablation_labels = 1000     # the label count of no_aux_lm, layers_K, distilled and student_alone
learning_rate = 3e-4       # fine-tuning; GPT-1's 6.25e-5 is for 117M parameters, small models want more
finetune_args = ""         # more finetune.py overrides for every run, e.g. --epochs=1
student_args = "--n_layer=2 --n_head=4 --n_embd=128"  # the student's shape, over pretrain_args
unlabeled = 0              # rows the student is distilled on; 0 = all the train rows not labelled
suffix = " very"           # zeroshot: eval.py's --suffix and --verbalizers (GPT-1 §5, SST-2)
verbalizers = "negative,positive;bad,good"  # pairs, ';'-separated: a curve each. The paper's words are one
                           # token each in GPT-1's vocabulary; where one is two tokens (' negative' in an 8,192
                           # BPE of books), its summed log-probability is lower whatever the text, so a pair
                           # that is one token each in the run's vocabulary goes beside it
parts = "curves,no_aux_lm,layers,zeroshot,distilled"
out = "bench_gpt1.json"    # the results; the figure goes beside it (.png)
work = "data/bench_gpt1"   # prepared data, runs, logs and the finished results (the cache)
threads = 1                # OMP_NUM_THREADS for every run
jobs = 2                   # runs at a time: on 2 cores, two 1-thread runs of these small models finish sooner
                           # than one 2-thread run at a time (their steps are too small to keep two threads busy)

PY = sys.executable
PARTS = ("curves", "no_aux_lm", "layers", "zeroshot", "distilled")
CURVES = ("pretrained", "scratch", "bag_of_words")  # the rows at every label count: lines in the figure
POINTS = ("no_aux_lm", "distilled", "student_alone")  # the rows at ablation_labels: points beside them


def load_task(spec):
    """A task folder DIR or DIR:part+part (the parts it runs; default all of --parts) -> {name, kind, fields,
    splits, parts}; the kind from the text fields of its first row."""
    d, _, only = spec.partition(":")
    try:
        splits = {s: read_jsonl(os.path.join(d, f"{s}.jsonl")) for s in ("train", "val", "test")}
    except OSError as e:
        raise SystemExit(f"--task={d}: {e.strerror}: {e.filename}; a task folder holds train, val and test .jsonl")
    first = splits["train"][0]
    if "sentence1" in first and "sentence2" in first:
        kind, fields = "entailment", ["sentence1", "sentence2"]
    elif "sentence" in first:
        kind, fields = "classification", ["sentence"]
    else:
        raise SystemExit(f"--task={d}: rows need 'sentence' (classification) or 'sentence1' and 'sentence2'")
    return {"name": os.path.basename(os.path.normpath(d)), "dir": d, "kind": kind, "fields": fields, "splits": splits,
            "parts": only.split("+") if only else list(PARTS)}


def main():
    configure(globals())
    if not (corpus or pretrained) or not task or set(parts.split(",")) - set(PARTS):
        raise SystemExit(f"give --corpus=GLOB or --pretrained=RUN, --task=DIR[,DIR], and --parts of {','.join(PARTS)}")
    W = os.path.abspath(work)
    for sub in ("logs", "results", "runs", "tasks"):
        os.makedirs(os.path.join(W, sub), exist_ok=True)
    log = lambda name: os.path.join(W, "logs", name + ".log")  # noqa: E731
    tasks = [load_task(os.path.abspath(d)) for d in task.split(",")]
    pool = ThreadPoolExecutor(jobs)  # each run is a subprocess: threads only wait for them
    writing = threading.Lock()
    rows, part_seconds = [], {}

    def cached(key, run, keep=""):
        """The result stored as results/<key>.json, or run()'s, stored there. keep: a file the result's run
        must have left (a teacher's best.pt); without it the run is done again."""
        path = os.path.join(W, "results", key + ".json")
        if os.path.exists(path) and (not keep or os.path.exists(keep)):
            with open(path) as f:
                return json.load(f)
        print(f"  running {key}\n", end="", flush=True)  # one write: runs in parallel threads print too
        result = run()
        atomic_write(path, json.dumps(result))
        return result

    subsets = {}

    def subset(t, n, s):
        """(data folder of t with s's n labelled train rows, those rows, the unlabelled rest of train): drawn
        and written by the first call for (t, n, s), which every later one returns."""
        d = os.path.join(W, "tasks", f"{t['name']}-{n}-s{s}")
        with writing:  # runs in parallel threads share the folder of one (task, n, seed)
            if d not in subsets:
                train, rest = labelled_subset(t["splits"]["train"], n, s)
                subsets[d] = task_folder(d, {**t["splits"], "train": train}, t["fields"] + ["label"]), train, rest
        return subsets[d]

    def finetune(row, t, n, s, model, *extra, keep=False):
        """finetune.py on t's s-th subset of n labels: {"accuracy" on test, "seconds"}. keep: the run stays."""
        key = f"{row}-{t['name']}-{n}-s{s}"
        run = os.path.join(W, "runs", key)

        def go():
            shutil.rmtree(run, ignore_errors=True)
            d, _, _ = subset(t, n, s)
            dt = sh([PY, "finetune.py", "config/finetune_gpt1.py", f"--model={model}", f"--data={d}",
                     f"--task={t['kind']}", f"--text_fields={','.join(t['fields'])}", f"--out_dir={run}", f"--seed={s}",
                     f"--learning_rate={learning_rate}", "--device=cpu", "--dtype=float32", *finetune_args.split(),
                     *extra], log(key), threads)
            accuracy = finetune_final(run)["test"]["accuracy"]
            if not keep:
                shutil.rmtree(run)  # a run's best.pt is the whole model: dozens of runs would fill a disk
            return {"accuracy": accuracy, "seconds": dt}
        return cached(key, go, os.path.join(run, "best.pt") if keep else "")

    def zeroshot(t, ckpt, step, words):
        """eval.py --task=zeroshot with the checkpoint on t's test split: accuracy, chance, majority."""
        key = f"zeroshot-{words.replace(',', '-')}-{t['name']}-{step}"
        dest = os.path.join(W, "runs", key + ".json")

        def go():
            dt = sh([PY, "eval.py", f"--model={ckpt}", "--task=zeroshot", f"--data={t['dir']}/test.jsonl",
                     f"--text_field={t['fields'][0]}", "--label_field=label", f"--suffix={suffix}",
                     f"--verbalizers={words}", f"--out={dest}", "--device=cpu", "--dtype=float32"],
                    log(key), threads)
            with open(dest) as f:
                r = json.load(f)
            return {"accuracy": r["results"][0]["value"], "chance": r["details"]["chance"],
                    "majority": r["details"]["majority"], "seconds": dt}
        return cached(key, go)

    def add(row, t, n, results, **more):
        """One row of the report: the seeds' test accuracies at n labels (results: dicts, or futures of them)."""
        results = [r.result() if hasattr(r, "result") else r for r in results]
        accs = [r["accuracy"] for r in results]
        rows.append({"row": row, "task": t["name"], "labels": n, "seeds": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seconds": sum(r["seconds"] for r in results), **more})
        print(f"{row:<14} {t['name']:<10} {n:>7,} labels: {rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f}", flush=True)

    def init_run(name, data, *extra):
        """train.py --max_iters=0 over pretrain_args on the prepared dataset data: the step-0 checkpoint of that
        shape (random weights)."""
        run = os.path.join(W, "runs", name)
        if not os.path.exists(os.path.join(run, "best.pt")):
            shutil.rmtree(run, ignore_errors=True)
            sh([PY, "train.py", *pretrain_args.split(), f"--dataset={data}", f"--out_dir={run}", "--max_iters=0",
                *extra], log(name), threads)
        return run

    # ---- pretraining, and the same shape at random weights -------------------------------------------------
    t0 = time.perf_counter()
    pre = os.path.abspath(pretrained) if pretrained else os.path.join(W, "runs", "pretrain")
    if not pretrained and not os.path.exists(pre + ".done"):  # both scripts resume where they stopped
        files = sorted(glob.glob(corpus))
        if not files:
            raise SystemExit(f"--corpus={corpus} matches no file")
        print(f"prepare.py: {len(files)} files, {prepare_args}", flush=True)
        sh([PY, "prepare.py", f"--input={os.path.abspath(corpus)}", "--name=corpus", f"--data_dir={W}/data",
            "--tokenizer=train", *prepare_args.split()], log("prepare"), threads)
        scratch_init = pool.submit(init_run, "scratch", f"{W}/data/corpus")  # beside the pretraining: needs the data
        print(f"train.py {pretrain_args}", flush=True)  # every step checkpoint kept, unless the config says otherwise
        sh([PY, "train.py", "--keep_last=1000000", "--init_from=auto", *pretrain_args.split(),
            f"--dataset={W}/data/corpus", f"--out_dir={pre}"], log("pretrain"), threads)
        scratch_init.result()
        open(pre + ".done", "w").close()
    state = checkpoint.load(checkpoint.find(pre, "best"))
    dataset, shape = state["config"]["dataset"], state["model_args"]
    scratch = init_run("scratch", dataset)  # made above, or now for --pretrained
    if checkpoint.load(os.path.join(scratch, "best.pt"))["model_args"] != shape:
        raise SystemExit(f"--pretrain_args give another shape than {pre}'s; pass the arguments it was trained with")
    part_seconds["pretraining"] = time.perf_counter() - t0
    print(f"pretraining: {pre} (step {state['iter_num']}), {part_seconds['pretraining']:.0f} s", flush=True)

    # ---- the rows --------------------------------------------------------------------------------------------
    # the student at random weights, made in the pool beside the first parts' runs: the distilled part waits less
    student_init = pool.submit(init_run, "student", dataset, *student_args.split()) \
        if any("distilled" in t["parts"] for t in tasks) and "distilled" in parts.split(",") else None
    for part in parts.split(","):
        t0 = time.perf_counter()
        pending = []  # (row, task, labels, futures, more): every run of the part is queued, then reported in order
        for t in tasks:
            if part not in t["parts"]:
                continue
            N = len(t["splits"]["train"])
            A = min(ablation_labels, N)
            seeded = lambda row, n, model, *extra, keep=False, count=None: [  # noqa: E731
                pool.submit(finetune, row, t, n, s, model, *extra, keep=keep)
                for s in range(count or (seeds if n <= A else large_seeds))]
            later = lambda row, n, futures, **more: pending.append((row, t, n, futures, more))  # noqa: E731
            if part == "curves":
                for n in sorted({N if x == "all" else min(int(x), N) for x in labels.split(",")}):
                    later("pretrained", n, seeded("pretrained", n, pre, keep=n == A))  # at A: the teacher
                    later("scratch", n, seeded("scratch", n, scratch))
                    later("bag_of_words", n, [cached(f"bag_of_words-{t['name']}-{n}-s{s}", lambda: bag_of_words(
                        subset(t, n, s)[1], t["splits"]["test"], t["fields"]))
                        for s in range(seeds if n <= A else large_seeds)])
            elif part == "no_aux_lm":
                later("no_aux_lm", A, seeded("no_aux_lm", A, pre, "--lm_coef=0"))
            elif part == "layers":
                for k in range(shape["n_layer"] + 1):
                    later(f"layers_{k}", A, seeded(f"layers_{k}", A, pre, f"--transfer_layers={k}", count=layers_seeds),
                          layers=k)
            elif part == "zeroshot" and t["kind"] == "classification":
                for ckpt in checkpoint.step_checkpoints(pre):
                    step = int(os.path.basename(ckpt)[len("ckpt_"):-len(".pt")])
                    for words in verbalizers.split(";"):
                        later("zeroshot", 0, [pool.submit(zeroshot, t, ckpt, step, words)], step=step, words=words)
            elif part == "distilled":
                student = student_init.result()

                def distil(t, s, A=A, student=student):
                    finetune("pretrained", t, A, s, pre, keep=True)  # the teacher: the curves' run at A
                    unl = os.path.join(W, "tasks", f"{t['name']}-{A}-s{s}.unlabeled.jsonl")
                    rest = subset(t, A, s)[2][:unlabeled or None]  # the draw the teacher's run made, or made now
                    with writing:
                        write_jsonl(unl, rest, t["fields"])
                    return finetune("distilled", t, A, s, student, f"--unlabeled={unl}",
                                    f"--teacher={W}/runs/pretrained-{t['name']}-{A}-s{s}")
                later("distilled", A, [pool.submit(distil, t, s) for s in range(seeds)])
                later("student_alone", A, seeded("student_alone", A, student))
        for row, t, n, futures, more in pending:
            if row == "zeroshot":
                r = futures[0].result()
                more.update(chance=r["chance"], majority=r["majority"])
            add(row, t, n, futures, **more)
        part_seconds[part] = time.perf_counter() - t0
        print(f"{part}: {part_seconds[part]:.0f} s", flush=True)

    # ---- the report --------------------------------------------------------------------------------------------
    report = {"pretrained": pre, "step": state["iter_num"], "model_args": shape, "part_seconds": part_seconds,
              "settings": {k: globals()[k] for k in ("labels", "seeds", "large_seeds", "layers_seeds", "ablation_labels", "learning_rate", "parts",
                                                     "pretrain_args", "finetune_args", "student_args", "unlabeled")},
              "rows": rows}
    png = os.path.splitext(out)[0] + ".png"
    atomic_write(out, json.dumps(report, indent=1) + "\n")
    figure(rows, png)
    print(f"wrote {out} and {png}", flush=True)


def figure(rows, path):
    """Figure 2's style: per task, accuracy against labelled examples (log x, a band of one std over the
    seeds; the rows run at one label count as points), then accuracy against layers transferred, then
    zero-shot accuracy against pretraining step with chance and the majority class as lines."""
    import matplotlib
    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt
    of = lambda row, task=None: [r for r in rows if r["row"].startswith(row) and task in (None, r["task"])]  # noqa
    curves = list(dict.fromkeys(r["task"] for r in rows if r["row"] in CURVES))
    panels = curves + ["layers"] * bool(of("layers_")) + ["zeroshot"] * bool(of("zeroshot"))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)

    def line(ax, points, label, **kw):  # points: (x, mean, std)
        x, m, s = zip(*sorted(points))
        ax.plot(x, m, "o-", label=label, ms=3, **kw)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2, **kw)
    for ax, panel in zip(axes[0], panels):
        if panel == "layers":
            for task in dict.fromkeys(r["task"] for r in of("layers_")):
                line(ax, [(r["layers"], r["mean"], r["std"]) for r in of("layers_", task)], task)
            ax.set(xlabel="layers transferred", ylabel="test accuracy", title="transfer",
                   xticks=sorted({r["layers"] for r in of("layers_")}))
        elif panel == "zeroshot":
            for task in dict.fromkeys(r["task"] for r in of("zeroshot")):
                for words in dict.fromkeys(r["words"] for r in of("zeroshot", task)):
                    line(ax, [(r["step"], r["mean"], r["std"]) for r in of("zeroshot", task) if r["words"] == words],
                         f"{task}: {words.replace(',', ' / ')}")
                ax.axhline(of("zeroshot", task)[0]["majority"], ls=":", c="gray", label="majority class")
            ax.axhline(of("zeroshot")[0]["chance"], ls="--", c="k", label="chance")
            ax.set(xlabel="pretraining step", ylabel="zero-shot accuracy", title="zero-shot (text + very)")
        else:
            for row in CURVES:
                if of(row, panel):
                    line(ax, [(r["labels"], r["mean"], r["std"]) for r in of(row, panel)], row)
            for r in [r for row in POINTS for r in of(row, panel)]:
                ax.errorbar(r["labels"], r["mean"], r["std"], fmt="s", capsize=3, ms=4, label=r["row"])
            ax.set(xscale="log", xlabel="labelled examples", ylabel="test accuracy", title=panel)
            counts = sorted({r["labels"] for r in of("", panel) if r["row"] in CURVES + POINTS})
            ax.set_xticks(counts, [f"{n:,}" for n in counts], minor=False)
            ax.minorticks_off()  # the label counts, not powers of ten
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
