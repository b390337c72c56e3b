"""
bench/gpu_check.py: everything about this repository that only a GPU can show, as one command that
takes a few minutes on one recent NVIDIA GPU (an H100: about 6, well under 8):

    python bench/gpu_check.py                              # one CUDA GPU
    python bench/gpu_check.py --device=cpu --quick=True    # what a CPU can run of it, at tiny sizes

It needs no network: it makes its own data with prepare.py --dataset=stdlib (the offline corpus, our
own BPE) and trains its own runs, in a temporary folder (--work=DIR keeps them). Every script runs as a
user runs it, in its own process, so a check sees the flags and output a user sees. One line per check:
its name, PASS, FAIL or SKIP, then its figure or its reason, and its seconds; the exit status is 1 if
any check failed. The figures of a GPU's first run go to bench/README.md with the GPU's name.

  data             prepare.py --dataset=stdlib: a 50,257-token BPE (GPT-2's vocabulary size), so the
                   model below is GPT-2 124M's shape to the last matrix
  sdpa             the attention kernel that F.scaled_dot_product_attention picks for the model's own
                   forward (GPT-2 124M, bf16): read from the profiler's op names, and it must be a fused
                   one (flash, memory-efficient or cuDNN), not the math fallback, which builds the (T, T)
                   matrix; beside it, whether flash and memory-efficient each run, forward and backward,
                   when sdpa_kernel allows only that one
  grad_checkpoint  torch.cuda.max_memory_allocated for one training step of GPT-2 124M (batch 8 x 1024,
                   bf16) with and without grad_checkpoint: it must save at least a fifth
  train_speed      train.py config/gpt2_124m.py (bf16, torch.compile): tokens/s and the MFU train.py logs
                   (device.peak_flops), the median over the log lines after the first (which compiles)
  train_fp16       train.py config/quickstart.py in float16 with the GradScaler: the loss falls and no
                   non-finite value stops the run; its checkpoint is the model the next four checks read
  sample, eval,    sample.py, eval.py --prompts and serve.py on the device in float32: greedy text equal
  serve            to decode.generate's on the CPU (same checkpoint, same prompt); in the device's own
                   16-bit dtype (auto) they must run, and how far their text agrees is reported
  eval_scores      eval.py's perplexity scores in the device's 16 bits (autocast and bf16 weights) against
                   float32, same model, same device: nats per token and bits per byte within 1e-3
  ddp, fsdp        torchrun --nproc_per_node=1 train.py --parallel=ddp / fsdp: a short run, a finite val
  quantized        device.for_inference refuses int8 weights (quantize.py) for the GPU, in one line, and
                   sample.py, eval.py and serve.py each end with that one `error:` line
--device=cpu --quick=True runs every check it can at tiny sizes (train_speed there is float32 without
compile and has no MFU; eval_scores compares bf16 autocast on the CPU); tests/test_gpu_check.py runs it.
"""
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from benchlib import ROOT
from configurator import UserError, configure, run
from device import autocast, for_inference, peak_flops, pick_device

# ---- settings (override with --key=value) ----------------------------------------------------------
device = "cuda"        # 'cuda' | 'cuda:N' | 'cpu' (needs quick=True)
quick = False          # tiny models and a few steps: every check a CPU can run, in about a minute
work = ""              # the folder for data and runs; "" = a temporary folder, removed at the end
# ----------------------------------------------------------------------------------------------------

PROMPT = "class Reader:\n    def __init__(self"  # stdlib-like code, so the trained model continues it
NEW_TOKENS = 48         # greedy tokens each script generates after PROMPT
MIN_TOKENS = 8          # the reference's least length before <|endoftext|>: no vacuous equality
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64"]  # quick: milliseconds a step
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Failed(Exception):
    """A check's FAIL line: the message is the reason."""


class Skipped(Exception):
    """A check's SKIP line: it cannot run here, or what it needs failed earlier."""


