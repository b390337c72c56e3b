"""model.py: the behaviour a user relies on, checked on tiny CPU models in float32.

Causality, KV-cache generation (decode.generate) equal to recomputation (also past the context), the
sampling rules and their one check of the settings, parameter counts and FLOPs of the full presets,
per-token losses, hidden states, logit parity with Hugging Face's GPT-2 (both ways) and Llama (the modern
preset), gradient checkpointing, overfitting one batch, and the ValueErrors for bad input.
"""
import dataclasses

import pytest
import torch

from decode import generate, generate_stream, sample_next, sampling_problem
from model import GPT, GPTConfig, KVCache
from training import configure_optimizers

PRESETS = ("gpt1", "gpt2", "modern")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny, so threads gain nothing; on a shared, loaded machine two spinning
    # threads per process made a 0.2 s test take 40 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name, **kw):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.0)
    return GPTConfig.preset(name, **{**args, **kw})


# Every model a GPTConfig describes: the presets, and the modern preset with each switch turned. A new
# GPTConfig field fails test_every_switch_has_a_variant until it is added here, and then every test
# parametrized over MODEL_VARIANTS (here and in test_serve.py) runs with it.
SWITCHES = {"norm": ["layernorm"], "prenorm": [False], "pos": ["learned"], "mlp": ["gelu", "relu2"],
            "qk_norm": [True], "logit_softcap": [3.0], "zero_init": [True], "tie_weights": [False],
            "bias": [True], "rope_theta": [500.0], "ffn_hidden": [48], "vocab_multiple": [1]}
SIZES = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd"}  # set by each test
NOT_IN_INFERENCE = {"dropout", "grad_checkpoint"}  # training only: test_gradient_checkpointing, dropout's
MODEL_VARIANTS = [{"name": p} for p in PRESETS] + \
    [{"name": "modern", k: v} for k, values in SWITCHES.items() for v in values]


def test_every_switch_has_a_variant():
    assert {f.name for f in dataclasses.fields(GPTConfig)} == set(SWITCHES) | SIZES | NOT_IN_INFERENCE


def spiky(model, std=0.3):
    """Re-draw the weights with a large std so greedy decoding is varied, not one token repeated."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def randomise(model, std=0.1):
    """Every parameter drawn at random, norm gains and biases too: at init those are 1 and 0, which would
    hide a gain or bias mapped to the wrong place (or not at all) in a parity test. std 0.1 keeps logits
    within a few units, so float32 rounding stays well under the tolerances."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("weight"):  # the 1-D weights are norm gains
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def test_full_preset_parameter_counts():
    # Built on the meta device: shapes only, no memory. Hand counts per block (C = 768):
    # attention 4C^2 + 4C, MLP 8C^2 + 5C (hidden 4C), two LayerNorms 4C; SwiGLU: 3*C*2048, no biases.
    C = 768
    gelu_block = 4 * C * C + 4 * C + 8 * C * C + 5 * C + 4 * C
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = GPT(GPTConfig.preset(name))
    # gpt1: 40,257 ids padded to 40,320 rows (tied head), 512 positions, post-norm so no final norm
    assert counts["gpt1"].num_params(non_embedding=False) == 12 * gelu_block + 512 * C + 40320 * C == 116_413_440
    # gpt2: the well-known 124,439,808 of HF's gpt2, plus 47 padding rows (50,257 -> 50,304)
    assert counts["gpt2"].num_params(non_embedding=False) == 124_439_808 + 47 * C == 124_475_904
    assert counts["gpt2"].num_params() == 124_475_904 - 1024 * C  # the position table is only looked up
    modern_block = 4 * C * C + 3 * C * 2048 + 2 * C
    assert counts["modern"].num_params(non_embedding=False) == 12 * modern_block + C + 50304 * C == 123_587_328
    assert counts["modern"].config.mlp_hidden == 2048  # 8/3 * 768, a multiple of 64


@pytest.mark.parametrize("name", PRESETS)
def test_causality(name):
    torch.manual_seed(0)
    model = spiky(GPT(tiny(name)))
    idx = torch.randint(0, 100, (2, 16))
    logits, _ = model(idx)  # (B, T, V): every position
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 100  # alter every token after position 8
    logits2, _ = model(changed)
    assert torch.equal(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])  # the later positions do see the change


