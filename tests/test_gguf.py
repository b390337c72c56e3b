"""export.py --format=gguf: a file for llama.cpp. transformers' own GGUF loader (which reads the file with
llama.cpp's gguf package and dequantizes it) computes our logits from it, for both presets and every
storage type; RoPE is checked a second way, with llama.cpp's rotation of adjacent pairs written out over
the raw tensors; the tokenizer transformers builds from the metadata encodes hostile Unicode as ours
does, for both split regexes llama.cpp knows; what llama.cpp cannot compute is refused in one line."""
import importlib

import numpy as np
import pytest
import torch

from bpe import Tokenizer
from conftest import ENV, ROOT, error_line
from decode import generate
from model import GPT, GPTConfig, apply_rope
from test_bpe import HOSTILE, real_docs
from test_export import quiet, save_checkpoint as save, tok  # noqa: F401  (fixtures)
from test_model import randomise

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
export = importlib.import_module("export")


def tiny(preset, tok, **kw):
    # head size 16, widths multiples of 32 (quantization blocks); random gains, so a misplaced norm shows
    config = GPTConfig.preset(preset, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=tok.vocab_size,
                              dropout=0.0, **kw)
    return randomise(GPT(config), std=0.15)


def load(d, fname, model):
    sizes = {"n_positions": model.config.block_size} if model.config.pos == "learned" else {}  # see verify_gguf
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32, **sizes).eval()


def as_stored(model, kind):
    """Our model with each matrix quantized and dequantized by the gguf package, written here apart from
    export.py: every 2-D weight but GPT-2's position table, F16 or blocks of 32 along each row."""
    out = GPT(model.config).eval()
    out.load_state_dict(model.state_dict())
    Q = gguf.GGMLQuantizationType
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    with torch.no_grad():
        for key, p in out.state_dict().items():
            if p.dim() == 2 and key != "transformer.wpe.weight":
                w = p.numpy()
                back = w.astype(np.float16).astype(np.float32) if kind == "f16" else \
                    gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
                p.copy_(torch.from_numpy(back))
    return out


# how far storing the weights may move the logits of these random models (std 0.15, logits of a few units):
# f16 rounds each weight by <= 2^-11 of itself, q8_0 by <= 1/254 of its block's largest, q4_0 by <= 1/16
# (measured: 8e-3, 0.23, 2.9 at most). The exact check is against as_stored: 1e-4, float32 rounding only.
MOVED = {"f32": 1e-4, "f16": 3e-2, "q8_0": 1.0, "q4_0": 10.0}


@pytest.mark.parametrize("preset, tied", [("modern", False), ("modern", True), ("gpt2", True)])
def test_transformers_reads_our_logits_from_the_gguf(tok, tmp_path, preset, tied, capsys):
    model = tiny(preset, tok, tie_weights=tied)
    ckpt = save(model, tok, tmp_path / "m.pt")
    ids = tok.encode("def f(x):\n    return x * 2  # ✓ 漢字\n")
    x = torch.tensor([(ids * 3)[:32], (ids * 3)[5:37]])
    moved = {}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        export.main([f"--model={ckpt}", f"--hf_dir={tmp_path / 'gg'}", "--format=gguf", f"--gguf_type={kind}"])
        assert f"check: transformers loads {tmp_path / 'gg'}/model-{kind}.gguf" in capsys.readouterr().out
        theirs = load(tmp_path / "gg", f"model-{kind}.gguf", model)
        assert type(theirs).__name__ == ("LlamaForCausalLM" if preset == "modern" else "GPT2LMHeadModel")
        with torch.no_grad():
            logits = theirs(x).logits
            ref = model if kind == "f32" else as_stored(model, kind)
            assert (logits - ref(x)[0]).abs().max() < 1e-4, kind  # the mapping: exact up to float32
            moved[kind] = (logits - model(x)[0]).abs().max().item()
        assert moved[kind] < MOVED[kind], (kind, moved)
        reader = gguf.GGUFReader(tmp_path / "gg" / f"model-{kind}.gguf")
        names = {t.name for t in reader.tensors}
        assert ("output.weight" in names) == (not tied)  # a tied head is left out; llama.cpp reuses token_embd
        assert reader.get_tensor(0).name == "token_embd.weight" and reader.get_tensor(0).shape[-1] == tok.vocab_size
    assert 0 < moved["f16"] < moved["q8_0"] < moved["q4_0"]  # each storage did round, and coarser rounds more
    with torch.no_grad():  # greedy decoding from the f32 file follows ours token for token
        prompt = x[:1, :6]
        ours = generate(model, prompt, 20, temperature=0)
        hf_out = load(tmp_path / "gg", "model-f32.gguf", model).generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None,
            pad_token_id=tok.eot_token)
    assert torch.equal(hf_out, ours) and len(set(ours[0, 6:].tolist())) > 1