class Setup:
    """What the checks share: the device, the work folder, and the runs that several checks read, each made
    once (a failure is kept, so every check that needs it says so)."""

    def __init__(self):
        self.dev, self.device_type, self.ptdtype = pick_device(device, "auto")  # as every script picks
        self.dtype = str(self.ptdtype).removeprefix("torch.")
        self.cuda = self.device_type == "cuda"
        self.made = {}

    def once(self, key, make):
        """make()'s value, made on the first call. Its failure is the first caller's FAIL line; every
        later caller gets a SKIP line that names it."""
        if key not in self.made:
            try:
                self.made[key] = (make(), None)
            except (Failed, Skipped) as e:
                self.made[key] = (None, e)
                raise
        value, error = self.made[key]
        if error is not None:  # a skip passes on as it is: the first failure is the one to name
            raise Skipped(str(error) if isinstance(error, Skipped) else f"needs {key}, which failed: {error}")
        return value


S = None  # the Setup of this run (main)


# ---- running the scripts ---------------------------------------------------------------------------

def last_line(text):
    """What a failed process said: its last `error: ...` line, else its last exception, else its last line of
    words (torchrun ends its report with a rule of ='s)."""
    lines = [line.strip() for line in text.splitlines() if any(c.isalnum() for c in line)]
    for said in ([x for x in lines if x.startswith("error:")], [x for x in lines if "Error" in x], lines):
        if said:
            return said[-1][:300]
    return "(no output)"


