"""
bench/bench_gguf.py: our GGUF exports in llama.cpp itself, through llama-cpp-python, which has no binary
wheel here: its source package builds llama.cpp with cmake and the C++ compiler (minutes), so it stays
out of requirements and out of CI. In a virtual environment of its own:

    python3 -m venv .llvenv && .llvenv/bin/pip install llama-cpp-python -r requirements.txt
    .llvenv/bin/python bench/bench_gguf.py --model=out-quickstart

For each storage type (f32, f16, q8_0, q4_0) it exports the run with export.py --format=gguf, loads the
file in llama.cpp and checks, on prompts of the run's own kind of text:
  - llama.cpp's tokenizer gives our ids (the pre-tokenizer named in the file's metadata);
  - at f32, llama.cpp's greedy continuation equals decode.generate's, token for token (at the other types
    the share of equal tokens is printed: rounding the weights may flip a near tie);
  - tokens per second of greedy decoding at batch 1 (llama.cpp is one stream), against our decode.generate
    in float32 (what sample.py runs) and int8 (quantize.py), with the same threads, prompts and lengths.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchlib import ROOT  # first: it puts the repository root on sys.path for the imports below
from checkpoint import open_model
from configurator import configure, run
from decode import generate
from quantize import quantize

model = "out-quickstart"   # a run (or any --model export.py takes) of the modern or gpt2 preset
types = "f32,f16,q8_0,q4_0"
threads = 2
new_tokens = 128
PROMPTS = ["def ", "import os\n", "class Node:\n    def __init__(self", "    for i in range(", "# Copyright"]


def ours_tokens_per_s(gpt, tok):
    """Greedy decoding at batch 1, as sample.py does it; (tokens/s, the continuation of PROMPTS[0])."""
    done, t0, first = 0, time.perf_counter(), None
    for p in PROMPTS:
        x = torch.tensor([tok.encode(p)])
        out = generate(gpt, x, new_tokens, temperature=0)[0, x.size(1):].tolist()
        first = first or out
        done += len(out)
    return done / (time.perf_counter() - t0), first


def main(argv=None):
    configure(globals(), argv)
    import llama_cpp  # the benchmark's own dependency, see the docstring
    torch.set_num_threads(threads)
    opened = open_model(model)
    gpt, tok = opened.model, opened.tokenizer
    print(f"bench_gguf: {opened.description}, {gpt.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"{threads} threads, {new_tokens} greedy tokens per prompt, llama-cpp-python {llama_cpp.__version__}")
    with torch.inference_mode():
        f32_tps, want = ours_tokens_per_s(gpt, tok)
        int8_tps, _ = ours_tokens_per_s(quantize(gpt, "int8"), tok)
    rows = [("ours, float32 (sample.py)", f32_tps, "", ""), ("ours, int8 (quantize.py)", int8_tps, "", "")]
    texts = PROMPTS + ["naïve café — 你好 🚀 <|endoftext|> x  \t\n\n  y", open(os.path.join(ROOT, "model.py")).read()[:4000]]
    with tempfile.TemporaryDirectory() as work:
        for kind in types.split(","):
            subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--model={model}", "--format=gguf",
                            f"--gguf_type={kind}", f"--hf_dir={work}", "--check=False"], check=True)
            path = os.path.join(work, f"model-{kind}.gguf")
            llm = llama_cpp.Llama(path, n_ctx=gpt.config.block_size, n_threads=threads, n_batch=512,
                                  verbose=False)
            same_ids = all(llm.tokenize(t.encode(), add_bos=False, special=True) ==
                           tok.encode(t, allowed_special="all") for t in texts)
            done, t0, first = 0, time.perf_counter(), None
            for p in PROMPTS:
                llm.reset()
                out = []
                for t in llm.generate(tok.encode(p), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                    out.append(t)
                    if len(out) == new_tokens:
                        break
                first = first or out
                done += len(out)
            tps = done / (time.perf_counter() - t0)
            agree = sum(a == b for a, b in zip(first, want)) / len(want)
            rows.append((f"llama.cpp, {kind} ({os.path.getsize(path) / 1e6:.1f} MB)", tps,
                         "yes" if same_ids else "NO", f"{agree:.0%}"))
            print(f"  {rows[-1][0]}: {tps:.0f} tokens/s, tokenizer {'equal' if same_ids else 'DIFFERS'}, "
                  f"greedy tokens equal to ours: {agree:.0%}", flush=True)
            del llm
    print("\n| engine | tokens/s (batch 1) | tokenizer ids equal | greedy tokens equal |\n|---|---|---|---|")
    for name, tps, ids, agree in rows:
        print(f"| {name} | {tps:,.0f} | {ids or '-'} | {agree or '-'} |")


if __name__ == "__main__":
    run(main)