def test_rope_as_llama_cpp_computes_it(tok, tmp_path):
    # llama.cpp's llama architecture (rope type NORM) rotates adjacent pairs (2i, 2i+1) of each head by
    # pos * theta^(-2i/hd). Written out here over the file's raw q and k rows, it must give the attention
    # scores our model gives; the rows as Hugging Face orders them (no interleaving) must not.
    model = tiny("modern", tok, rope_theta=500.0)
    export.main([f"--model={save(model, tok, tmp_path / 'm.pt')}", f"--hf_dir={tmp_path / 'gg'}", "--format=gguf",
                 "--gguf_type=f32", "--check=False"])
    reader = gguf.GGUFReader(tmp_path / "gg" / "model-f32.gguf")
    t = {r.name: torch.from_numpy(np.array(r.data)) for r in reader.tensors}
    C, nh, T = 64, 4, 12
    hd = C // nh
    x = torch.randn(T, C)
    angle = torch.arange(T)[:, None] * 500.0 ** (-torch.arange(0, hd, 2) / hd)  # (T, hd/2)

    def rotate_adjacent(v):  # (T, nh, hd) -> the same, each (2i, 2i+1) pair rotated
        a, b = v.view(T, nh, hd // 2, 2).unbind(-1)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).view(T, nh, hd)

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    wq, wk = t["blk.0.attn_q.weight"], t["blk.0.attn_k.weight"]
    theirs = scores(rotate_adjacent((x @ wq.T).view(T, nh, hd)), rotate_adjacent((x @ wk.T).view(T, nh, hd)))
    W = model.transformer.h[0].attn.c_attn.weight.detach()
    q, k = ((x @ W[i * C:(i + 1) * C].T).view(T, nh, hd).transpose(0, 1) for i in (0, 1))  # (nh, T, hd)
    cos, sin = angle.cos(), angle.sin()
    ours = torch.einsum("htd,hsd->hts", apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    assert torch.allclose(theirs, ours, atol=1e-4)
    plain = scores(rotate_adjacent((x @ W[:C].T).view(T, nh, hd)), rotate_adjacent((x @ W[C:2 * C].T).view(T, nh, hd)))
    assert not torch.allclose(plain, ours, atol=1e-2)  # without the reordering llama.cpp would attend elsewhere


@pytest.mark.parametrize("pattern, pre", [("gpt2", "gpt-2"), ("cl100k", "llama-bpe")])
def test_tokenizer_from_the_metadata_encodes_as_we_do(tmp_path, pattern, pre):
    tok = Tokenizer.train(real_docs(150_000) + HOSTILE * 3, vocab_size=800, pattern=pattern)
    model = tiny("modern", tok)
    export.main([f"--model={save(model, tok, tmp_path / 'm.pt')}", f"--hf_dir={tmp_path / 'gg'}", "--format=gguf",
                 "--gguf_type=q8_0", "--check=False"])
    reader = gguf.GGUFReader(tmp_path / "gg" / "model-q8_0.gguf")
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == pre
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == tok.eot_token
    assert field("tokenizer.ggml.add_bos_token") is False and field("llama.rope.freq_base") == 10000.0
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.eot_token] == "<|endoftext|>" and tokens[32] == "Ġ"
    assert len(field("tokenizer.ggml.merges")) == len(tok.merges)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "gg", gguf_file="model-q8_0.gguf")
    # HF matches special-token text in raw text (as llama.cpp does with parse_special), so compare with ours
    # allowing it; then the lone bytes of a character cut in two decode to U+FFFD in both
    texts = HOSTILE + ["  two  spaces\tand\ttabs  \n\n\n   ", "\u200b\u200d\ufeff zero-width", "x<|endoftext|>y",
                       "\u05e9\u05dc\u05d5\u05dd \u202eRTL override\u202c مرحبا", "'S 'LL ſ Ⅻ"]
    texts += real_docs(30_000, start=400_000)
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert theirs.encode(text, add_special_tokens=False) == ids, text[:60]
        assert theirs.decode(ids) == tok.decode(ids)
    for cut in ("é".encode()[:1], "漢".encode()[:2], "🙂".encode()[1:3]):
        ids = [b for b in cut]  # ids 0..255 are the bytes
        assert theirs.decode(ids) == tok.decode(ids) == "\ufffd" * len(tok.decode(ids))


@pytest.mark.parametrize("preset, change, switch", [
    ("modern", {"qk_norm": True}, "qk_norm=True"), ("modern", {"logit_softcap": 30.0}, "logit_softcap=30.0"),
    ("modern", {"mlp": "relu2"}, "mlp=relu2"), ("gpt1", {}, "prenorm=False"),
    ("gpt2", {"tie_weights": False}, "tie_weights=False"), ("modern", {"bias": True}, "bias=True"),
    ("modern", {"norm": "layernorm"}, "norm=layernorm")])
def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(tok, tmp_path, preset, change, switch):
    ckpt = save(tiny(preset, tok, **change), tok, tmp_path / "m.pt")
    with pytest.raises(SystemExit) as e:
        export.main([f"--model={ckpt}", f"--hf_dir={tmp_path / 'gg'}", "--format=gguf"])
    assert switch in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "gg").exists()


def test_refusals_from_the_command_line(tmp_path):
    import subprocess
    import sys
    own = Tokenizer.train(real_docs(20_000), vocab_size=300, pattern=r"\w+|\s+|[^\w\s]+")  # a regex of one's own
    ckpt = save(tiny("modern", own), own, tmp_path / "own.pt")
    line = error_line(subprocess.run([sys.executable, f"{ROOT}/export.py", f"--model={ckpt}", "--format=gguf"],
                                     cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120))
    assert "own regex" in line and "llama.cpp" in line
    for flags, problem in ((["--format=gguf", "--gguf_type=q3"], "gguf_type='q3'"),
                           (["--format=onnx"], "format='onnx'")):
        with pytest.raises(SystemExit) as e:
            export.main([f"--model={ckpt}", *flags])
        assert problem in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*-hf"))
