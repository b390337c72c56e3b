"""
sample.py: write text with a model trained by train.py, or with OpenAI's GPT-2 weights.

    python sample.py --model=out-quickstart                        # best checkpoint of a run
    python sample.py --model=out-quickstart --ckpt=last --start="def fib(n):"
    python sample.py --model=gpt2 --start=FILE:prompt.txt --top_p=0.9
    python sample.py --model=gpt2-xl --draft=gpt2 --temperature=0         # speculative decoding

A checkpoint carries its own tokenizer (train.py embeds the .bpe file's text), so nothing else needs
pointing at. Tokens are printed the moment they are generated: decode.generate_stream keeps a KV cache,
so each step runs the model on one new token instead of the whole sequence. With --draft, a smaller
model guesses --draft_k tokens and the model checks them in one forward (speculative.py): the same text
in distribution (greedy: the same text), sooner when the draft is much cheaper. A token can end in the
middle of a multi-byte UTF-8 character, so bytes go through an incremental decoder that holds back an
unfinished character until its last byte arrives. Same seed, same settings, same machine, same text.
--compile=True compiles the one-token decode step first (decode.py), once, then decodes faster; with
--draft, the steps of both models.
"""
import codecs
import sys
import time

import torch

from checkpoint import OLD_MODEL_FLAGS, open_model
from configurator import UserError, configure, run
from decode import Decoder, generate_stream, sampling_problem
from device import autocast, compile_problem, for_inference, pick_device
from speculative import SpeculativeDecoder, check_draft

# ---- settings (override with a config file and/or --key=value) -----------------------------------
model = "out"              # a run directory (train.py's default out_dir) | a .pt file | 'gpt2', 'gpt2-medium',
                           # ... | a Hugging Face directory (export.py's): the same in sample, eval, export, serve
ckpt = "best"              # in a run directory: 'best' (lowest val loss) | 'last' (newest) | a file name in it
start = ""                 # the prompt; "" starts a fresh document; FILE:path reads the prompt from a file
num_samples = 1            # samples, one after another
max_new_tokens = 300       # tokens to generate per sample
temperature = 0.8          # < 1 sharpens the distribution, > 1 flattens it, 0 is greedy
top_k = 200                # sample among the k likeliest tokens only (None: all)
top_p = None               # nucleus sampling: the smallest set with probability >= top_p (None: off)
stop_at_eot = True         # end a sample at <|endoftext|>, where the model thinks the document ends
seed = 1337                # the same seed, settings and machine: the same text
device = "auto"            # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"             # 'auto' = bfloat16 on GPUs with bf16 tensor cores, float16 on older GPUs,
                           # float32 on CPU | 'float32' | 'bfloat16' | 'float16'
compile = False            # compile the decode step first (seconds, said once) for faster tokens (decode.py)
draft = ""                 # speculative decoding: a smaller model with the same tokenizer, any --model form
draft_k = 4                # tokens the draft proposes per round (speculative.py)
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    configure(globals(), argv, renamed=OLD_MODEL_FLAGS)
    # every setting is checked before anything is loaded or written
    if num_samples < 1 or max_new_tokens < 1:
        raise UserError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must be at least 1")
    if problem := sampling_problem(temperature, top_k, top_p):
        raise UserError(problem[1])
    if type(draft_k) is not int or draft_k < 1:
        raise UserError(f"draft_k={draft_k!r}: the draft must propose an int >= 1 tokens per round")
    prompt = start
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {prompt[5:]}: {getattr(e, 'strerror', None) or e}")
    dev, device_type, ptdtype = pick_device(device, dtype)
    torch.manual_seed(seed)  # on CPU and every GPU: the same seed gives the same samples

    opened = open_model(model, ckpt)
    if draft:  # a draft of another vocabulary is refused before anything is printed
        drafted = open_model(draft)
        check_draft(opened, drafted)
    gpt, tok = for_inference(opened.model, dev, device_type, ptdtype), opened.tokenizer
    print(f"sampling {opened.description}: {gpt.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"{tok.name} tokenizer, on {dev} in {str(ptdtype).removeprefix('torch.')}", file=sys.stderr)
    spec = None
    if draft:
        spec = SpeculativeDecoder(gpt, for_inference(drafted.model, dev, device_type, ptdtype), draft_k)
        print(f"drafting {draft_k} tokens a round with {drafted.description}: "
              f"{spec.draft.num_params(non_embedding=False) / 1e6:.2f}M parameters", file=sys.stderr)
    decoder = None
    if compile and compile_problem(device_type):
        print(f"warning: {compile_problem(device_type)}; sampling without torch.compile", file=sys.stderr)
    elif compile and spec:
        spec.compile(device_type)
    elif compile:
        decoder = Decoder(gpt, device_type)

    # an empty prompt begins a new document: prepare.py puts <|endoftext|> before every document
    ids = tok.encode(prompt, allowed_special="all") if prompt else [tok.eot_token]
    block_size = gpt.config.block_size
    if len(ids) >= block_size:  # keep room for at least one new token inside the context
        print(f"warning: the prompt is {len(ids)} tokens, the model's context is {block_size}; "
              f"keeping its last {block_size - 1} tokens", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    x = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    if decoder or spec and spec.decoders:  # paid here, before the generation that is timed
        with autocast(device_type, ptdtype):
            seconds = decoder.warm_up(decoder.cache(1, len(ids) + max_new_tokens)) if decoder else \
                spec.warm_up(1, len(ids) + max_new_tokens)
        print(f"compiling the decode step{'s' if spec else ''}: {seconds:.0f} s, once", file=sys.stderr)

    eot = tok.eot_token if stop_at_eot else None
    for i in range(num_samples):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back split characters
        sys.stdout.write(prompt)
        n, t0 = 0, time.time()
        with autocast(device_type, ptdtype):
            # row 0 of each step's (1, 1) token, or of each speculative round's 1 to draft_k + 1 tokens
            stream = spec.generate_stream(x, max_new_tokens, temperature, top_k, top_p, eot) if spec else \
                generate_stream(gpt, x, max_new_tokens, temperature, top_k, top_p, eot, decoder)
            for t in (t for new in stream for t in new[0].tolist()):
                n += 1
                if t == eot:
                    break
                sys.stdout.write(text.decode(tok.decode_bytes([t])))
                sys.stdout.flush()
        sys.stdout.write(text.decode(b"", final=True) + "\n")
        if i < num_samples - 1:
            sys.stdout.write("-" * 40 + "\n")
        dt = time.time() - t0
        accepted = f", {spec.acceptance:.0%} of draft tokens accepted" if spec else ""
        print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s{accepted}]", file=sys.stderr)


if __name__ == "__main__":
    run(main)
