"""
bench/bench_train.py: what train.py's efficiency settings buy on a CPU, each against its baseline in
the same run, on the offline stdlib corpus (prepare.py --dataset=stdlib, 4,096-token BPE).

  --which=muon      optimizer=muon vs adamw: val bits per byte and wall time, at the quick start's size
                    (4 layers, 128 wide) and at 6 layers, 384 wide; at equal steps, then Muon again with
                    the steps AdamW's wall time buys
  --which=modded    QK-norm, ReLU^2, logit soft-capping and zero-init projections (modded-nanogpt), each
                    alone and all together, and the 50x embedding lr taken out, on the speedrun recipe
                    (Muon, untied head) at 6x384
  --which=distill   a 4x128 student distilled from a 6x384 teacher (--teacher_steps) vs the same
                    student from scratch, the same steps, then from scratch for the distilled run's time
  --which=fsdp      parallel=fsdp vs ddp on 2 CPU processes (gloo): peak RSS of the largest process
                    and ms per step, at 6 layers, 384 wide

    python bench/bench_train.py --which=muon --steps=300
Every run is a real train.py process; the figures come from its log.jsonl.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from benchlib import ROOT
from configurator import configure

which = "muon"         # 'muon' | 'modded' | 'distill' | 'fsdp'
steps = 300            # optimizer steps per run
work = "/tmp/bench_train"  # holds data/stdlib and the runs
threads = 0            # OMP_NUM_THREADS per process; 0 = torch's default
teacher_steps = 0      # --which=distill: the teacher's steps; 0 = steps (a teacher barely better than the student)

QUICK = [os.path.join(ROOT, "config", "quickstart.py"), "--init_from=scratch", "--eval_iters=20"]
BIG = ["--n_layer=6", "--n_embd=384", "--n_head=6"]


def train(out, *args, nproc=1, max_iters=0):
    """Run train.py in `work`; return (wall seconds, final eval record, last step record, peak RSS MB)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train.py")]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    n = max_iters or steps
    shutil.rmtree(os.path.join(work, out), ignore_errors=True)  # init_from=scratch refuses an old run's folder
    p = subprocess.run([*cmd, *QUICK, f"--out_dir={out}", f"--max_iters={n}", f"--eval_interval={n}",
                        *args], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"train.py failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    records = [json.loads(line) for line in open(os.path.join(work, out, "log.jsonl"))]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return wall, [r for r in records if "val_bpb" in r][-1], [r for r in records if "loss" in r][-1], rss


def main():
    configure(globals())
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "data", "stdlib", "card.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--dataset=stdlib"], cwd=work,
                       check=True, capture_output=True)
    print(f"{steps} steps each, stdlib corpus, {os.cpu_count()} cores")
    if which == "muon":
        for size, extra in (("4x128", []), ("6x384", BIG)):
            ms = {}
            for opt in ("adamw", "muon"):
                wall, ev, last, _ = train(f"out-{opt}-{size}", f"--optimizer={opt}", *extra)
                ms[opt] = last["ms_per_step"]
                print(f"{size} {opt:5} {steps} steps: val {ev['val_bpb']:.4f} bits/byte, {wall:6.1f} s wall, "
                      f"{ms[opt]:.0f} ms/step", flush=True)
            # equal wall time: Muon gets the steps AdamW's step time buys (its schedule fits the shorter run)
            n = round(steps * ms["adamw"] / ms["muon"])
            wall, ev, last, _ = train(f"out-muon-eq-{size}", "--optimizer=muon", *extra, max_iters=n)
            print(f"{size} muon  {n} steps (AdamW's time): val {ev['val_bpb']:.4f} bits/byte, {wall:6.1f} s wall, "
                  f"{last['ms_per_step']:.0f} ms/step", flush=True)
    elif which == "modded":
        # modded-nanogpt's architecture changes, each alone and all together, on config/speedrun_124m.py's
        # recipe (modern preset, Muon, untied head) at 6x384; the quick start's 50x embedding lr is in the
        # base, so its row takes it out
        base = [*BIG, "--optimizer=muon", "--tie_weights=False", "--embedding_lr_scale=50"]
        for name, extra in (("modern + muon", []), ("+ relu2", ["--mlp=relu2"]), ("+ qk_norm", ["--qk_norm=True"]),
                            ("+ softcap 30", ["--logit_softcap=30"]), ("+ zero_init", ["--zero_init=True"]),
                            ("emb lr x1", ["--embedding_lr_scale=1"]),
                            ("+ all four", ["--mlp=relu2", "--qk_norm=True", "--logit_softcap=30", "--zero_init=True"])):
            wall, ev, last, _ = train("out-modded", *base, *extra)
            print(f"6x384 {name:14} {steps} steps: val {ev['val_bpb']:.4f} bits/byte, {wall:6.1f} s wall, "
                  f"{last['ms_per_step']:.0f} ms/step", flush=True)
    elif which == "distill":
        wall, ev, _, _ = train("out-teacher", *BIG, max_iters=teacher_steps)
        print(f"teacher 6x384, {teacher_steps or steps} steps: val {ev['val_bpb']:.4f} bits/byte, {wall:.1f} s",
              flush=True)
        walls = {}
        for name, extra in (("scratch", []), ("distilled", ["--teacher=out-teacher"])):
            walls[name], ev, _, _ = train(f"out-student-{name}", *extra)
            print(f"student 4x128 {name:9}: val {ev['val_bpb']:.4f} bits/byte, {walls[name]:.1f} s", flush=True)
        # the teacher's forward passes cost time: from scratch, the distilled run's time buys more steps
        n = round(steps * walls["distilled"] / walls["scratch"])
        wall, ev, _, _ = train("out-student-eqtime", max_iters=n)
        print(f"student 4x128 scratch, {n} steps (the distilled run's time): val {ev['val_bpb']:.4f} bits/byte, "
              f"{wall:.1f} s", flush=True)
    elif which == "fsdp":
        for par in ("ddp", "fsdp"):
            # a fresh process per measurement: RUSAGE_CHILDREN keeps the maximum over all children
            p = subprocess.run([sys.executable, __file__, "--which=fsdp_one", f"--work={work}",
                                f"--steps={steps}", f"--threads={threads}", f"--parallel_mode={par}"],
                               capture_output=True, text=True, check=True)
            print(p.stdout.strip(), flush=True)
    elif which == "fsdp_one":
        wall, ev, last, rss = train(f"out-{parallel_mode}", f"--parallel={parallel_mode}", *BIG,
                                    "--gradient_accumulation_steps=2", "--batch_size=8", nproc=2)
        print(f"{parallel_mode:4} 2 processes, 6x384: peak RSS of the largest process {rss:.0f} MB, "
              f"{last['ms_per_step']:.0f} ms/step, val {ev['val_bpb']:.4f} bits/byte")


parallel_mode = "ddp"  # internal: the mode a --which=fsdp_one child measures

if __name__ == "__main__":
    main()
