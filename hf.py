"""
hf.py: our GPT and our tokenizer in the Hugging Face format, both ways: export.py writes it, and
checkpoint.open_model reads it back.

A Hugging Face model directory is config.json (the architecture and its sizes), model.safetensors
(the tensors under that architecture's names) and the tokenizer files. transformers loads it with no
custom code when the architecture is one of its own, so each preset maps onto the class that computes
the same function, tensor for tensor:

  gpt2    GPT2LMHeadModel       the same module names; HF's Conv1D stores a weight (in, out) where our
                                nn.Linear holds (out, in), so the four projections are transposed
  modern  LlamaForCausalLM      pre-RMSNorm (eps 1e-6), rotate-half RoPE, SwiGLU down(silu(gate) * up),
                                tied head: c_attn's rows split into q, k, v; c_fc's into up, gate
  gpt1    OpenAIGPTLMHeadModel  post-LayerNorm blocks, learned positions, no final norm. Its "gelu" is
                                the tanh form (transformers' openai ACT_FNS maps "gelu" to gelu_new),
                                which is ours, and its masked scores are -1e4, whose exp underflows to
                                exactly 0 in float32 as -inf does: the same function
The padded vocabulary rows are dropped (nothing ever reads them). A config between these (RoPE with
LayerNorm, a post-norm Llama, an untied GPT-2) has no transformers class, and architecture() says which switch.

The tokenizer. transformers' fast tokenizers run the `tokenizers` library from one tokenizer.json,
built here the way transformers' own tiktoken converter builds one: split with our regex (Oniguruma
reads the same possessive pattern), map each byte to a printable character (GPT-2's byte-level
table, so a token is a plain string), then BPE with our merges in their trained order. tiktoken first
looks a whole piece up in the vocabulary and only merges pieces that are not tokens; ignore_merges
does the same (tokenizers #1493). Special tokens are added tokens, matched in raw text (tiktoken
matches them only when allowed). OpenAI's GPT-2 vocabulary goes out as GPT-2's own files (vocab.json,
merges.txt), the very files tiktoken builds its gpt2 encoding from, with a tokenizer.json beside them.
"""
import json
import os

import regex
import torch

from model import GPT, GPTConfig

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "modern": "LlamaForCausalLM", "gpt1": "OpenAIGPTLMHeadModel"}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's releases on the hub

# GPT-2's and GPT-1's Conv1D layers store a weight (in, out) where nn.Linear holds (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# ours (under transformer.h.N.) -> Llama's (under model.layers.N.); two or three names: rows split in order
_LLAMA = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "attn.c_proj": ("self_attn.o_proj",),
          "mlp.c_fc": ("mlp.up_proj", "mlp.gate_proj"),
          "mlp.c_proj": ("mlp.down_proj",),
          "ln_1": ("input_layernorm",),
          "ln_2": ("post_attention_layernorm",)}
# GPT-1's top-level tables have other names in transformers; its blocks have ours
_OPENAI = {"transformer.wte.weight": "transformer.tokens_embed.weight",
           "transformer.wpe.weight": "transformer.positions_embed.weight"}


def architecture(config):
    """Which preset's transformers class computes what a GPT of this config computes; ValueError if none."""
    c = config
    if c.qk_norm or c.logit_softcap:  # in transformers only in other families (Qwen3, Gemma 2), not these three
        raise ValueError(f"qk_norm={c.qk_norm}, logit_softcap={c.logit_softcap}: the gpt2, llama and openai-gpt "
                         f"classes have no QK-norm or logit soft-capping; train without them to export")
    form = (c.norm, c.pos, c.mlp, c.prenorm)
    if form == ("layernorm", "learned", "gelu", True):
        if not c.tie_weights:
            raise ValueError("an untied gpt2 model: GPT2LMHeadModel export supports the tied head only")
        return "gpt2"
    if form == ("rmsnorm", "rope", "swiglu", True):
        return "modern"
    if form == ("layernorm", "learned", "gelu", False):
        if c.mlp_hidden != 4 * c.n_embd:  # OpenAIGPT's MLP width is fixed at 4 * n_embd
            raise ValueError(f"OpenAIGPTLMHeadModel's MLP is 4*n_embd={4 * c.n_embd} wide, this model's {c.mlp_hidden}")
        return "gpt1"
    raise ValueError(f"no transformers class computes norm={c.norm}, pos={c.pos}, mlp={c.mlp}, "
                     f"prenorm={c.prenorm}; exportable forms are the gpt2, modern and gpt1 presets")


