"""
model.py: one decoder-only Transformer that is GPT-1, GPT-2 or a modern long-context variant,
depending on a handful of plain config switches.

A GPT reads token ids (B, T), looks up a vector per token (wte) and, for learned positions, adds a
vector per position (wpe). A stack of n_layer blocks then mixes information: causal self-attention
lets each position read the positions before it, an MLP transforms each position on its own. A final
linear layer (lm_head, usually sharing wte's matrix) scores every vocabulary entry for the next token.

The three presets differ only in switches that each have a field in GPTConfig:
  gpt1    (Radford et al. 2018)  post-LayerNorm, learned positions, GELU, dropout 0.1, context 512
  gpt2    (Radford et al. 2019)  pre-LayerNorm + final LayerNorm, context 1024, scaled residual init
  modern  (Llama-style)          pre-RMSNorm, rotary positions (RoPE), SwiGLU MLP, no biases, 4096 context
Four more switches come from modded-nanogpt's speed records and are off in every preset: a ReLU^2 MLP,
QK-norm, logit soft-capping and zero-initialised output projections.
Module names follow Hugging Face's GPT-2 (transformer.wte, wpe, h.N.attn.c_attn, ...) so OpenAI's
released weights map one to one in GPT.from_pretrained.

Speed choices: attention is one call of F.scaled_dot_product_attention (FlashAttention /
memory-efficient kernels on GPU, never materialising the (T, T) matrix); the embedding table is
padded to a multiple of 64 rows so the big output matmul has GPU-friendly shapes, and the padded
logits are sliced off, so nobody outside this file ever sees them (they can be neither sampled nor
scored). Generation keeps a KV cache: one forward over the prompt, then one token per step.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
            # tied head: at this size the 50k x 768 table is a third of all weights (README)
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
    """Keys and values of every layer for the tokens seen so far, so each new token attends to them
    without recomputing. Tensors (n_layer, B, nh, capacity, hd), filled up to position `pos`."""

    def __init__(self, n_layer, capacity):
        self.n_layer, self.capacity, self.pos, self.k, self.v = n_layer, capacity, 0, None, None

    def update(self, layer, k, v):
        if self.k is None:  # allocated on first use, in the dtype autocast gives k and v
            shape = (self.n_layer, *k.shape[:2], self.capacity, k.size(3))
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty_like(self.k)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hd): each head attends independently over its hd = C/nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):  # QK-norm (Dehghani et al. 2023): a query.key logit is at most
            # |gain|^2 * sqrt(hd), whatever the weights, so a high learning rate cannot blow up the softmax
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate at absolute positions pos..pos+T-1 (cache.pos on decode steps)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, pos+T, hd)
        # A prefill (or training) is causal over T x T. A decode step (T=1, the only step a filled
        # cache takes) may see every cached key, so no mask; is_causal with T_q != T_k would align
        # the mask top-left, which is wrong. bool(): a plain flag even when torch.compile sees T as symbolic
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=bool(T > 1))
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

    def forward(self, x, rope=None, cache=None, layer=0):
        if self.prenorm:  # GPT-2: the residual stream is never normalised, gradients flow straight through
            x = x + self.attn(self.ln_1(x), rope, cache, layer)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, rope, cache, layer))  # GPT-1 / original Transformer: post-norm
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

    def _check_input(self, idx, start):
        """Raise ValueError on bad input before any tensor math (an out-of-range id would otherwise be
        a CUDA device-side assert or an index error deep inside torch)."""
        if idx.dim() != 2 or idx.size(1) == 0 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) integer tensor with T >= 1, got {tuple(idx.shape)} {idx.dtype}")
        if start + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.size(1)} tokens is longer than the context "
                             f"block_size={self.config.block_size}; crop it to the last {self.config.block_size}")
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
        and what a task head reads (finetune.py). cache: a KVCache; positions continue from cache.pos."""
        start = cache.pos if cache is not None else 0
        if start and idx.size(1) > 1:  # the attention below has no mask for T new tokens after a prefix
            raise ValueError(f"a step with a filled KVCache takes one token, got {idx.size(1)}")
        self._check_input(idx, start)
        T = idx.size(1)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))  # + (T, C)
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # (T, hd/2) each
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                # keep only the block's input; rerun it in backward (non-reentrant: works with
                # torch.compile, and restores the RNG so dropout masks repeat exactly)
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def head(self, h):
        """Hidden states (..., C) -> logits (..., vocab_size). The padded columns are sliced off, so
        the softmax is over real tokens only (torch.compile fuses the slice into the loss)."""
        logits = self.lm_head(h)[..., :self.config.vocab_size]
        if self.config.logit_softcap:  # tanh squashes only the extremes: a logit of cap/2 loses 8%
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) ids -> (logits, loss).
        Without targets: logits (B, T, vocab_size) at every position, and loss None. With a cache
        (generation): logits (B, 1, vocab_size) at the last position only, as the head is the
        largest matmul and only the last position is sampled.
        With targets (B, T) (-1 = ignore): logits None, so they are not kept alive through backward
        (at batch 32 with a 50k vocabulary they are 3 GB in bf16), and the cross-entropy: the mean
        over scored tokens, or with reduction="none" one loss per token, (B, T), 0 where ignored."""
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.head(h[:, -1:] if cache is not None else h), None
        # autocast runs the log-softmax inside cross_entropy in float32
        loss = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return None, loss.view_as(targets) if reduction == "none" else loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, optimizer="adamw",
                             embedding_lr_scale=1.0):
        """A list of optimizers covering every trainable parameter once. AdamW decays matrices and
        embeddings (dim >= 2) only: biases and norm gains stay free, as GPT-1 did ("all non bias or
        gain weights"); decaying a gain shrinks a scale, not a feature. fused=True on CUDA does the
        whole update in one kernel per group. optimizer="muon" (Jordan et al. 2024) hands the 2-D
        matrices inside the blocks to Muon, which orthogonalises each update (Newton-Schulz), so all
        directions of a matrix learn at a similar rate; embeddings, the head, norms and biases stay
        with AdamW, as Muon is meant for hidden matrices. Its match_rms_adamw scaling (Liu et al.
        2025) gives Muon's update AdamW's size, so one learning_rate and weight_decay serve both.
        An untied input embedding gets a group of its own: learning_rate * embedding_lr_scale, no weight
        decay. It is a lookup table whose rows move only when their token occurs, read through the first
        block's norm, so what counts is a row's direction and an lr sized for matrices turns it slowly;
        modded-nanogpt runs its embedding at 75x the head's lr. Without decay, as lr * weight_decay at
        that lr would shrink the table by a percent a step. Each group's "lr_scale" is what train.py's
        schedule multiplies."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={optimizer!r} is not one of 'adamw', 'muon'")
        if embedding_lr_scale != 1.0 and self.config.tie_weights:
            raise ValueError(f"embedding_lr_scale={embedding_lr_scale} needs an untied head (tie_weights=False): "
                             f"a tied embedding is also the output layer, which a large lr would wreck")
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = [p for n, p in params if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
        table = [p for n, p in params if n == "transformer.wte.weight" and not self.config.tie_weights]
        rest = [p for _, p in params if not any(p is q for q in hidden + table)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
        if table:
            groups.append({"params": table, "weight_decay": 0.0, "lr_scale": embedding_lr_scale,
                           "lr": learning_rate * embedding_lr_scale})
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")]
        if hidden:
            optimizers.append(torch.optim.Muon([{"params": hidden, "lr_scale": 1.0}], lr=learning_rate,
                                               weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        return optimizers

    def flops_per_token(self, T=None):
        """Training FLOPs per token, PaLM appendix B (Chowdhery et al. 2022): 6N for the weight matmuls
        (2 forward + 4 backward per parameter) plus 12*L*H*Q*T for attention scores and their use on
        the values (L layers, H heads, head size Q, sequence length T, default block_size; the
        causally masked half is counted too, as PaLM does)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * (T or c.block_size)

    def estimate_mfu(self, tokens_per_sec, peak_flops, T=None):
        """Model FLOPs utilisation: achieved model FLOPs per second as a fraction of the device's peak."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None):
        """Continue idx (B, T) one token at a time, yielding each new token as a (B, 1) tensor so a
        caller can print as it goes. temperature 0 (or top_k=1) is greedy; top_k keeps the k likeliest
        tokens, top_p the smallest set whose probability reaches p (nucleus sampling). With eos_token,
        a row that emits it keeps emitting it, and the stream stops once every row has (the eos itself
        is yielded). Call model.eval() first, or dropout stays on.

        KV cache: one forward over the prompt fills every layer's keys and values, then each step feeds
        only the newest token. Like recomputing from scratch, the model always conditions on the last
        block_size tokens (positions beyond the context were never trained, for learned or rotary
        positions alike); once the sequence is longer than that, every step re-runs the cropped window,
        because dropping the oldest token changes every hidden state after it. Greedy output is
        therefore identical, token for token, to recomputing the cropped sequence at every step."""
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got temperature="
                             f"{temperature}, top_k={top_k}, top_p={top_p}")
        bs = self.config.block_size
        cache = KVCache(self.config.n_layer, min(bs, idx.size(-1) + max_new_tokens))
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache.pos == 0 or idx.size(1) > bs:  # prefill: the prompt, or the window that slid on
                cache.pos = 0
                logits, _ = self(idx[:, -bs:], cache=cache)
            else:  # decode: one token at position cache.pos, attending to everything cached
                logits, _ = self(idx[:, -1:], cache=cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
            if eos_token is not None:
                nxt = torch.where(done[:, None], eos_token, nxt)
                done |= nxt[:, 0] == eos_token
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt
            if eos_token is not None and bool(done.all()):
                return

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None):
        """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (fewer only if eos_token stops
        every row). See generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token))
        return torch.cat([idx, *new], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=None):
        """OpenAI's GPT-2 weights in Hugging Face format: a name in HF_GPT2_NAMES (downloaded with
        huggingface_hub, which comes with transformers; needs a network) or a local directory written
        by transformers' save_pretrained (config.json + model.safetensors or pytorch_model.bin)."""
        path = name_or_dir
        if not os.path.isdir(path):
            if name_or_dir not in HF_GPT2_NAMES:
                raise ValueError(f"{name_or_dir!r} is neither a directory nor one of {', '.join(HF_GPT2_NAMES)}")
            from huggingface_hub import snapshot_download  # comes with transformers/datasets; only here
            try:
                path = snapshot_download(f"openai-community/{name_or_dir}",
                                         allow_patterns=["config.json", "model.safetensors"])
            except Exception as e:  # offline, proxy, disk full: one line instead of an HTTP traceback
                raise ValueError(f"could not download {name_or_dir} from the Hugging Face hub ({type(e).__name__}: "
                                 f"{e}); check the network or pass a local save_pretrained directory") from e
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"no config.json in {path}; pass a directory written by save_pretrained")
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type") != "gpt2" or hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path} holds a {hf.get('model_type')} model; only GPT-2 (tanh GELU) weights map onto this GPT")
        config = GPTConfig.preset("gpt2", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                                  block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                                  ffn_hidden=hf.get("n_inner") or 0, dropout=dropout or 0.0)
        sd, file = _load_hf_weights(path)
        model = cls(config)
        own = model.state_dict()  # tensors sharing storage with the parameters: copy_ fills the model
        loaded = set()
        for hf_key, w in sd.items():
            key = hf_to_ours(hf_key)
            if key is None:
                continue
            target = own.get(key)
            if target is not None and key.endswith(_CONV1D):
                w = w.t()  # HF's Conv1D stores (in, out); nn.Linear holds (out, in)
            if key == "transformer.wte.weight" and target is not None:
                target = target[:w.size(0)]  # padded rows keep their init; their logits are sliced off
            if target is None or target.shape != w.shape:
                raise ValueError(f"{file}: tensor {hf_key} {tuple(w.shape)} has no match in this GPT "
                                 f"{tuple(target.shape) if target is not None else ''}")
            target.copy_(w)
            loaded.add(key)
        missing = set(own) - loaded - {"lm_head.weight"}
        if missing:
            raise ValueError(f"{file} lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        return model

    def hf_state_dict(self):
        """This model's weights under Hugging Face GPT2LMHeadModel's names and layouts (for export):
        the inverse of from_pretrained. Only the GPT-2 architecture has such a form."""
        c = self.config
        if (c.norm, c.pos, c.mlp, c.prenorm, c.tie_weights) != ("layernorm", "learned", "gelu", True, True):
            raise ValueError("only the gpt2 architecture (pre-LayerNorm, learned positions, GELU, tied head) "
                             "maps onto Hugging Face's GPT2LMHeadModel")
        sd, out = self.state_dict(), {}
        for key, w in sd.items():
            if key == "lm_head.weight":
                continue  # tied: HF ties it to wte when loading
            w = w[:c.vocab_size] if key == "transformer.wte.weight" else w  # drop the padding rows
            out[key] = (w.t() if key.endswith(_CONV1D) else w).contiguous()
            bias = key.removesuffix("weight") + "bias"
            if key.endswith("weight") and "wte" not in key and "wpe" not in key and bias not in sd:
                out[bias] = torch.zeros(w.size(0), dtype=w.dtype)  # trained without biases: HF's are 0
        return out


# Hugging Face's GPT-2 uses the same module names (GPT2LMHeadModel prefixes "transformer."), but its
# Conv1D layers store weights (in, out) where nn.Linear holds (out, in): these are transposed.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(hf_key):
    """A Hugging Face GPT-2 tensor name -> ours, or None for what we do not keep: the old causal-mask
    buffers, and lm_head (tied to wte). Files saved from GPT2Model have no "transformer." prefix."""
    if hf_key.endswith((".attn.bias", ".attn.masked_bias")) or hf_key == "lm_head.weight":
        return None
    return hf_key if hf_key.startswith("transformer.") else "transformer." + hf_key


def _load_hf_weights(path):
    """{name: tensor} from model.safetensors (needs the safetensors package) or pytorch_model.bin."""
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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits of the next token -> (B, 1) sampled ids."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus (Holtzman et al. 2019): in descending order, drop a token once the mass before it
        # already reaches top_p, which always keeps the most likely token
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # back to vocabulary order
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)