def test_per_token_loss():
    """reduction="none", for scoring each document or token on its own: one loss per position, each
    -log p(target) under forward's logits, 0 where the target is -1, and their mean over the scored
    positions is the usual mean loss."""
    torch.manual_seed(0)
    model = spiky(GPT(tiny("gpt2")))
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    targets[0, :5] = -1  # e.g. a prompt that is not scored
    targets[1, -3:] = -1  # e.g. padding
    scored = targets != -1
    with torch.no_grad():
        _, per_token = model(idx, targets=targets, reduction="none")
        _, mean = model(idx, targets=targets)
        logits, _ = model(idx)
    assert per_token.shape == (2, 16) and torch.all(per_token[~scored] == 0)
    by_hand = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    torch.testing.assert_close(per_token[scored], by_hand[scored])
    torch.testing.assert_close(per_token.sum() / scored.sum(), mean)  # 24 scored positions, not 32
    assert mean.item() > 1.0  # spiky weights: real losses, so the comparisons above are not of zeros


@pytest.mark.parametrize("name", PRESETS)
def test_hidden_states_then_head_is_forward(name):
    """hidden_states is what the head reads, so a task head can read it instead: (B, T, C) after the last
    norm, and head() of it is forward's logits, bit for bit. With a KVCache it continues the positions."""
    torch.manual_seed(0)
    model = spiky(GPT(tiny(name)))
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        h = model.hidden_states(idx)
        logits, _ = model(idx)
        assert h.shape == (2, 16, 32) and logits.shape == (2, 16, 100)  # 100, not the 128 padded rows
        assert torch.equal(model.head(h), logits)
        # the last norm's gain is 1 (spiky leaves 1-D weights alone): each position is unit scale
        if model.config.norm == "layernorm":
            torch.testing.assert_close(h.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
            torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
        else:
            torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(2, 16), atol=1e-4, rtol=0)
        cache = KVCache(model.config.n_layer, 2, 16)  # a prefill, decode steps of one token, a chunk
        model.hidden_states(idx[:, :10], cache)
        for t in (10, 11):
            torch.testing.assert_close(model.hidden_states(idx[:, t:t + 1], cache), h[:, t:t + 1])
        torch.testing.assert_close(model.hidden_states(idx[:, 12:], cache), h[:, 12:])


@pytest.mark.parametrize("config", MODEL_VARIANTS, ids=str)
def test_kv_cache_rows_at_different_lengths_equal_each_row_alone(config):
    """One forward over rows at different lengths (serve.py's decode step): each row's hidden states
    are what it gets alone, for every switch. Row 1 is longer: if row 0 saw its columns, it would differ."""
    torch.manual_seed(0)
    model = spiky(GPT(tiny(**config)))
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        alone = [model.hidden_states(idx[b:b + 1]) for b in range(2)]
        cache = KVCache(model.config.n_layer, 2, 16)
        model.hidden_states(idx[:, :9], cache)
        cache.pos[0] = 5  # row 0 keeps its first 5 tokens: columns 5..8 are now past its end
        for t in range(5):  # row 0 at positions 5..9, row 1 at 9..13, in the same forwards
            step = torch.stack([idx[0, 5 + t], idx[1, 9 + t]])[:, None]
            h = model.hidden_states(step, cache)
            torch.testing.assert_close(h[0, 0], alone[0][0, 5 + t])
            torch.testing.assert_close(h[1, 0], alone[1][0, 9 + t])
        assert cache.pos.tolist() == [10, 14]


@pytest.mark.parametrize("name", PRESETS)
def test_kv_cache_greedy_equals_recompute_past_the_context(name):
    torch.manual_seed(0)
    model = spiky(GPT(tiny(name)))
    prompt = torch.randint(0, 100, (2, 5))
    out = generate(model, prompt, max_new_tokens=30, temperature=0.0)  # 35 tokens, context 16
    ref = prompt
    for _ in range(30):  # no cache: the whole (cropped) sequence each step
        logits, _ = model(ref[:, -16:])
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)
    assert len(set(out[0, 5:].tolist())) > 3  # a real test: the continuation is not one token repeated
    streamed = torch.cat(list(generate_stream(model, prompt, 30, temperature=0.0)), dim=1)
    assert torch.equal(streamed, out[:, 5:])
    assert torch.equal(generate(model, prompt, 30, top_k=1), out)  # top_k=1 is greedy too
    # a prompt longer than the context conditions on its last block_size tokens
    assert torch.equal(generate(model, ref, 1, temperature=0.0)[:, -1], model(ref[:, -16:])[0][:, -1].argmax(-1))