def hf_config(config, eot=None):
    """config.json for a GPTConfig: the transformers class's own keys (written by hand, so exporting
    needs no transformers)."""
    c, kind = config, architecture(config)
    common = {"architectures": [ARCHITECTURES[kind]], "vocab_size": c.vocab_size, "torch_dtype": "float32",
              "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": c.tie_weights}
    if kind == "modern":
        return {**common, "model_type": "llama", "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden,
                "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head,
                "head_dim": c.n_embd // c.n_head, "hidden_act": "silu", "max_position_embeddings": c.block_size,
                "rms_norm_eps": 1e-6, "rope_theta": c.rope_theta,  # transformers 4 reads rope_theta, 5 this:
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": 0.0, "initializer_range": 0.02}
    dropouts = {"resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout}
    if kind == "gpt1":
        return {**common, "model_type": "openai-gpt", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                "n_positions": c.block_size, "afn": "gelu", "layer_norm_epsilon": 1e-5, **dropouts}
    return {**common, "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_positions": c.block_size, "n_ctx": c.block_size, "activation_function": "gelu_new",
            "n_inner": c.mlp_hidden if c.mlp_hidden != 4 * c.n_embd else None, "layer_norm_epsilon": 1e-5, **dropouts}


def hf_state_dict(model):
    """The model's tensors under the names and layouts of its transformers class (see the docstring).
    The padded vocabulary rows are dropped; a model trained without biases gets zero ones where the
    class has them (GPT-2, GPT-1); a tied head is left out, as transformers ties it on loading."""
    c, kind = model.config, architecture(model.config)
    sd, V, out = model.state_dict(), c.vocab_size, {}
    if kind in ("gpt2", "gpt1"):  # our module names, but for GPT-1's two tables and Conv1D's layout
        for key, w in sd.items():
            if key == "lm_head.weight" and c.tie_weights:
                continue
            w = w[:V] if key in ("transformer.wte.weight", "lm_head.weight") else w
            out[_OPENAI.get(key, key) if kind == "gpt1" else key] = w.t() if key.endswith(_CONV1D) else w
            bias = key.removesuffix("weight") + "bias"
            if key.endswith("weight") and key.startswith(("transformer.h.", "transformer.ln_f")) and bias not in sd:
                out[bias] = torch.zeros(w.size(0), dtype=w.dtype)
        return {k: v.contiguous() for k, v in out.items()}
    out["model.embed_tokens.weight"] = sd["transformer.wte.weight"][:V]
    out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    if not c.tie_weights:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(c.n_layer):
        for ours, theirs in _LLAMA.items():
            for part in ("weight", "bias"):
                w = sd.get(f"transformer.h.{i}.{ours}.{part}")
                if w is not None:
                    for name, piece in zip(theirs, w.chunk(len(theirs))):
                        out[f"model.layers.{i}.{name}.{part}"] = piece
    return {k: v.contiguous() for k, v in out.items()}


# ---- reading a Hugging Face directory ----------------------------------------------------------------

def from_pretrained(name_or_dir, dropout=None):
    """The GPT in a Hugging Face directory written by save_pretrained (config.json + model.safetensors
    or pytorch_model.bin), or OpenAI's GPT-2 by hub name (GPT2_NAMES; downloaded with huggingface_hub,
    which needs a network). GPT-2 maps onto the gpt2 preset; the Llama and OpenAI GPT forms export.py
    writes onto modern and gpt1. Anything else is a ValueError naming why."""
    path = name_or_dir
    if not os.path.isdir(path):
        if path not in GPT2_NAMES:
            raise ValueError(f"{path!r} is neither a directory nor one of {', '.join(GPT2_NAMES)}")
        from huggingface_hub import snapshot_download  # comes with transformers/datasets; only here
        try:
            path = snapshot_download(f"openai-community/{path}", allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:  # offline, proxy, disk full: one line instead of an HTTP traceback
            raise ValueError(f"could not download {name_or_dir} from the Hugging Face hub ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}); check the network or pass a local save_pretrained "
                             f"directory") from e
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"no config.json in {path}; pass a directory written by save_pretrained")
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/config.json is not readable JSON ({e})") from None
    config = _config_from_hf(path, hf, dropout or 0.0)
    sd, file = _load_weights(path)
    if hf["model_type"] == "gpt2":  # files saved from GPT2Model have no "transformer." prefix
        sd = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: w for k, w in sd.items()}
    with torch.device("meta"):  # shapes only, no memory
        theirs = hf_state_dict(GPT(config))  # the names this config's export has
    ours = {}  # our key -> their tensor (None where the file lacks it), the inverse of hf_state_dict
    if hf["model_type"] == "llama":
        ours["transformer.wte.weight"] = sd.get("model.embed_tokens.weight")
        ours["transformer.ln_f.weight"] = sd.get("model.norm.weight")
        for i in range(config.n_layer):
            for key, names in _LLAMA.items():
                for part in ("weight", "bias"):
                    pieces = [sd.get(f"model.layers.{i}.{n}.{part}") for n in names]
                    if f"model.layers.{i}.{names[0]}.{part}" in theirs:
                        ours[f"transformer.h.{i}.{key}.{part}"] = None if None in pieces else torch.cat(pieces)
    else:
        back = {v: k for k, v in _OPENAI.items()}
        for name in theirs:
            w, key = sd.get(name), back.get(name, name)
            ours[key] = w.t() if w is not None and key.endswith(_CONV1D) else w
    if not config.tie_weights:
        ours["lm_head.weight"] = sd.get("lm_head.weight")
    lacking = sorted(k for k, w in ours.items() if w is None)
    if lacking:
        raise ValueError(f"{file} lacks {len(lacking)} tensors, e.g. {lacking[0]}")
    model = GPT(config)
    own = model.state_dict()  # tensors sharing storage with the parameters: copy_ fills the model
    for key, w in ours.items():
        target = own[key]
        if key in ("transformer.wte.weight", "lm_head.weight"):
            target = target[:w.size(0)]  # padded rows keep their init; their logits are sliced off
        if target.shape != w.shape:
            raise ValueError(f"{file}: tensor for {key} is {tuple(w.shape)}, the config says {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(w)
    return model


def _config_from_hf(path, hf, dropout):
    """The GPTConfig of a transformers config.json of one of our three forms."""
    kind = hf.get("model_type")

    def need(ok, problem):
        if not ok:
            raise ValueError(f"{path} holds a {kind} model; only GPT-2 weights, and Llama and OpenAI GPT "
                             f"models of our presets' forms (as export.py writes them), map onto this GPT: {problem}")

    need(kind in ("gpt2", "llama", "openai-gpt"), "an unknown model_type")
    keys = {"llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings", "vocab_size")}.get(kind, ("n_embd", "n_layer", "n_head",
                                                                          "n_positions", "vocab_size"))
    missing = [k for k in keys if not isinstance(hf.get(k), int)]
    need(not missing, f"config.json lacks {', '.join(missing)}")
    tied = hf.get("tie_word_embeddings", kind != "llama")
    if kind == "gpt2":
        need(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), "not the tanh GELU")
        need(tied, "an untied head")
        return GPTConfig.preset("gpt2", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                                block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                                ffn_hidden=hf.get("n_inner") or 0, dropout=dropout)
    if kind == "openai-gpt":
        need(hf.get("afn", "gelu") == "gelu", f"activation {hf.get('afn')!r}, not the tanh GELU ('gelu')")
        need(hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "layer_norm_epsilon other than 1e-5")
        return GPTConfig.preset("gpt1", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                                block_size=hf["n_positions"], vocab_size=hf["vocab_size"], dropout=dropout,
                                tie_weights=tied)
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    need(hf.get("num_key_value_heads", nh) == nh, "grouped-query attention (num_key_value_heads < heads)")
    need(hf.get("head_dim", C // nh) == C // nh, "head_dim is not hidden_size / heads")
    need(rope.get("rope_type", rope.get("type", "default")) == "default", "scaled RoPE")
    need(hf.get("hidden_act", "silu") == "silu" and hf.get("rms_norm_eps") == 1e-6,
         "an activation other than silu or rms_norm_eps other than 1e-6")
    need(hf.get("attention_bias", False) == hf.get("mlp_bias", False), "biases in attention but not the MLP")
    ffn = hf["intermediate_size"]  # 0 when it is the width the preset derives (so configs compare equal)
    return GPTConfig.preset("modern", n_layer=hf["num_hidden_layers"], n_head=nh, n_embd=C,
                            block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                            ffn_hidden=0 if ffn == GPTConfig.preset("modern", n_embd=C, n_head=nh).mlp_hidden
                            else ffn, rope_theta=float(theta), bias=hf.get("attention_bias", False),
                            tie_weights=tied, dropout=dropout)


def _load_weights(path):
    """({name: tensor}, file) from model.safetensors (needs safetensors) or pytorch_model.bin."""
    st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"reading {st} needs the safetensors package: pip install safetensors") from None
        return load_file(st), st
    if os.path.exists(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True), bin_  # weights_only: no pickled code
    raise ValueError(f"no model.safetensors or pytorch_model.bin in {path}")


# ---- the tokenizer -------------------------------------------------------------------------------------

def byte_chars():
    """GPT-2's table byte -> printable character: printable Latin-1 bytes stand for themselves, the
    other 68 (control characters, space, ...) for the characters from U+0100 on. A token's bytes then
    read as a string with no spaces or control characters in it, which is what BPE files hold."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def onig_pattern(pattern):
    """Our split regex (Python regex / tiktoken syntax) as Oniguruma, which tokenizers uses, reads it.
    Both take possessive ?+ *+ ++, but Oniguruma reads a counted X{1,3}+ as (X{1,3})+, a repeat of a
    repeat (cl100k's digits rule); the atomic group (?>X{1,3}) is what tiktoken means."""
    atom = r"(\\p\{\w+\}|\\.|\[(?:\\.|[^\]])*\]|[^\\\[\](){}|])"  # \p{L}, \d, [...], one char
    out = regex.sub(atom + r"(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pattern)
    if regex.search(r"\)\{\d+(?:,\d*)?\}\+", out):
        raise ValueError(f"cannot translate the possessive repeat of a group in {pattern!r} for tokenizers")
    return out


def tokenizer_json(ids, merges, pattern, special_tokens):
    """tokenizer.json (a dict) for a byte-level BPE. ids: {token bytes: id} of the mergeable tokens;
    merges: (left bytes, right bytes) pairs in the order they were learned; pattern: the split regex."""
    table = byte_chars()
    text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(pattern)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(b): i for b, i in sorted(ids.items(), key=lambda kv: kv[1])},
                  "merges": [[text(a), text(b)] for a, b in merges]},
    }


