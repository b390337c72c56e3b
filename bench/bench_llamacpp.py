"""
bench/bench_llamacpp.py: our decoding against llama.cpp's, on the same model and this CPU. Greedy tokens/s
at batch 1 and 16, our float32 and int8 (quantize.py) beside llama.cpp's f32 and q8_0 of the same GGUF
export (export.py --format=gguf), for each way we decode:
  - eager: decode.generate, what sample.py runs by default;
  - compiled: decode.Decoder, sample.py --compile=True;
  - speculative: speculative.py with a draft (a run over the same tokenizer), sample.py --draft=RUN;
  - compiled + speculative: both;
and the seconds the compile takes on a first start (an empty inductor cache) and on a warm one.

llama.cpp runs as its own benchmark program, llama-batched-bench, built from the source package that
bench_gguf.py builds (it has no binary wheel here, so it stays out of CI):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B llbuild -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
        -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build llbuild --target llama-batched-bench -j
    python bench/bench_llamacpp.py --llama=llbuild/bin/llama-batched-bench \\
        --models=out-quickstart,out-6x384,gpt2 --drafts=out-6x384=out-quickstart

A model is a run (trained weights and their tokenizer) or "gpt2": GPT-2 124M's shape (12 layers, 768 wide,
50,257 tokens) with random weights, since the speed of a step does not depend on what the weights say. Its
export needs a tokenizer, and tiktoken's GPT-2 vocabulary needs a download, so it gets a 50,257-token BPE
trained here on the stdlib corpus (cached in --work).

Both programs decode new_tokens tokens after prompt_tokens prompt tokens in each of `batch` rows, one prompt
per row, with `threads` threads, and tokens/s is rows x new tokens over the whole generation's wall time,
prompt included (llama.cpp: its T_PP + T_TG). llama.cpp feeds random tokens and reads no logits; ours
are windows of model.py's text (random ids for "gpt2"), so that a draft has something to agree with.
Ours run in fresh processes, two per (model, batch) sharing a new inductor cache: the first compiles
from nothing, the second finds inductor's FX graph cache filled (a warm start); both time the compiled
generation, and the table gives both figures, whose spread is the run-to-run noise. int8 runs eager only:
torch.compile cannot trace quantize.py's int8 Linear (decode.Decoder refuses it).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchlib import ROOT, timed  # first: it puts the repository root on sys.path for the imports below
from atomic import atomic_write
from bpe import Tokenizer
from checkpoint import open_model
from configurator import configure, run
from decode import Decoder, generate
from model import GPT, GPTConfig
from quantize import quantize
from speculative import SpeculativeDecoder, check_draft
from training import checkpoint_entries

llama = ""                         # the llama-batched-bench program (see above)
models = "out-quickstart,gpt2"     # runs, or "gpt2" (random weights), comma separated
drafts = ""                        # TARGET=DRAFT,...: the draft each target's speculative columns use
draft_k = 3                        # tokens the draft proposes a round
batches = (1, 16)
prompt_tokens = 16
new_tokens = 96                    # prompt + new fit the quick start's 128-token context
threads = 2
work = "out-llamacpp"              # the exports and the gpt2 stand-in, kept between runs
one = ""                           # internal: "model,batch,first" measured in this process, printed as JSON


def gpt2_random():
    """A checkpoint of GPT-2 124M's shape, random weights, with a 50,257-token BPE: its path."""
    path = os.path.join(work, "gpt2-random.pt")
    if not os.path.exists(path):
        import prepare
        os.makedirs(work, exist_ok=True)
        t0 = time.perf_counter()
        tok = Tokenizer.train((text for text, _ in prepare._stdlib_docs()), 50257)
        print(f"  trained a {tok.vocab_size:,}-token BPE on stdlib for the gpt2 shape in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        torch.manual_seed(0)
        gpt = GPT(GPTConfig.preset("gpt2", vocab_size=tok.vocab_size))
        state = checkpoint_entries(gpt.config, 0, tok, {}, model=gpt.state_dict())
        atomic_write(path, lambda f: torch.save(state, f))
    return path


def source(name):
    return gpt2_random() if name == "gpt2" else name


def prompts(name, tok, batch):
    """(batch, prompt_tokens) ids: windows of model.py's text, or random ids for the random model."""
    if name == "gpt2":
        return torch.randint(0, tok.vocab_size, (batch, prompt_tokens),
                             generator=torch.Generator().manual_seed(0))
    ids = tok.encode(open(os.path.join(ROOT, "model.py")).read())
    return torch.tensor([ids[i * 53:i * 53 + prompt_tokens] for i in range(batch)])


def measure(name, batch, first):
    """This process's figures for one model and batch (see the docstring); `first`: also the eager ones."""
    torch.set_num_threads(threads)
    target, draft = open_model(source(name)), dict(d.split("=") for d in drafts.split(",") if d).get(name)
    if draft is not None:
        draft = open_model(draft)
        check_draft(target, draft)
    x, r, gpt = prompts(name, target.tokenizer, batch), {}, target.model.eval()
    with torch.inference_mode():
        if first:
            ref, r["eager"] = timed(lambda n: generate(gpt, x, n, temperature=0), new_tokens)
            small = quantize(gpt, "int8")
            _, r["int8_eager"] = timed(lambda n: generate(small, x, n, temperature=0), new_tokens)
        decoder = Decoder(gpt, "cpu")
        r["compile_s"] = decoder.warm_up(decoder.cache(batch, prompt_tokens + new_tokens))
        out, r["compiled"] = timed(lambda n: generate(gpt, x, n, temperature=0, decoder=decoder), new_tokens)
        if first:
            r["same"] = torch.equal(out, ref)
        if draft is not None:
            spec = SpeculativeDecoder(gpt, draft.model.eval(), draft_k)
            if first:
                out, r["spec"] = timed(lambda n: spec.generate(x, n, temperature=0), new_tokens)
                r["acceptance"], r["same"] = spec.acceptance, r["same"] and torch.equal(out, ref)
                spec8 = SpeculativeDecoder(small, quantize(draft.model, "int8"), draft_k)
                _, r["int8_spec"] = timed(lambda n: spec8.generate(x, n, temperature=0), new_tokens)
            spec.compile("cpu")
            r["spec_compile_s"] = spec.warm_up(batch, prompt_tokens + new_tokens)
            out, r["spec_compiled"] = timed(lambda n: spec.generate(x, n, temperature=0), new_tokens)
            if first:
                r["same"] = r["same"] and torch.equal(out, ref)
    return r


def ours(name, batch):
    """(first start's figures, warm start's), each from a fresh process, sharing a new inductor cache."""
    results = []
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
        for first in (1, 0):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={name},{batch},{first}",
                                f"--drafts={drafts}", f"--draft_k={draft_k}", f"--threads={threads}",
                                f"--prompt_tokens={prompt_tokens}", f"--new_tokens={new_tokens}", f"--work={work}"],
                               env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{name} batch {batch} failed:\n{p.stderr[-3000:]}")
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return results