def test_generation_never_emits_padding_ids_and_stops_at_eos():
    torch.manual_seed(0)
    model = spiky(GPT(tiny("gpt2")))  # vocab 100, embedding padded to 128 rows
    assert model.lm_head.weight.shape[0] == 128 and model(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 100)
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 40, temperature=2.0)
    assert out.max() < 100
    greedy = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0)
    eos = greedy[0, 4].item()  # the 4th generated token: generation must stop right after it
    stopped = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0, eos_token=eos)
    first = greedy[0, 1:].tolist().index(eos) + 1
    assert torch.equal(stopped, greedy[:, :first + 1])


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    torch.manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2).flatten().tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two tokens (mass 0.88)
    assert set(sample_next(logits, 1.0, top_p=0.8).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=1e-6).flatten().tolist()) == {0}
    assert len(set(sample_next(logits, 1.0).flatten().tolist())) == 5


# (temperature, top_k, top_p) -> the setting named, or None: sample.py, eval.py and serve.py all ask this
@pytest.mark.parametrize("settings, bad", [
    ((0, None, None), None), ((0.8, 200, 0.9), None), ((2.0, 1, 1.0), None), ((1, 5, 1), None),
    ((-1.0, None, None), "temperature"), ((float("nan"), 5, 0.5), "temperature"), (("1", None, None), "temperature"),
    ((1.0, 0, None), "top_k"), ((1.0, 2.5, None), "top_k"), ((1.0, "200", None), "top_k"),
    ((1.0, None, 0.0), "top_p"), ((1.0, None, 1.5), "top_p"), ((1.0, None, float("nan")), "top_p"),
    ((-1.0, 0, 0.0), "temperature")])  # several bad: the first is named, the line gives every range
def test_sampling_settings_are_checked_in_one_place(settings, bad):
    problem = sampling_problem(*settings)
    assert (problem and problem[0]) == bad
    if bad:
        name, line = problem
        value = dict(zip(("temperature", "top_k", "top_p"), settings))[name]
        assert "\n" not in line and f"{name}={value}" in line
        assert "need temperature >= 0, top_k None or an int >= 1, and top_p None or in (0, 1]" in line
        with pytest.raises(ValueError, match="need temperature >= 0"):
            generate(GPT(tiny("gpt2")), torch.zeros(1, 1, dtype=torch.long), 2, *settings)
    else:
        assert generate(GPT(tiny("gpt2")).eval(), torch.zeros(1, 1, dtype=torch.long), 2, *settings).shape == (1, 3)


@pytest.mark.parametrize("name", PRESETS)
def test_gradient_checkpointing_same_gradients(name):
    torch.manual_seed(0)
    plain = GPT(tiny(name, dropout=0.1))  # dropout on: the recomputation must replay the same masks
    ckpt = GPT(dataclasses.replace(plain.config, grad_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 100, (2, 16))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        _, loss = model(idx, targets=idx)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", PRESETS)
def test_overfits_one_batch(name):
    torch.manual_seed(0)
    model = GPT(tiny(name, n_embd=64, n_head=4))
    opt, = configure_optimizers(model, weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                device_type="cpu")
    x = torch.randint(0, 100, (4, 16))
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1  # ignored position
    for step in range(300):
        _, loss = model(x, targets=y)
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"{name}: loss {loss.item():.3f} after {step} steps"


def test_modded_nanogpt_switches():
    x = torch.randint(0, 100, (2, 16))
    # logit soft-capping: the same weights give cap * tanh(raw / cap), so every logit is inside (-cap, cap)
    raw = spiky(GPT(tiny("modern")), std=1.0)
    capped = GPT(tiny("modern", logit_softcap=5.0))
    capped.load_state_dict(raw.state_dict())
    with torch.no_grad():
        want = 5.0 * torch.tanh(raw(x)[0] / 5.0)
        assert raw(x)[0].abs().max() > 10  # the cap is exercised, not idle
        torch.testing.assert_close(capped(x)[0], want)
        torch.testing.assert_close(capped.head(capped.hidden_states(x)), want)  # every reader of head()
    # QK-norm: queries and keys are normalised per head, so scaling the q and k rows of c_attn changes nothing;
    # without it the same scaling changes the attention pattern
    for qk_norm in (True, False):
        model = randomise(GPT(tiny("modern", qk_norm=qk_norm)))
        with torch.no_grad():
            before = model(x)[0]
            for block in model.transformer.h:
                block.attn.c_attn.weight[:2 * 32] *= 7.0
            assert torch.allclose(model(x)[0], before, atol=1e-4) == qk_norm
    # ReLU^2 MLP: c_proj(relu(c_fc(x))^2), 4*n_embd wide
    model = randomise(GPT(tiny("modern", mlp="relu2")))
    mlp, h = model.transformer.h[0].mlp, torch.randn(2, 16, 32)
    assert mlp.c_fc.out_features == 4 * 32
    torch.testing.assert_close(mlp(h), mlp.c_proj(torch.relu(mlp.c_fc(h)) ** 2))
    # zero-init projections: every block starts as the identity, and training still moves every matrix
    model = GPT(tiny("modern", zero_init=True))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(x), model.transformer.ln_f(model.transformer.wte(x)))
    opt, = configure_optimizers(model, 0.0, 1e-2, (0.9, 0.95), 1e-8, "cpu")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # step 1 moves c_proj only (nothing flows back through a zero matrix); step 2 the rest
        opt.zero_grad()
        model(x, targets=x)[1].backward()
        opt.step()
    assert [n for n, p in model.named_parameters() if p.dim() == 2 and torch.equal(p, start[n])] == []
    with pytest.raises(ValueError, match="mlp='relu' is not one of"):
        GPTConfig.preset("modern", mlp="relu")


