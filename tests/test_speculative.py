"""speculative.py: the target's text, sooner. Greedy speculative decoding equals decode.generate token for
token, for every GPTConfig variant as the target and for a draft that always agrees, one that often
does and one that seldom does (batch rows then accept different counts), with eos and past the context.
Sampled, the first two tokens have the target's own distribution (a chi-square test on an 8-token
vocabulary, which the draft's own distribution fails). sample.py --draft prints the same greedy text
and the acceptance rate; a draft with another tokenizer or vocabulary is one line of error."""
import copy
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch
from scipy.stats import chi2_contingency

import checkpoint
from bpe import Tokenizer
from configurator import UserError
from conftest import ENV, ROOT, error_line
from decode import generate
from model import GPT
from speculative import SpeculativeDecoder, check_draft
from test_model import MODEL_VARIANTS, PRESETS, spiky, tiny


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()  # tiny models: a second thread only contends (see test_model.py)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nudged(model, std=0.005):
    """A copy of model with every weight moved a little at random: a draft that agrees with it often."""
    model, g = copy.deepcopy(model), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def drafts(target):
    """{name: (draft, the range its greedy acceptance rate falls in)}: drafts that agree always, often, seldom."""
    torch.manual_seed(2)
    return {"itself": (target, (1.0, 1.0)), "nudged": (nudged(target), (0.4, 1.0)),
            "random": (GPT(tiny("gpt2", n_layer=1)).eval(), (0.0, 0.3))}


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_greedy_equals_the_targets_own(variant):
    config = {k: v for k, v in variant.items() if k != "name"}
    target = spiky(GPT(tiny(variant["name"], **config)))
    prompt = torch.randint(0, 100, (2, 3), generator=torch.Generator().manual_seed(0))
    ref = generate(target, prompt, 12, temperature=0.0)  # 15 of the context's 16 positions
    assert len(set(ref[:, 3:].flatten().tolist())) > 3  # varied text, not one token repeated
    for name, (draft, (lo, hi)) in drafts(target).items():
        spec = SpeculativeDecoder(target, draft, k=3)
        assert torch.equal(spec.generate(prompt, 12, temperature=0.0), ref), name
        assert lo <= spec.acceptance <= hi and spec.proposed >= 12, (name, spec.acceptance)


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_equals_the_targets_own_past_the_context_and_at_eos(name):
    target = spiky(GPT(tiny(name)))
    for draft, _ in drafts(target).values():
        spec = SpeculativeDecoder(target, draft, k=4)
        for prompt in (torch.tensor([[5]]), torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])):
            # 30 new tokens, context 16: the last ones come from the target alone, each over its window
            assert torch.equal(spec.generate(prompt, 30, top_k=1), generate(target, prompt, 30, top_k=1))
        prompt = torch.tensor([[5, 6, 7], [1, 2, 3]])
        ref = generate(target, prompt, 10, temperature=0.0)
        eos = ref[0, 5].item()  # the 3rd token of row 0; row 1 may stop elsewhere or not at all
        out = spec.generate(prompt, 10, temperature=0.0, eos_token=eos)
        assert torch.equal(out, generate(target, prompt, 10, temperature=0.0, eos_token=eos))
        assert (out[0, 5:] == eos).all() and (ref[0, 5:] != eos).any()  # row 0 stopped, padded with eos


@pytest.mark.parametrize("name", PRESETS)
def test_compiled_rounds_give_the_eager_rounds_tokens(name):
    """spec.compile: the target's (k + 1)-token chunk and the draft's 1- and 2-token reads run compiled on
    static caches, rows accepting different counts; the same tokens and acceptance as eager, each shape
    compiled once (a recompile raises), and past the context the eager tail."""
    target = spiky(GPT(tiny(name)))
    draft = nudged(target)
    prompt = torch.tensor([[5, 6, 7], [1, 2, 9]])
    eager = SpeculativeDecoder(target, draft, k=3)
    compiled = SpeculativeDecoder(target, draft, k=3)
    compiled.compile("cpu")
    compiled.warm_up(2, 3 + 20)
    for n in (8, 20):  # 11 and 23 tokens of a 16-token context: the second ends with the target alone
        ref = eager.generate(prompt, n, temperature=0.0)
        assert torch.equal(ref, generate(target, prompt, n, temperature=0.0))
        assert torch.equal(compiled.generate(prompt, n, temperature=0.0), ref)
        assert (compiled.proposed, compiled.accepted) == (eager.proposed, eager.accepted)
    assert 0 < eager.acceptance < 1  # both the accept and the reject path taken
    t, d = compiled.decoders
    assert len(t.compiled) == 1 and len(d.compiled) == 2  # 2 rows x 4 tokens; 2 rows x 1 token, and x 2


def pair_counts(out, V):
    """(N, 2) tokens -> (V * V,) counts of each (first, second) pair."""
    return torch.bincount(out[:, 0] * V + out[:, 1], minlength=V * V)