# tiktoken builds its gpt2 encoding from these two files of OpenAI's GPT-2 release (tiktoken_ext)
GPT2_FILES = {"merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                             "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
              "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                             "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")}


def tokenizer_files(tok, max_length):
    """{file name: text} of the Hugging Face tokenizer for a bpe.py Tokenizer: tokenizer.json,
    tokenizer_config.json and, for GPT-2's vocabulary, GPT-2's own vocab.json and merges.txt."""
    files = {}
    if tok.merges is not None:
        ids = {b: i for i, b in enumerate(tok.vocab)}
        merges = [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges]
    else:  # GPT-2's files, read through tiktoken's cache (downloaded once, as tiktoken itself does)
        from tiktoken.load import read_file_cached
        try:
            for name, (url, sha) in GPT2_FILES.items():
                files[name] = read_file_cached(url, sha).decode("utf-8")
        except Exception as e:
            raise ValueError(f"cannot read GPT-2's tokenizer files ({type(e).__name__}: {e}); they are downloaded "
                             f"once, so run with network access or set TIKTOKEN_CACHE_DIR to a cache that has "
                             f"them") from None
        unbyte = {c: b for b, c in byte_chars().items()}
        raw = lambda s: bytes(unbyte[c] for c in s)  # noqa: E731
        ids = {raw(s): i for s, i in json.loads(files["vocab.json"]).items() if s not in tok.special_tokens}
        merges = [tuple(map(raw, line.split())) for line in files["merges.txt"].split("\n")[1:] if line]
    files["tokenizer.json"] = json.dumps(tokenizer_json(ids, merges, tok.pattern, tok.special_tokens),
                                         ensure_ascii=False)
    eot = "<|endoftext|>" if "<|endoftext|>" in tok.special_tokens else None
    files["tokenizer_config.json"] = json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "bos_token": eot, "eos_token": eot, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False}, indent=2)
    return files