def theirs(name, kind):
    """{batch: tokens/s} of llama-batched-bench on the model's GGUF export of storage type kind."""
    out = os.path.join(work, os.path.basename(os.path.normpath(name)))
    path = os.path.join(out, f"model-{kind}.gguf")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--model={source(name)}", "--format=gguf",
                        f"--gguf_type={kind}", f"--hf_dir={out}", "--check=False"], check=True, capture_output=True)
    p = subprocess.run([llama, "-m", path, "-c", str(max(batches) * (prompt_tokens + new_tokens)), "-b", "2048",
                        "-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)),
                        "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"],
                       capture_output=True, text=True)
    lines = [json.loads(s) for s in p.stdout.splitlines() + p.stderr.splitlines() if s.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"llama-batched-bench failed on {path}:\n{p.stderr[-3000:]}")
    return {r["pl"]: r["pl"] * r["tg"] / r["t"] for r in lines}


def rows(name, batch, first, warm, llama_tps):
    """The table's two lines (float32, int8) for a model and batch. The compiled columns give both processes'
    tokens/s (first start / warm start): the same kernels, so their spread is the run-to-run noise."""
    f = lambda key, r=first: f"{r[key]:,.0f}" if key in r else "-"  # noqa: E731
    both = lambda key: f"{f(key)} / {f(key, warm)}" if key in first else "-"  # noqa: E731
    spec = f"{f('spec')} ({first['acceptance']:.0%})" if "spec" in first else "-"
    compile_s = f"{first['compile_s']:.0f} / {warm['compile_s']:.0f}"
    if "spec_compile_s" in first:
        compile_s += f"; speculative {first['spec_compile_s']:.0f} / {warm['spec_compile_s']:.0f}"
    return [f"| {name} | {batch} | float32 | {f('eager')} | {both('compiled')} | {spec} | {both('spec_compiled')} | "
            f"**{llama_tps['f32'][batch]:,.0f}** (f32) | {compile_s} | {'yes' if first['same'] else 'NO'} |",
            f"| {name} | {batch} | int8 | {f('int8_eager')} | - | {f('int8_spec')} | - | "
            f"**{llama_tps['q8_0'][batch]:,.0f}** (q8_0) | | |"]


def main(argv=None):
    configure(globals(), argv)
    if one:
        name, batch, first = one.split(",")
        print(json.dumps(measure(name, int(batch), first == "1")))
        return
    if not llama or not os.path.exists(llama):
        raise SystemExit("pass --llama=PATH of llama-batched-bench (built as this file's docstring says)")
    print(f"bench_llamacpp: {new_tokens} greedy tokens after {prompt_tokens} prompt tokens per row, {threads} "
          f"threads, torch {torch.__version__}, draft k {draft_k}", flush=True)
    table = []
    for name in models.split(","):
        llama_tps = {kind: theirs(name, kind) for kind in ("f32", "q8_0")}
        for batch in batches:
            first, warm = ours(name, batch)
            print(f"  {name} batch {batch}: ours {json.dumps(first)}, warm {json.dumps(warm)}, llama.cpp "
                  f"f32 {llama_tps['f32'][batch]:.0f}, q8_0 {llama_tps['q8_0'][batch]:.0f}", flush=True)
            table += rows(name, batch, first, warm, llama_tps)
    print("\n| model | batch | weights | eager | compiled | speculative (accepted) | compiled + speculative | "
          "llama.cpp | compile s, first / warm start | greedy tokens equal |")  # compiled: both processes' figures
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    run(main)
