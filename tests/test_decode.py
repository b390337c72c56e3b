"""decode.py: the compiled decode step gives eager decoding's greedy tokens for every model a GPTConfig
describes (test_model.MODEL_VARIANTS), through decode.generate and with rows at different lengths in one
padded batch (serve.py's engine); sample.py and serve.py with --compile=True give the text they give
without it. Each variant is compiled once, at a tiny size (a few seconds each on a CPU)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT
from decode import Decoder, bucket, generate
from model import GPT, KVCache
from test_model import MODEL_VARIANTS, spiky, tiny
from test_serve import PROMPTS, Server, greedy, make_run, one_torch_thread, tok  # noqa: F401  (fixtures)


def test_buckets_are_powers_of_two_up_to_the_most():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert [bucket(n, 12) for n in (5, 9, 12)] == [8, 12, 12]  # max_batch=12: the last bucket is 12 rows


@pytest.mark.parametrize("config", MODEL_VARIANTS, ids=str)
def test_compiled_steps_give_eager_greedy_tokens(config):
    """One compiled shape, 4 rows x 32 positions, serves both: generate on 4 prompts (also past the
    context, where every step is an eager prefill of the slid window), and 3 rows at lengths 3, 9 and 6
    decoding together beside an idle row, each equal to generate on its prompt alone."""
    torch.manual_seed(0)
    model = spiky(GPT(tiny(**{"block_size": 32, **config})))
    decoder = Decoder(model, "cpu")
    decoder.warm_up(decoder.cache(4, 32))
    prompts = torch.randint(0, 100, (4, 6))
    for n in (20, 40):  # 26 tokens fit the context; 46 slide past it
        eager = generate(model, prompts, n, temperature=0)
        assert torch.equal(generate(model, prompts, n, temperature=0, decoder=decoder), eager)

    rows = [torch.randint(0, 100, (1, n)) for n in (3, 9, 6)]
    alone = [generate(model, ids, 13, temperature=0)[0, ids.size(1):].tolist() for ids in rows]
    cache, tokens = decoder.cache(4, 32), []
    with torch.no_grad():
        for b, ids in enumerate(rows):  # each prompt prefilled alone, then copied into its row (as serve.py)
            one = KVCache(model.config.n_layer, 1, ids.size(1))
            tokens.append(model.head(model.hidden_states(ids, one)[:, -1]).argmax(-1))
            cache.copy_rows([b], one, [0])
        tokens = [torch.cat(tokens)[:, None]]  # (3, 1)
        for step in range(12):
            h = decoder(tokens[-1], cache, 9 + step)  # (3, 1, C): the longest row holds 9 + step tokens
            tokens.append(model.head(h[:, -1]).argmax(-1, keepdim=True))
    assert torch.cat(tokens, 1).tolist() == alone
    assert len({tuple(t) for t in alone}) == 3 and len(set(sum(alone, []))) > 5  # not one token repeated
    assert decoder.compiled == {(4, 1, id(cache))}  # one graph for all of it (a recompile would have raised)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"compiled its steps outside torch.inference_mode"):
        decoder(tokens[-1], cache, 21)  # the other grad mode would recompile: one line, before any work


def test_a_step_past_the_cache_or_int8_weights_are_value_errors_before_any_compiling():
    from quantize import quantize
    model = spiky(GPT(tiny("modern", block_size=64)))
    decoder = Decoder(model, "cpu")
    cache = decoder.cache(2, 16)  # 16 positions of the 64 the model can see
    with pytest.raises(ValueError, match=r"\(2, 1\) new tokens after 16 do not fit a KVCache of 2 rows x 16"):
        decoder(torch.zeros(2, 1, dtype=torch.long), cache, 16)
    assert decoder.compiled == set()
    with pytest.raises(ValueError, match="cannot trace quantize.py's int8 Linear"):
        Decoder(quantize(model, "int8"), "cpu")


@pytest.fixture(scope="module")
def small_run(workdir, tok):  # noqa: F811
    make_run(str(workdir / "out-decode"), tok, "modern", n_layer=2, n_embd=32, block_size=64)
    return workdir / "out-decode"


def test_sample_compiled_prints_the_same_text(workdir, small_run):
    def sample(*args):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model=out-decode", "--device=cpu",
                            "--temperature=0", "--max_new_tokens=40", "--start=def ", *args], cwd=workdir, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p
    eager, compiled = sample(), sample("--compile=True")
    assert compiled.stdout == eager.stdout and len(set(eager.stdout)) > 10
    assert "compiling the decode step: " in compiled.stderr and ", once" in compiled.stderr
    assert "compiling" not in eager.stderr


def test_serve_compiled_answers_as_generate(workdir, small_run, tok):  # noqa: F811
    """max_batch=4: a graph each for 1, 2 and 4 rows; three requests of different prompt lengths decode
    together (padded to 4 rows), each getting decode.generate's text."""
    import concurrent.futures
    from checkpoint import load_model
    model, _, _ = load_model(str(small_run))
    server = Server(workdir, "--model=out-decode", "--compile=True", "--max_batch=4")
    try:
        server.wait_ready(timeout=300)
        c = server.client()
        ask = lambda p: c.completions.create(model="out-decode", prompt=p, max_tokens=24,  # noqa: E731
                                             temperature=0).choices[0].text
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(ask, PROMPTS[:3]))
        assert texts == [greedy(model, tok, p, 24) for p in PROMPTS[:3]] and len(set(texts)) == 3
        assert "compiling the decode step: " in "".join(server.err)
    finally:
        server.stop()