def same_distribution(a, b):
    """The chi-square test's p-value that counts a and b come from one distribution; cells with fewer than
    20 draws in all are pooled into one, so every expected count is large enough for the test."""
    big = (a + b) >= 20
    table = torch.stack([torch.cat((x[big], x[~big].sum()[None])) for x in (a, b)])
    return chi2_contingency(table[:, table.sum(0) > 0].numpy())[1]


@pytest.mark.parametrize("k", [1, 3])  # k 1: the second token is a bonus or the next round's
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.8)], ids=["t1", "t0.7-top_k5", "t1.3-top_p0.8"])
def test_sampled_tokens_have_the_targets_distribution(settings, k):
    V, N = 8, 20000
    target = spiky(GPT(tiny("gpt2", vocab_size=V)), std=0.2)
    torch.manual_seed(4)
    draft = GPT(tiny("modern", n_layer=1, vocab_size=V)).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(4.0 if p.dim() >= 2 else 1.0)  # peaked, and unlike the target's
    prompt = torch.tensor([[1, 2, 3]]).expand(N, 3)  # N independent draws, as one batch
    torch.manual_seed(0)
    spec = SpeculativeDecoder(target, draft, k)
    ours = pair_counts(spec.generate(prompt, 2, **settings)[:, 3:], V)
    own = pair_counts(generate(target, prompt, 2, **settings)[:, 3:], V)
    assert 0.2 < spec.acceptance < 0.9, spec.acceptance  # both the accept and the reject path taken
    assert same_distribution(ours, own) > 1e-3
    # the control: the draft's own text fails the same test (the rule has something to correct)
    assert same_distribution(pair_counts(generate(draft, prompt, 2, **settings)[:, 3:], V), own) < 1e-6


# ---- sample.py --draft ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoint files: a 2-layer target, a 1-layer draft with its tokenizer, and one with another."""
    d = tmp_path_factory.mktemp("speculative")
    text = open(os.path.join(ROOT, "model.py")).read()
    tok, other = Tokenizer.train([text], 300), Tokenizer.train([text], 290)
    for name, tokenizer, n_layer in (("target", tok, 2), ("draft", tok, 1), ("other", other, 1)):
        torch.manual_seed(n_layer)
        gpt = spiky(GPT(tiny("gpt2", n_layer=n_layer, block_size=64, vocab_size=tokenizer.vocab_size)), std=0.1)
        torch.save({"version": checkpoint.VERSION, "model": gpt.state_dict(), "tokenizer": tokenizer.dumps(),
                    "model_args": dataclasses.asdict(gpt.config), "iter_num": 1, "config": {}}, d / f"{name}.pt")
    return d


def test_sample_with_a_draft_prints_the_same_greedy_text_compiled_or_not(runs, capsys):
    sample = importlib.import_module("sample")
    flags = [f"--model={runs / 'target.pt'}", "--start=def f(x):", "--temperature=0", "--max_new_tokens=40",
             "--stop_at_eot=False", "--device=cpu"]
    sample.main(flags)
    plain = capsys.readouterr()
    sample.main([*flags, f"--draft={runs / 'draft.pt'}", "--draft_k=3"])
    fast = capsys.readouterr()
    assert fast.out == plain.out and len(set(plain.out)) > 10
    assert f"drafting 3 tokens a round with {runs / 'draft.pt'} (step 1)" in fast.err
    assert "[40 tokens in" in fast.err and "of draft tokens accepted]" in fast.err
    sample.main([*flags, f"--draft={runs / 'draft.pt'}", "--draft_k=3", "--compile=True"])  # both compiled
    compiled = capsys.readouterr()
    assert compiled.out == plain.out and "compiling the decode steps: " in compiled.err
    assert compiled.err.split("accepted]")[0].split(", ")[-1] == fast.err.split("accepted]")[0].split(", ")[-1]


def test_a_draft_with_another_tokenizer_is_one_line(runs):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--model={runs / 'target.pt'}",
                        f"--draft={runs / 'other.pt'}", "--device=cpu"], cwd=runs, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert error_line(p) == (f"error: the draft {runs / 'other.pt'} (step 1) and the target {runs / 'target.pt'} "
                             f"(step 1) differ in tokenizer or vocabulary (draft: bpe-290, 290 tokens; target: "
                             f"bpe-300, 300 tokens); pass a --draft trained on data prepared with the target's "
                             f"tokenizer")
    # the same tokenizer but another vocabulary size (a model whose rows outnumber its tokenizer's ids)
    target, draft = (checkpoint.open_model(str(runs / f"{n}.pt")) for n in ("target", "draft"))
    wider = draft._replace(model=GPT(dataclasses.replace(draft.model.config, vocab_size=320)))
    with pytest.raises(UserError, match="draft: bpe-300, 320 tokens; target: bpe-300, 300 tokens"):
        check_draft(target, wider)