def launch(name, *args, timeout=180, torchrun=False):
    """Run ROOT/name with args in the work folder, as a user does: the CompletedProcess, whatever its status."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    try:
        return subprocess.run([*launcher, os.path.join(ROOT, name), *args], cwd=work, env=ENV, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"{name} ran past {timeout} s") from None


def script(name, *args, **kwargs):
    """launch, which must succeed."""
    p = launch(name, *args, **kwargs)
    if p.returncode:
        raise Failed(f"{name} exited {p.returncode}: {last_line(p.stderr or p.stdout)}")
    return p


def records(run_dir):
    """(step records, eval records) of a train.py run's log.jsonl."""
    with open(os.path.join(work, run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_bpb" in r]


def train_run(run_dir, config, *args, torchrun=False, timeout=300):
    """A finished train.py run in work/run_dir: (stdout, step records, eval records)."""
    shutil.rmtree(os.path.join(work, run_dir), ignore_errors=True)  # a fresh run, never a resume
    p = script("train.py", os.path.join(ROOT, "config", config), "--dataset=stdlib", f"--out_dir={run_dir}",
               "--init_from=scratch", f"--device={device}", *args, torchrun=torchrun, timeout=timeout)
    steps, evals = records(run_dir)
    if not steps or not evals or not all(math.isfinite(r["val_bpb"]) for r in evals):
        raise Failed(f"train.py logged {len(steps)} steps and {len(evals)} evaluations: {last_line(p.stdout)}")
    return p.stdout, steps, evals


def data():
    """prepare.py --dataset=stdlib in the work folder: its data card (card.json)."""
    def make():
        vocab = 512 if quick else 50257
        script("prepare.py", "--dataset=stdlib", f"--vocab_size={vocab}", timeout=300)
        with open(os.path.join(work, "data", "stdlib", "card.json")) as f:
            card = json.load(f)
        return card
    return S.once("data", make)


def fp16_run():
    """train_fp16's run, whose checkpoint sample, eval and serve read: (stdout, step records, eval records)."""
    def make():
        data()
        shape = [*TINY, "--max_iters=60", "--eval_interval=60", "--log_interval=10", "--eval_iters=2"] if quick \
            else ["--max_iters=500", "--eval_interval=500", "--log_interval=50", "--eval_iters=10"]
        return train_run("run_fp16", "quickstart.py", *shape, "--dtype=float16", "--compile=False")
    return S.once("the train_fp16 run", make)


def subject():
    """The run folder of the model that sample, eval and serve read."""
    fp16_run()
    return "run_fp16"


def reference():
    """decode.generate's greedy text after PROMPT on the CPU in float32, the subject's best checkpoint: what
    every script must write. Cut at <|endoftext|>, as every script cuts it."""
    def make():
        from checkpoint import open_model
        from decode import generate
        opened = open_model(os.path.join(work, subject()))
        tok, ids = opened.tokenizer, opened.tokenizer.encode(PROMPT, allowed_special="all")
        y = generate(opened.model, torch.tensor([ids]), NEW_TOKENS, temperature=0.0,
                     eos_token=tok.eot_token)[0, len(ids):].tolist()
        y = y[:y.index(tok.eot_token)] if tok.eot_token in y else y
        if len(y) < MIN_TOKENS or len(set(y)) < 2:  # an empty or constant text would agree with anything
            raise Failed(f"the reference, {tok.decode(y)!r}, is too short or one token repeated to compare texts")
        return tok.decode(y), len(y)
    return S.once("the CPU reference text", make)


def agreement(text, ref):
    """How far a 16-bit run's greedy text follows the float32 one: a 16-bit sum can flip a near tie."""
    if text == ref:
        return "same text"
    same = next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
    return f"same first {same} of {len(ref)} characters"


def compare(what, text):
    ref, n = reference()
    if text != ref:
        raise Failed(f"{what}: {text[:60]!r}... differs from decode.generate on the CPU: {ref[:60]!r}...")
    return n


def sample_text(dtype):
    p = script("sample.py", f"--model={subject()}", f"--start={PROMPT}", f"--max_new_tokens={NEW_TOKENS}",
               "--temperature=0", f"--device={device}", f"--dtype={dtype}", timeout=120)
    if not (p.stdout.startswith(PROMPT) and p.stdout.endswith("\n")):
        raise Failed(f"sample.py's output does not start with the prompt: {p.stdout[:80]!r}")
    return p.stdout[len(PROMPT):-1]  # it writes the prompt, the new text, and a newline


def eval_report(dtype):
    """eval.py on the subject's val shards with the prompt to complete, in dtype: its results JSON."""
    def make():
        with open(os.path.join(work, "prompts.jsonl"), "w") as f:
            f.write(json.dumps({"prompt": PROMPT}) + "\n")
        out = os.path.join(work, f"eval_{dtype}.json")
        script("eval.py", f"--model={subject()}", f"--limit={2 if quick else 20}", "--prompts=prompts.jsonl",
               f"--max_new_tokens={NEW_TOKENS}", f"--device={device}", f"--dtype={dtype}", f"--out={out}",
               timeout=180)
        with open(out) as f:
            return json.load(f)
    return S.once(f"eval.py in {dtype}", make)


def serve_text(dtype):
    """serve.py on a free port: the greedy completion of PROMPT over HTTP (OpenAI's /v1/completions)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--model={subject()}", "--port=0",
                          "--model_name=gpu_check", f"--device={device}", f"--dtype={dtype}"], cwd=work, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:  # it prints its port once it listens
            found = re.search(r"listening on (http://[0-9.]+:\d+)", "".join(err))
            url = found and found.group(1)
            if url is None and p.poll() is not None:
                raise Failed(f"serve.py exited {p.returncode}: {last_line(''.join(err))}")
            if url is None and time.monotonic() > deadline:
                raise Failed("serve.py did not listen within 120 s")
            time.sleep(0.1)
        body = {"model": "gpu_check", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0.0}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy
        try:
            with opener.open(request, timeout=120) as r:
                return json.load(r)["choices"][0]["text"]
        except urllib.error.HTTPError as e:
            raise Failed(f"serve.py answered {e.code}: {e.read()[:200]!r}") from None
    finally:
        p.terminate()  # SIGTERM: it drains (nothing in flight) and exits
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def model_shape():
    """GPT-2 124M (12 x 768, 12 heads, context 1024, GPT-2's vocabulary), or a tiny gpt2 with quick."""
    from model import GPTConfig
    return GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=512) if quick \
        else GPTConfig.preset("gpt2")


def free_memory():
    gc.collect()
    if S.cuda:
        torch.cuda.empty_cache()


# ---- the checks: each returns its line's text, or raises Failed / Skipped ----------------------------

def check_data():
    card = data()
    return (f"prepare.py --dataset=stdlib: {card['tokens']['train']:,} train + {card['tokens']['val']:,} val tokens, "
            f"{card['tokenizer']['vocab_size']:,}-token BPE")


KERNELS = (("flash", "flash_attention"), ("efficient", "efficient_attention"), ("cudnn", "cudnn_attention"),
           ("math", "attention_math"))  # SDPA's backends and the op name each runs under (aten::_scaled_...)


def check_sdpa():
    from model import GPT
    config = model_shape()
    model = GPT(config).to(S.dev).train()  # dropout 0: the training call, is_causal and no mask
    x = torch.randint(0, config.vocab_size, (2, config.block_size), device=S.dev)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the CPU side names the ATen op dispatched
        with autocast(S.device_type, S.ptdtype):
            _, loss = model(x, x)
        loss.backward()
    ops = sorted({e.name for e in prof.events() if "::_scaled_dot_product" in e.name and "backward" not in e.name})
    used = [k for k, op in KERNELS if any(op in name for name in ops)]
    del model, loss
    free_memory()
    # each fused backend alone, at the model's shape (B, nh, T, hd), forward and backward
    hd, probes = config.n_embd // config.n_head, []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        q, k, v = (torch.randn(2, config.n_head, config.block_size, hd, device=S.dev, dtype=S.ptdtype,
                               requires_grad=True) for _ in range(3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                probes.append(f"{name} runs")
            except RuntimeError:  # torch's warnings say why: "... not used because:", then the reasons
                why = [str(w.message) for w in caught if not str(w.message).rstrip().endswith("because:")]
                probes.append(f"{name} refused ({' '.join(' '.join(why).split())[:100] or 'no reason given'})")
    shape = f"(B, {config.n_head}, {config.block_size}, {hd}) {S.dtype}"
    detail = f"{'+'.join(used) or 'none'}: the model's forward ran {', '.join(ops) or 'no SDPA op'} at {shape}; " \
             f"alone, {', '.join(probes)}"
    if not used or "math" in used:
        raise Failed(detail + "; the math fallback materialises the (T, T) matrix")
    return detail


def check_grad_checkpoint():
    if not S.cuda:
        raise Skipped("needs CUDA's allocator (torch.cuda.max_memory_allocated); the CPU keeps no such count")
    from model import GPT
    config = model_shape()
    model = GPT(config).to(S.dev).train()
    x = torch.randint(0, config.vocab_size, (8, config.block_size), device=S.dev)

    def peak(model, on):  # bytes one training step allocates above the weights, at its highest
        model.config.grad_checkpoint = on
        model.zero_grad(set_to_none=True)
        free_memory()
        torch.cuda.reset_peak_memory_stats(S.dev)
        base = torch.cuda.memory_allocated(S.dev)
        with autocast(S.device_type, S.ptdtype):
            _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize(S.dev)
        return torch.cuda.max_memory_allocated(S.dev) - base

    for on in (False, True):  # the first steps allocate cuBLAS workspaces: not what either costs
        peak(model, on)
    plain, checkpointed = peak(model, False), peak(model, True)
    del model
    free_memory()
    saved = 1 - checkpointed / plain
    detail = f"saves {saved:.0%}: {plain / 2**20:,.0f} MiB plain, {checkpointed / 2**20:,.0f} MiB checkpointed " \
             f"(peak above the weights, one step of 8 x {config.block_size}, {S.dtype})"
    if saved < 0.2:
        raise Failed(detail)
    return detail


def check_train_speed():
    data()
    if quick:  # float32 and eager: compiling takes a minute, and a CPU has no fast 16-bit matmuls
        dtype, shape = "float32", [*TINY, "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=20",
                                   "--eval_interval=20", "--log_interval=5", "--warmup_iters=5", "--compile=False"]
    else:  # bfloat16 and torch.compile are config/gpt2_124m.py's own; 131,072 tokens a step
        dtype, shape = "bfloat16", ["--batch_size=32", "--gradient_accumulation_steps=4", "--max_iters=40",
                                    "--eval_interval=40", "--log_interval=10", "--warmup_iters=10"]
    out, steps, _ = train_run("run_124m", "gpt2_124m.py", *shape, f"--dtype={dtype}", "--eval_iters=2",
                              timeout=420)
    if "running without torch.compile" in out:
        raise Failed(next(line for line in out.splitlines() if "running without torch.compile" in line))
    timed = steps[1:] or steps  # the first log interval holds the compile
    tokens_s = statistics.median(r["tokens_per_s"] for r in timed)
    params = re.search(r"model: ([\d,]+) parameters", out).group(1)
    what = f"{params} parameters, {dtype}, {'eager' if quick else 'torch.compile'}, " \
           f"{statistics.median(r['ms_per_step'] for r in timed):,.0f} ms/step"
    if not S.cuda:
        return f"{tokens_s:,.0f} tokens/s ({what}; no MFU: device.peak_flops is for GPUs)"
    name = torch.cuda.get_device_name(S.dev)
    if "mfu" not in steps[-1]:
        return f"{tokens_s:,.0f} tokens/s ({what}; no MFU: {name} is not in device.PEAK_FLOPS)"
    mfu = statistics.median(r["mfu"] for r in timed)
    return f"MFU {mfu:.1%}, {tokens_s:,.0f} tokens/s ({what}; {name}'s {dtype} peak " \
           f"{peak_flops(name, dtype) / 1e12:,.0f} TFLOP/s)"


def check_train_fp16():
    from checkpoint import load
    _, steps, evals = fp16_run()
    first, last = steps[0], steps[-1]
    scaler = load(os.path.join(work, subject(), "best.pt"))["scaler"]  # {} unless the GradScaler was on
    detail = f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at {last['step']}, val " \
             f"{evals[-1]['val_bpb']:.3f} bits/byte; GradScaler scale {scaler.get('scale', 'none (off)')}"
    if not scaler or not last["loss"] < first["loss"]:
        raise Failed(detail)
    return detail


def check_parallel(mode):
    data()
    shape = [*TINY, "--dtype=float32"] if quick else ["--dtype=bfloat16"]
    _, steps, evals = train_run(f"run_{mode}", "quickstart.py", *shape, f"--parallel={mode}", "--max_iters=20",
                                "--eval_interval=20", "--eval_iters=2", "--log_interval=10", torchrun=True,
                                timeout=240)
    return f"torchrun --nproc_per_node=1 --parallel={mode}: {steps[-1]['step']} steps, loss " \
           f"{steps[-1]['loss']:.3f}, val {evals[-1]['val_bpb']:.3f} bits/byte"


def sixteen_bits(run):
    """The device's own dtype (auto), when it is not float32: run it; reported, not compared exactly."""
    if S.dtype == "float32":
        return f"auto is float32 on {S.dev}"
    return f"{S.dtype}: {agreement(run(S.dtype), reference()[0])}"


def check_sample():
    n = compare("sample.py", sample_text("float32"))
    return f"float32 on {S.dev}: equal to decode.generate on the CPU ({n} tokens); {sixteen_bits(sample_text)}"


def check_eval():
    n = compare("eval.py", eval_report("float32")["completions"][0]["completion"])
    return f"float32 on {S.dev}: equal to decode.generate on the CPU ({n} tokens); " \
           f"{sixteen_bits(lambda dtype: eval_report(dtype)['completions'][0]['completion'])}"


def check_eval_scores():
    low = S.dtype if S.dtype != "float32" else "bfloat16"  # the CPU: bf16 autocast, as a GPU would run it
    exact, rough = ({r["metric"]: r["value"] for r in eval_report(d)["results"]} for d in ("float32", low))
    diffs = {k: rough[k] - exact[k] for k in ("nats_per_token", "bits_per_byte")}
    detail = f"{low} vs float32 on {S.dev}: " + ", ".join(f"{k} {exact[k]:.4f} {diffs[k]:+.1e}" for k in diffs) + \
             f" over {eval_report('float32')['results'][0]['count']:,} tokens"
    if max(map(abs, diffs.values())) > 1e-3:
        raise Failed(detail + " (more than 1e-3)")
    return detail


def check_serve():
    n = compare("serve.py", serve_text("float32"))
    return f"float32 on {S.dev}: equal to decode.generate on the CPU ({n} tokens); {sixteen_bits(serve_text)}"


def check_quantized():
    import quantize
    from bpe import Tokenizer
    from model import GPT, GPTConfig
    data()
    tok = Tokenizer.load(os.path.join(work, "data", "stdlib", "tokenizer.bpe"))
    q = quantize.quantize(GPT(GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=64, block_size=64,
                                               vocab_size=tok.vocab_size)), "int8")
    target = S.dev if S.cuda else "cuda"  # on the CPU too: the refusal comes before anything touches a GPU
    try:
        for_inference(q, target, "cuda", torch.bfloat16)
        raise Failed(f"device.for_inference moved int8 weights to {target}")
    except ValueError as e:
        said = str(e)
    if "\n" in said or "--device=cpu" not in said:
        raise Failed(f"device.for_inference's refusal is not one line naming --device=cpu: {said!r}")
    if not S.cuda:
        return "device.for_inference refuses int8 weights for cuda in one line (the scripts' refusal needs a GPU)"
    quantize.save_quantized(q, os.path.join(work, "int8.pt"), tok)
    for name, extra in (("sample.py", []), ("eval.py", []), ("serve.py", ["--port=0"])):
        p = launch(name, "--model=int8.pt", f"--device={device}", *extra, timeout=120)
        said = p.stderr.strip().splitlines()
        if p.returncode != 1 or len(said) != 1 or not said[0].startswith("error: ") or "--device=cpu" not in said[0]:
            raise Failed(f"{name} with int8 weights on {device}: exit {p.returncode}, not one error line naming "
                         f"--device=cpu: {p.stderr.strip()[-300:]!r}")
    return f"for_inference, sample.py, eval.py and serve.py each refuse int8 weights on {device} in one line"


CHECKS = [("data", check_data), ("sdpa", check_sdpa), ("grad_checkpoint", check_grad_checkpoint),
          ("train_speed", check_train_speed), ("train_fp16", check_train_fp16), ("sample", check_sample),
          ("eval", check_eval), ("eval_scores", check_eval_scores), ("serve", check_serve),
          ("ddp", lambda: check_parallel("ddp")), ("fsdp", lambda: check_parallel("fsdp")),
          ("quantized", check_quantized)]


def run_checks(checks):
    """Run each (name, function), printing its line as it ends; returns the number that failed."""
    failed = 0
    for name, check in checks:
        t0 = time.time()
        try:
            status, detail = "PASS", check()
        except Failed as e:
            status, detail = "FAIL", str(e)
        except Skipped as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # a check's own bug, or the library's: the line says which, the run goes on
            status, detail = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        failed += status == "FAIL"
        print(f"{name:<16} {status}  {detail} [{time.time() - t0:.0f} s]", flush=True)
    return failed


def main(argv=None):
    global S, work
    configure(globals(), argv)
    if device.startswith("cpu") and not quick:
        raise UserError("device=cpu would train GPT-2 124M for minutes a step: add --quick=True (tiny sizes)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but torch sees no CUDA GPU; --device=cpu --quick=True runs the checks "
                        f"a CPU can")
    S = Setup()
    what = ""
    if S.cuda:
        major, minor = torch.cuda.get_device_capability(S.dev)
        what = f" ({torch.cuda.get_device_name(S.dev)}, capability {major}.{minor}, CUDA {torch.version.cuda})"
    print(f"gpu_check on {S.dev}{what}, torch {torch.__version__}, {S.dtype}{', quick' if quick else ''}",
          flush=True)
    temporary = not work
    work = os.path.abspath(work or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    try:
        failed = run_checks(CHECKS)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} checks passed or skipped, {failed} failed, "
          f"in {time.time() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run(main)
