"""
model.py: one decoder-only Transformer that is GPT-1, GPT-2 or a modern variant, by config switches.

Token ids (B, T) look up a vector each (wte), plus one per position for learned positions (wpe).
n_layer blocks mix them: causal self-attention lets each position read those before it, an MLP
transforms each position alone. lm_head (usually wte's matrix) scores the vocabulary for the next token.
  gpt1    (Radford et al. 2018)  post-LayerNorm, learned positions, GELU, dropout 0.1, context 512
  gpt2    (Radford et al. 2019)  pre-LayerNorm + final LayerNorm, context 1024, scaled residual init
  modern  (Llama-style)          pre-RMSNorm, rotary positions (RoPE), SwiGLU, no biases, context 4096
modded-nanogpt's ReLU^2, QK-norm, logit soft-capping and zero-init are switches too, off in every preset.
Module names are Hugging Face GPT-2's, so OpenAI's weights map one to one (hf.py converts both ways).
Speed: attention is one F.scaled_dot_product_attention call (Flash kernels on GPU; no (T, T) matrix);
the embedding is padded to a multiple of 64 rows for the output matmul's sake, and the padded logits
are sliced off inside this file, so they are never sampled or scored. KVCache keeps each layer's keys
and values, so generation (decode.py) runs one new token at a time.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

@dataclass
class GPTConfig:
    block_size: int = 1024      # context length: the most positions one forward may see
    vocab_size: int = 50257     # real vocabulary size (the tokenizer's); see padded_vocab_size
    vocab_multiple: int = 64    # embedding rows are padded up to a multiple of this, for matmul speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = 0         # MLP width; 0 = 4*n_embd (gelu) or 8/3*n_embd rounded up to 64 (swiglu)
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm layers
    norm: str = "layernorm"     # "layernorm" | "rmsnorm"
    prenorm: bool = True        # normalise each sublayer's input (GPT-2) or the residual sum (GPT-1)
    pos: str = "learned"        # "learned" absolute embeddings | "rope" rotary (Su et al. 2021)
    rope_theta: float = 10000.0
    mlp: str = "gelu"           # "gelu" | "swiglu" (Shazeer 2020) | "relu2": relu(x)^2 (So et al. 2021)
    qk_norm: bool = False       # RMSNorm each head's queries and keys: attention logits stay bounded
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), smoothly bounded (Gemma 2)
    zero_init: bool = False     # the blocks' output projections start at 0: each block starts as identity
    tie_weights: bool = True    # lm_head shares wte's matrix (Press & Wolf 2017)
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~1/3 more compute

    def __post_init__(self):
        for field, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")),
                               ("mlp", ("gelu", "swiglu", "relu2"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd a multiple of n_head")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")

    @property
    def mlp_hidden(self):
        if self.ffn_hidden:  # resolved here, not stored, so dataclasses.replace(mlp=...) stays consistent
            return self.ffn_hidden
        # SwiGLU has three matrices instead of two; 8/3*d keeps the MLP's parameters at 8*d^2 like
        # GELU's 4*d hidden (Shazeer 2020, Llama), rounded up to 64 for kernel-friendly shapes
        return 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def padded_vocab_size(self):
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @classmethod
    def preset(cls, name, **overrides):
        presets = {
            # 256 byte tokens + 40,000 merges + <|endoftext|> (GPT-1's 40,478 had a character base)
            "gpt1": dict(block_size=512, vocab_size=40257, dropout=0.1, prenorm=False),
            "gpt2": dict(block_size=1024, vocab_size=50257),
            # tied head: at this size the 50k x 768 table is a third of all weights (bench/README.md)
            "modern": dict(block_size=4096, vocab_size=50257, bias=False, norm="rmsnorm", pos="rope",
                           mlp="swiglu"),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})


def make_norm(config):
    if config.norm == "rmsnorm":  # scale by 1/RMS only, no mean subtraction (Zhang & Sennrich 2019)
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return nn.LayerNorm(config.n_embd, bias=config.bias)  # eps 1e-5, as GPT-2


def rope_tables(config):
    """cos and sin of position * frequency, each (block_size, head_dim/2), for rotary embeddings."""
    hd = config.n_embd // config.n_head
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + hd/2]) of x (B, nh, T, hd) by its position's angle. The dot
    product of a rotated query and key then depends only on their distance (Su et al. 2021)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hd/2), broadcast over batch and heads
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Every layer's keys and values so far, k[layer] and v[layer]: (B, nh, capacity, hd). Row b has its own
    length pos[b] (on the CPU: no device sync to read), so generations at different points (serve.py) decode
    in one forward. Allocated at the first write, in the dtypes the layer gave (under autocast a QK-normed key
    is float32, a value bf16). static: one shape for every step, pos on `device`, for decode.py to compile.
    Lowering pos[b] drops row b's last positions at no cost (speculative.py rolls back rejected tokens so):
    attention never reads a column past a row's length, and the row's next tokens overwrite it."""

    def __init__(self, n_layer, batch, capacity, static=False, device="cpu"):
        self.n_layer, self.capacity, self.static = n_layer, capacity, static
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.k = self.v = None

    def allocate(self, k, v):  # k, v: one layer's (B', nh, T, hd), for the head shape and the dtypes
        # a tensor per layer: torch.compile writes into a whole tensor in place, but one it writes through a
        # view (k[layer] of a single tensor) it copies whole, at every step
        shape = (len(self.pos), k.size(1), self.capacity, k.size(3))
        self.k = [torch.zeros(shape, dtype=k.dtype, device=k.device) for _ in range(self.n_layer)]
        self.v = [torch.zeros(shape, dtype=v.dtype, device=v.device) for _ in range(self.n_layer)]

    def update(self, layer, k, v, positions):
        """Write k, v (B, nh, T, hd) at cache `positions` (one slice of columns, or each row's own (B, T)); return
        this layer's (B, nh, L, hd), L the longest row's new length (static: the capacity; the mask hides the rest)."""
        if self.k is None:
            self.allocate(k, v)
        (K, V), B = (self.k[layer], self.v[layer]), k.size(0)
        L = self.capacity if self.static else int(self.pos[:B].max()) + k.size(2)
        if isinstance(positions, slice):
            K[:B, :, positions], V[:B, :, positions] = k, v
        else:  # advanced indices around a slice: the indexed shape (B, T) comes first, then (nh, hd)
            rows = torch.arange(B, device=k.device)[:, None]
            K[rows, :, positions] = k.transpose(1, 2).to(K.dtype)
            V[rows, :, positions] = v.transpose(1, 2).to(V.dtype)
        return K[:B, :, :L], V[:B, :, :L]

    def copy_rows(self, dst, src, rows):
        """Rows `rows` of the cache src (keys, values, lengths) into rows dst of this one: serve.py moves
        prefilled prompts into its batch, and a finished row's place to another row, this way."""
        if self.k is None:
            self.allocate(src.k[0], src.v[0])
        n = int(src.pos[rows].max())
        for mine, theirs in zip(self.k + self.v, src.k + src.v):
            mine[dst, :, :n] = theirs[rows, :, :n]
        self.pos[dst] = src.pos[rows].to(self.pos.device)  # a static cache keeps its lengths on the device


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one gain vector of size hd, shared by all heads (as modded-nanogpt, Qwen3)
            hd = config.n_embd // config.n_head
            self.q_norm, self.k_norm = nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)

    def forward(self, x, rope=None, cache=None, layer=0, mask=None, cache_positions=None):
        """x (B, T, C); rope: (cos, sin) of the T new positions. With a cache, this layer's k and v are written
        at cache_positions (see KVCache.update) and queries see the columns `mask` allows; mask None:
        causal over T x T (training, a prefill), or every cached column for T = 1."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hd): each head attends independently over its hd = C/nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):  # QK-norm (Dehghani et al. 2023): a query.key logit is at most
            # |gain|^2 * sqrt(hd), whatever the weights, so a high learning rate cannot blow up the softmax
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_positions)  # (B, nh, L, hd)
        # is_causal aligns its mask top-left, right only when T_q = T_k; any other case has a mask.
        # bool(): a plain flag even when torch.compile sees T as symbolic
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=bool(mask is None and T > 1))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        h = config.mlp_hidden
        # SwiGLU's gate and up projections share one matmul (c_fc is 2h wide), then split
        self.c_fc = nn.Linear(config.n_embd, 2 * h if self.kind == "swiglu" else h, bias=config.bias)
        self.c_proj = nn.Linear(h, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, h) or (B, T, 2h)
        if self.kind == "swiglu":
            up, gate = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":  # Primer's squared ReLU: sparse like ReLU, smooth at 0, one matmul fewer than SwiGLU
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # the tanh form GPT-1/2 were trained with
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.prenorm = config.prenorm
        self.ln_1, self.attn = make_norm(config), CausalSelfAttention(config)
        self.ln_2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0, mask=None, cache_positions=None):
        """x (B, T, C) -> (B, T, C); the other arguments are attention's (CausalSelfAttention.forward)."""
        if self.prenorm:  # GPT-2: the residual stream is never normalised, gradients flow straight through
            x = x + self.attn(self.ln_1(x), rope, cache, layer, mask, cache_positions)
            return x + self.mlp(self.ln_2(x))
        # GPT-1 / original Transformer: post-norm, the sum after each sublayer is normalised
        x = self.ln_1(x + self.attn(x, rope, cache, layer, mask, cache_positions))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            wpe=nn.Embedding(config.block_size, C) if config.pos == "learned" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            # post-norm blocks already end in a norm; pre-norm needs one before the head (GPT-2)
            ln_f=make_norm(config) if config.prenorm else nn.Identity(),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos == "rope":  # not persistent: derived from the config, kept out of checkpoints
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # The projections that write into the residual stream (c_proj). GPT-2: each block adds two, so the
        # stream's variance grows with depth; scaling their init by 1/sqrt(2*n_layer) keeps it constant.
        # Post-norm renormalises the sum after every add, so GPT-1 keeps plain N(0, 0.02). zero_init
        # (modded-nanogpt): every block starts as the identity and the stream holds only the embedding;
        # c_proj still gets gradients (its input is not 0), and through it the rest of the block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init:
                    nn.init.zeros_(p)
                elif config.prenorm:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):  # N(0, 0.02) as GPT-1 and GPT-2
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count. non_embedding drops tables that are only looked up (wpe, and wte when the
        head is untied); a tied wte stays, as it is also the output matmul. That N is what 6N uses."""
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        if non_embedding:
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def _check_input(self, idx, start, cache=None):
        """ValueError before any tensor math: a bad id would be a CUDA device-side assert deep in torch."""
        if idx.dim() != 2 or idx.size(1) == 0 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) integer tensor with T >= 1, got {tuple(idx.shape)} {idx.dtype}")
        if start + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.size(1)} tokens is longer than the context "
                             f"block_size={self.config.block_size}; crop it to the last {self.config.block_size}")
        if cache is not None and (start + idx.size(1) > cache.capacity or idx.size(0) > len(cache.pos)):
            raise ValueError(f"{tuple(idx.shape)} new tokens after {start} do not fit a KVCache of "
                             f"{len(cache.pos)} rows x {cache.capacity} positions")
        # min/max wait for the GPU (a host sync), which would stall every training step; so ids are
        # checked except in training on an accelerator and under torch.compile (train.py checks the
        # tokenizer's vocab against the model once instead) and on decode steps (ids we sampled)
        if (idx.device.type == "cpu" or not self.training) and start == 0 \
                and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, "
                                 f"{self.config.vocab_size}); the tokenizer and the model's vocab_size disagree")

    def hidden_states(self, idx, cache=None):
        """idx (B, T) ids -> (B, T, C) final hidden states, after the last norm: what the head reads,
        and what a task head reads (finetune.py). cache: a KVCache whose first B rows each continue
        from their own length cache.pos[b]; the T new tokens are appended to them."""
        B, T = idx.shape
        # pos: the new tokens' positions; cache_positions: the cache columns their keys and values go to
        pos, mask, cache_positions, start = torch.arange(T, device=idx.device), None, None, 0
        if cache is not None and cache.static:  # the rows-at-different-lengths path over the whole capacity and
            # no host reads; start stays 0 (its length check is the caller's, decode.Decoder, which knows it)
            pos = cache_positions = cache.pos[:B, None] + pos  # (B, T)
            mask = (torch.arange(cache.capacity, device=idx.device) <= pos[..., None])[:, None]  # (B, 1, T, cap)
        elif cache is not None:
            first, start = int(cache.pos[0]), int(cache.pos[:B].max())
            if bool((cache.pos[:B] == first).all()):  # every row at one length: plain column slices
                pos, cache_positions = pos + first, slice(first, first + T)
                if first and T > 1:  # a chunk after a prefix: causal within it, all of the prefix
                    mask = torch.arange(first + T, device=idx.device) <= pos[:, None]  # (T, L)
            else:  # rows at different lengths: each its own positions, blind to the columns past its own
                pos = cache_positions = cache.pos[:B].to(idx.device)[:, None] + pos  # (B, T)
                mask = (torch.arange(start + T, device=idx.device) <= pos[..., None])[:, None]  # (B, 1, T, L)
        self._check_input(idx, start, cache)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos)  # + (T, C), or (B, T, C) for per-row positions
        else:  # cos, sin (T, hd/2), or (B, 1, T, hd/2) to broadcast over the heads
            rope = tuple(t[pos] if pos.dim() == 1 else t[pos][:, None] for t in (self.rope_cos, self.rope_sin))
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            attend = dict(rope=rope, cache=cache, layer=layer, mask=mask, cache_positions=cache_positions)
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                # keep only the block's input; rerun it in backward (non-reentrant: works with
                # torch.compile, and restores the RNG so dropout masks repeat exactly)
                x = checkpoint(block, x, **attend, use_reentrant=False)
            else:
                x = block(x, **attend)
        if cache is not None:
            cache.pos[:B] += T
        return self.transformer.ln_f(x)

    def head(self, h, float32=False):
        """Hidden states (..., C) -> logits (..., vocab_size). The padded columns are sliced off, so
        the softmax is over real tokens only (torch.compile fuses the slice into the loss). float32:
        in float32 even if the weights were cast to 16 bits (device.for_inference)."""
        w = getattr(self.lm_head, "weight", None)  # quantize.py's int8 head has none, and computes in float32
        if float32 and w is not None and w.dtype != torch.float32:
            logits = F.linear(h, w.float())[..., :self.config.vocab_size]
        else:
            logits = self.lm_head(h)[..., :self.config.vocab_size]
        if self.config.logit_softcap:  # tanh squashes only the extremes: a logit of cap/2 loses 8%
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def log_probs(self, h):
        """(..., C) -> float32 log-probabilities (..., vocab_size), autocast off, for scoring: logits sit
        around -60 to -75, where bf16's steps are 0.5 (up to 0.25 nats off a token)."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float(), float32=True).log_softmax(-1)

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) -> (logits, None): (B, T, vocab_size), or with a cache (B, 1, vocab_size) at the last
        position only (the head is the largest matmul). With targets (B, T) (-1 = ignore) -> (None, loss):
        no logits kept alive through backward (3 GB in bf16 at batch 32, 50k vocabulary); the mean over
        scored tokens, or with reduction="none" one loss per token, (B, T), 0 where ignored."""
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.head(h[:, -1:] if cache is not None else h), None
        # autocast runs the log-softmax inside cross_entropy in float32
        loss = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return None, loss.view_as(targets) if reduction == "none" else loss

    def flops_per_token(self, T=None):
        """Training FLOPs per token, PaLM appendix B (Chowdhery et al. 2022): 6N for the weight matmuls plus
        12*L*H*Q*T for attention (L layers, H heads, head size Q, length T; the masked half counted too)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * (T or c.block_size)

    def estimate_mfu(self, tokens_per_sec, peak_flops, T=None):
        """Model FLOPs utilisation: achieved model FLOPs per second as a fraction of the device's peak."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops
