"""
lora.py: low-rank adaptation (LoRA, Hu et al. 2021) of a model's nn.Linear layers.

Fine-tuning changes a pretrained weight W (out, in) by some dW. LoRA bets that dW has low rank and
learns it as a product B @ A, with A (r, in) and B (out, r) for a small rank r, while W stays frozen:

    y = x W^T + b  +  (dropout(x) A^T B^T) * alpha / r

Only A and B train: for GPT-2's c_attn (768 -> 2304) at r = 8 that is 24,576 numbers instead of
1,769,472, and AdamW keeps two moments for each trained number, so the optimizer state shrinks by the
same factor. A starts Kaiming-uniform (as nn.Linear's own weight) and B at zero, so B @ A = 0 and the
adapted model computes exactly what the base model does until the first step moves B. alpha / r
scales the update so that changing r needs no new learning rate (the paper's §4.1).

After training, W + B @ A * alpha / r is an ordinary weight: merge() folds it in, and the model is
again a plain GPT with no extra cost at inference, which export and serving load like any other.
Our layers are nn.Linear (out, in), so the product needs no transpose (GPT-2's Conv1D would).

QLoRA (Dettmers et al. 2023): the frozen base may be a 4-bit quantize.Int4Linear; gradients still flow
through it to the layers below, and only the adapters above train. Merging then cannot stay in 4 bits
(B @ A is not on the 4-bit grid): merged() dequantizes the base, so the merged model computes what the
adapted one did, at float32 size; quantizing it again is a new rounding.
"""
import math

import torch
import torch.nn as nn

from quantize import Int4Linear, dequantized

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the projections of model.py


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or 4-bit Int4Linear) plus a trainable low-rank update B @ A."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = (base.qweight if isinstance(base, Int4Linear) else base.weight).device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, and peft's
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)  # on the adapter's input only; the base sees x as it is

    def forward(self, x):  # (..., in) -> (..., out)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """The base nn.Linear with B @ A * alpha / r added to its weight (in the weight's dtype); a 4-bit
        base is dequantized to float32 first (see the top)."""
        if isinstance(self.base, Int4Linear):
            self.base = dequantized(self.base)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def add(model, targets, rank, alpha, dropout=0.0):
    """Freeze every parameter of model, then wrap each nn.Linear whose name ends with one of targets
    (e.g. "attn.c_attn") in a LoRALinear; its A and B are then the only trainable tensors. Returns the
    names of the wrapped layers. A target that matches no layer is a ValueError, not a silent no-op."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int4Linear))
             and n.endswith(tuple(targets))]
    for t in targets:
        if not any(n.endswith(t) for n in names):
            raise ValueError(f"LoRA target {t!r} matches no nn.Linear layer; choose from {', '.join(TARGETS)}")
    for name in names:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, child, LoRALinear(getattr(module, child), rank, alpha, dropout))
    return names


def merge(model):
    """Fold every LoRALinear in model into a plain nn.Linear, in place; a 4-bit base's other layers are
    dequantized too, so the result is one plain float model. Returns the model."""
    for kind, fold in ((LoRALinear, LoRALinear.merged), (Int4Linear, dequantized)):  # adapters first
        for name, m in list(model.named_modules()):
            if isinstance(m, kind):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, fold(m))
    return model
