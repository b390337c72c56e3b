"""hf.py's model half: OpenAI's GPT-2 files (both layouts on the hub) load and compute transformers'
logits; our weights under Hugging Face's names load into transformers' own classes (GPT-2, Llama);
bad directories are one ValueError. export.py's whole round trip is in test_export.py."""
import pytest
import torch

import hf
from model import GPT
from test_model import one_thread, randomise, tiny  # noqa: F401  (one_thread: an autouse fixture)


def test_matches_huggingface_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg).eval()
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        hf_out = theirs(idx, labels=idx)
    # 1) what save_pretrained writes today: model.safetensors with "transformer."-prefixed keys
    theirs.save_pretrained(tmp_path / "st")
    # 2) the layout of OpenAI's original upload: pytorch_model.bin with GPT2Model keys (no prefix),
    # the causal-mask buffers attn.bias / attn.masked_bias, and an explicit lm_head (transformers 5
    # no longer writes .bin files, so the test writes one the way older versions did)
    old = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf_cfg.save_pretrained(tmp_path / "bin")
    torch.save(old, tmp_path / "bin" / "pytorch_model.bin")
    for d in ("st", "bin"):
        model = hf.from_pretrained(str(tmp_path / d)).eval()
        assert model.config.n_layer == 2 and model.config.block_size == 64 and model.config.vocab_size == 100
        with torch.no_grad():
            logits, _ = model(idx[:, :-1])
            _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        assert (logits - hf_out.logits[:, :-1]).abs().max() < 1e-4
        assert abs(loss.item() - hf_out.loss.item()) < 1e-5  # HF shifts labels by one internally
    del old["h.1.mlp.c_fc.weight"]
    torch.save(old, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin lacks 1 tensors, e.g. transformer.h.1.mlp.c_fc.weight"):
        hf.from_pretrained(str(tmp_path / "bin"))


@pytest.mark.parametrize("bias", [True, False])
def test_hf_state_dict_loads_into_huggingface_gpt2(bias):
    """Export: hf_state_dict() loads into transformers' GPT2LMHeadModel, which then computes our logits. A
    model trained without biases exports zero ones. Only the GPT-2 architecture has such a form."""
    transformers = pytest.importorskip("transformers")
    model = randomise(GPT(tiny("gpt2", bias=bias)))
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    assert not [n for n, _ in theirs.named_buffers()]  # no non-persistent buffers to set aside
    missing, unexpected = theirs.load_state_dict(hf.hf_state_dict(model), strict=False)
    # only lm_head is not exported: it is tied to wte, and OpenAI's files on the hub omit it too
    assert missing == ["lm_head.weight"] and unexpected == []
    assert theirs.lm_head.weight is theirs.transformer.wte.weight
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert (theirs(idx).logits - model(idx)[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="no QK-norm"):
        hf.hf_state_dict(GPT(tiny("modern", qk_norm=True)))


def test_modern_matches_huggingface_llama():
    """The modern preset is a Llama: our weights, copied by hand into transformers' LlamaForCausalLM, give
    the same logits and final hidden states. Llama's code is independent of ours: its own RMSNorm,
    rotate-half RoPE, SwiGLU down(silu(gate(x)) * up(x)) and, with "eager", attention as an explicit
    softmax. So a RoPE over interleaved pairs, a swapped gate and up, or a wrong eps or theta fails here."""
    transformers = pytest.importorskip("transformers")
    # theta 500, not the default 10,000: it must reach both models, and it turns the slow dims further
    config = tiny("modern", n_head=4, n_embd=64, block_size=32, rope_theta=500.0)
    model = randomise(GPT(config))
    C, H, V = config.n_embd, config.mlp_hidden, config.vocab_size  # 64, 192, 100
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=C, intermediate_size=H, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attn_implementation="eager")).eval()
    ours = model.state_dict()
    sd = {"model.embed_tokens.weight": ours["transformer.wte.weight"][:V],  # without the 28 padding rows
          "model.norm.weight": ours["transformer.ln_f.weight"]}
    for i in range(config.n_layer):
        a, b = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = ours[a + "attn.c_attn.weight"].split(C)  # c_attn's output rows are q, then k, then v
        up, gate = ours[a + "mlp.c_fc.weight"].split(H)  # c_fc's rows are up, then gate
        sd.update({b + "self_attn.q_proj.weight": q, b + "self_attn.k_proj.weight": k,
                   b + "self_attn.v_proj.weight": v, b + "self_attn.o_proj.weight": ours[a + "attn.c_proj.weight"],
                   b + "mlp.gate_proj.weight": gate, b + "mlp.up_proj.weight": up,
                   b + "mlp.down_proj.weight": ours[a + "mlp.c_proj.weight"],
                   b + "input_layernorm.weight": ours[a + "ln_1.weight"],
                   b + "post_attention_layernorm.weight": ours[a + "ln_2.weight"]})
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the head is tied to embed_tokens
    idx = torch.randint(0, 100, (2, 32))  # the whole context: every rotary position
    with torch.no_grad():
        hf_out = theirs(idx, output_hidden_states=True)
        assert (model(idx)[0] - hf_out.logits).abs().max() < 1e-5
        assert (model.hidden_states(idx) - hf_out.hidden_states[-1]).abs().max() < 1e-5


def test_from_pretrained_bad_input(tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor one of gpt2"):
        hf.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(str(tmp_path))