def test_optimizer_groups():
    model = GPT(tiny("gpt2"))
    opt, = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter exactly once (the tied wte/lm_head matrix too): 2 blocks x 6 matrices + wte + wpe
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(non_embedding=False)
    assert len(decay["params"]) == 2 * 4 + 2
    # Muon takes exactly the 2-D matrices inside the blocks; AdamW keeps wte (= the head), wpe, gains, biases
    adamw, muon = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", optimizer="muon")
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for p in muon.param_groups[0]["params"]} == hidden and len(hidden) == 2 * 4
    rest = [p for g in adamw.param_groups for p in g["params"]]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - hidden
    assert isinstance(muon, torch.optim.Muon) and muon.param_groups[0]["weight_decay"] == 0.1
    # an untied input embedding: its own group at learning_rate * embedding_lr_scale, without decay
    untied = GPT(tiny("modern", tie_weights=False))
    adamw, = configure_optimizers(untied, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", embedding_lr_scale=50.0)
    table = adamw.param_groups[2]
    assert table["params"] == [untied.transformer.wte.weight] and table["lr"] == pytest.approx(0.05)
    assert (table["weight_decay"], table["lr_scale"]) == (0.0, 50.0)
    assert not any(untied.transformer.wte.weight is p for g in adamw.param_groups[:2] for p in g["params"])
    with pytest.raises(ValueError, match="embedding_lr_scale=50.0 needs an untied head"):
        configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", embedding_lr_scale=50.0)
    with pytest.raises(ValueError, match="optimizer='sgd' is not one of"):
        configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", optimizer="sgd")


def test_flops_and_mfu():
    # GPT-2 124M at T = 1024, counted by hand (PaLM appendix B): 6N for the weight matmuls plus
    # 12*L*H*Q*T for attention. C = 768, 12 layers, 12 heads of Q = 64.
    #   N (non-embedding): 12 blocks of 12C^2 + 13C = 7,087,872 -> 85,054,464 (attention 4C^2 + 4C,
    #                      MLP 8C^2 + 5C, two LayerNorms 4C)
    #                      + the tied 50,304 x 768 table, which is also the head's matmul: 38,633,472
    #                      + the final LayerNorm: 1,536 (wpe, only looked up, is not counted)
    #                      = 123,689,472, so 6N = 742,136,832
    #   attention: 12 * 12 * 12 * 64 * 1024 = 113,246,208
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.flops_per_token() == 742_136_832 + 113_246_208 == 855_383_040
    assert model.flops_per_token(T=8) == 742_136_832 + 884_736  # shorter runs: 12 * 12 * 12 * 64 * 8
    # 100k tokens/s against an A100's 312 TFLOP/s bf16 peak: 8.55e13 / 3.12e14 = 27.4%
    assert model.estimate_mfu(tokens_per_sec=100_000, peak_flops=312e12) == pytest.approx(0.274161, abs=1e-6)


def test_config_round_trips_through_asdict():
    model = GPT(tiny("modern"))
    again = GPT(GPTConfig(**dataclasses.asdict(model.config)))  # how checkpoints store model_args
    again.load_state_dict(model.state_dict())
    assert "rope_cos" not in model.state_dict()  # derived buffers stay out of checkpoints


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'; valid presets: gpt1, gpt2, modern"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        GPTConfig(norm="batchnorm")
    model = GPT(tiny("gpt2"))
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than the context block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
        model(torch.tensor([[1, 100]]))  # 100 < 128 padded rows: without the check it would run silently
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(torch.tensor([[-1, 2]]))
    cache = KVCache(model.config.n_layer, 1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"\(1, 2\) new tokens after 3 do not fit a KVCache of 1 rows x 4"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=-1.0)
