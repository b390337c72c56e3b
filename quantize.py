"""
quantize.py: int8 and int4 weights for CPU inference, a file for a quantized model, and the size of a
model's weights.

Why fewer bits. Decoding one token per step reads every weight once per step, and on a CPU that read,
more than the arithmetic, sets the pace. Stored as int8, the Linear weights take a quarter of float32's
bytes; as int4, an eighth (plus a scale and a zero per group of weights).

What is quantized. Every nn.Linear (attention, MLP and the output head) becomes an Int8Linear or an
Int4Linear. Embeddings and norms stay float32 (a lookup and a few vectors). With tied weights, lm_head
gets a quantized copy while wte keeps the float32 table for its lookups.

int8 ("int8"): weights and inputs.
  - weights: int8 once, here, with one scale per output row ("per channel"), so one large row does
    not coarsen the grid of all the others as a single scale per matrix would;
  - inputs: int8 on the fly at every call ("dynamic": no calibration data), with one scale per row,
    that is per token ("per-token"). The matrix product runs in int8 and comes back in float32.
The implementation is PyTorch's own: torch.ao.quantization.quantize_dynamic quantizes the weights,
and its dynamic Linear calls the int8 GEMM (fbgemm on x86, qnnpack on ARM). One thing is added here.
That Linear picks one input range per call, over all rows at once, and in a server the rows are
different requests decoded together (serve.py): a row's rounding would then depend on its neighbours,
so its greedy text could change with the traffic, and one outlier row would coarsen every other. So
each row is first divided by its own largest magnitude, which puts it in [-1, 1], and two constant
rows of +1 and -1 are appended, which pins the range the Linear sees to exactly [-1, 1] on every call.
Every row is then quantized on the same grid whatever else is in the batch, and the output is
multiplied back by the row's magnitude: per-token int8, the same for a row alone or in a batch.
Why not torchao, PyTorch's newer home for quantization (torch.ao prints a deprecation notice, silenced
here). Its int8 configs on CPU expect torch.compile to generate fused kernels; in eager mode they
were slower than float32 on this project's 2-core CPU, while torch.ao's Linear calls the int8 GEMM
directly (bench/README.md). torch.ao also ships inside torch, so int8 adds no dependency.

int4 ("int4", "int4-gptq"): weights only, in groups. Sixteen levels are too few for one grid per row:
each run of group_size consecutive weights of a row (128 by default) gets its own scale s and zero z,
and a weight is stored as a code q in 0..15 that stands for (q - 8) * s + z. With zero points (the
default) the 16 levels span the group from its min to its max; symmetric=True keeps z = 0 and spans
+-max|w|, one number fewer per group. Inputs stay in floating point ("weight-only"): activations have
outliers that 4 bits cannot hold, and at batch 1 the weights are what the time is spent reading.
Two ways to choose the codes:
  - "int4": round to nearest (RTN), each weight on its own. The baseline every paper reports.
  - "int4-gptq": GPTQ (Frantar et al. 2022), see gptq below. It rounds the columns of a weight matrix
    one at a time and moves the columns not yet rounded to cancel the error made so far, as measured on
    the layer's real inputs (a few hundred sequences of the run's train shards, calibration_rows). The
    Linears are quantized in the order the model runs them, each on the inputs that the already
    quantized ones before it produce, as in the paper.

The int4 matmul. Int4Linear stores the codes two to a byte, and multiplies with torch's own CPU kernel
for int4 weights (aten._weight_int4pack_mm_for_cpu, the one torchao's int4 weight-only config calls),
which unpacks a tile of codes, scales it and multiplies it in registers, so the weights are read from
memory at 4 bits. It was measured (bench/bench_quantize.py, figures in bench/README.md) against float32
F.linear and against unpacking the whole matrix to float32 then F.linear, for the shapes of a 6 x 384
model and its output head, at batch 1 and 16. With bfloat16 inputs it was the fastest of the three on
every shape but the smallest at batch 1 (384 x 384, a few µs); with float32 inputs it takes another, far
slower code path; and unpacking first is slower than float32 itself, since every call writes and reads
back the whole float32 matrix. So Int4Linear rounds its input to bfloat16 (8 bits of mantissa: far
finer than the int4 rounding of the weights) and keeps the scales and zeros in bfloat16 too.
Two copies of the codes are kept: the kernel's tiled layout (_convert_weight_to_int4pack_for_cpu),
which differs with the CPU's vector width (AVX512, AVX2, ...), and a plain one, two codes per byte, that
state_dict, weight_bytes and the file hold, so a file written on one CPU loads on another. In memory
an int4 model therefore holds a byte per weight, as int8 does; what a token's matmuls read is 4 bits.

A quantized model as a file. GPTQ takes minutes on a large model and needs the training data, so a
quantized model can be saved and loaded: save_quantized writes one dict {format, mode, group_size,
symmetric, model_args, tokenizer, state}, state being the quantized model's state_dict. checkpoint.py
reads it back (checkpoint.open_model, or load_quantized for a file that must be one): checkpoint.load is
the one reader of .pt files (torch.load(weights_only=True), only tensors and plain values), and this
file's from_state rebuilds the model with empty quantized Linears of the stored mode and loads the state
into them. So checkpoint.py imports this module and never the reverse. int8 models save the same way.
"""
import copy
import glob
import io
import os
import warnings

import torch
import torch.nn as nn

from atomic import atomic_write
from bpe import Tokenizer
from model import GPT, GPTConfig
from shards import TokenStream

MODES = ("none", "int8", "int4", "int4-gptq")
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel takes
FORMAT = "gpt-quantized-1"        # the file format of save_quantized; bump on any layout change


class Int8Linear(nn.Module):
    """y = x W^T + b for x (..., in), with W int8 per output row and x int8 per row (see above)."""

    def __init__(self, linear):
        super().__init__()
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_only = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        weight_only.weight = linear.weight  # the bias is added after scaling back, in float32
        with warnings.catch_warnings():  # torch.ao's deprecation notice: see the docstring
            warnings.simplefilter("ignore")
            self.int8 = quantize_dynamic(nn.Sequential(weight_only), {nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)[0]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("edges", torch.tensor([[1.0], [-1.0]]).expand(2, self.in_features).contiguous(),
                             persistent=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in): every token is a row
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)  # (N, 1); an all-zero row stays 0
        # rows in [-1, 1], plus the two rows that pin the quantizer's range: (N + 2, in) -> (N, out)
        y = self.int8(torch.cat([x / scale, self.edges]))[:-2] * scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# ---- int4: the grid of a group ----------------------------------------------------------------------

def int4_grid(w, symmetric=False):
    """Scale and zero, each (..., 1), of the 16-level grid for each group of weights w (..., g).
    Both are rounded to bfloat16, as the kernel reads them, before any weight is rounded to the grid."""
    if symmetric:  # levels -7s .. 7s around 0 (code 0, -8s, goes unused): no weight is clipped
        scale = w.abs().amax(dim=-1, keepdim=True) / 7
        zero = torch.zeros_like(scale)
    else:  # codes 0 .. 15 span min .. max
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (hi - lo) / 15
    scale = scale.clamp_min(1e-10).bfloat16().float()  # a constant group: any scale, all weights exact
    if not symmetric:
        zero = (lo + 8 * scale).bfloat16().float()  # the value of code 8
    return scale, zero


def int4_round(w, scale, zero):
    """Codes 0..15 (uint8) of the nearest grid levels to w, for scale and zero broadcast against w."""
    return ((w - zero) / scale + 8).round().clamp(0, 15).to(torch.uint8)


def int4_value(codes, scale, zero):
    """The weights the codes stand for: (q - 8) * s + z."""
    return (codes.float() - 8) * scale + zero


class Int4Linear(nn.Module):
    """y = x W^T + b for x (..., in), with W stored as 4-bit codes in groups of group_size along each
    row, one scale and zero per group (see the docstring at the top).
    codes (out, in) ints 0..15; scale, zero (out, in / group_size). Buffers:
      qweight           (out, in / 2) uint8: code of column 2j in the low 4 bits, 2j + 1 in the high
      scales_and_zeros  (in / group_size, out, 2) bfloat16: the kernel's layout
      packed            the kernel's own tiling of the codes, rebuilt from qweight (not saved)"""

    def __init__(self, codes, scale, zero, bias=None):
        super().__init__()
        N, K = codes.shape
        self.in_features, self.out_features = K, N
        self.group_size = K // scale.size(1)
        if self.group_size not in GROUP_SIZES or K % self.group_size or N % 16:
            raise ValueError(f"int4 needs in_features ({K}) a multiple of group_size (one of {GROUP_SIZES}) and "
                             f"out_features ({N}) a multiple of 16 (torch's int4 kernel); pick another group_size")
        codes = codes.to(torch.uint8)
        self.register_buffer("qweight", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).bfloat16().contiguous())
        self.register_buffer("packed", None, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.repack())
        self.repack()

    def codes(self):
        """(out, in) codes 0..15, unpacked from qweight."""
        return torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).flatten(1)

    def repack(self):
        """Tile the codes for this CPU's kernel (after construction and after loading a state_dict)."""
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().int(), 1)  # int32 in

    def dequantize(self):
        """The (out, in) float32 weights the codes stand for: what forward multiplies by."""
        N, K = self.out_features, self.in_features
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
        codes = self.codes().view(N, K // self.group_size, self.group_size)  # (out, groups, g)
        return int4_value(codes, scale[..., None], zero[..., None]).view(N, K)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in)
        # a frozen base under trainable adapters (QLoRA) still passes gradients on to x
        y = Int4MatMul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def matmul(self, x):  # (N, in) -> (N, out) float32; bfloat16 input: the kernel's fast path (see above)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group_size,
                                                          self.scales_and_zeros).float()


class Int4MatMul(torch.autograd.Function):
    """x W^T with W in 4 bits; backward gives x the gradient g W (the dequantized W) and W none: the
    weights stay frozen, as the base under QLoRA's adapters (Dettmers et al. 2023)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, g):  # g (N, out) -> (N, in)
        return g @ ctx.layer.dequantize().to(g.dtype), None


def dequantized(layer):
    """An Int4Linear as the plain nn.Linear of the weights its codes stand for (float32)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def rtn(linear, group_size=128, symmetric=False):
    """Int4Linear of an nn.Linear by rounding every weight to the nearest level of its group's grid."""
    W = linear.weight.detach().float()
    N, K = W.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    groups = W.view(N, K // group_size, group_size)  # (N, groups, g)
    scale, zero = int4_grid(groups, symmetric)        # (N, groups, 1) each
    codes = int4_round(groups, scale, zero).view(N, K)
    return Int4Linear(codes, scale[..., 0], zero[..., 0], linear.bias)


# ---- GPTQ ----------------------------------------------------------------------------------------

@torch.no_grad()
def gptq(weight, H, group_size=128, symmetric=False, damp=0.01, block=128):
    """GPTQ (Frantar et al. 2022, Algorithm 1) for one Linear: weight (N, K), H (K, K) = 2 X X^T over its
    calibration inputs X (K, tokens). Returns codes (N, K), scale and zero (N, K / group_size).

    The goal is the codes whose weights Q minimise the layer's output error ||W X - Q X||^2, which is
    (W - Q) H (W - Q)^T / 2 row by row. Optimal Brain Surgeon says: after rounding one weight w_i, the
    best change to the weights F not yet rounded is -(w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{i,:}, where
    H_F^-1 is the inverse Hessian over F. GPTQ rounds the columns in one fixed order for every row,
    so all rows share the sequence of sets F = {i, .., K-1}, and the rows [H_F^-1]_{i, i:} it needs are
    U_ii * U[i, i:], U the upper Cholesky factor of H^-1: one factorisation replaces K updates of an
    inverse (the paper's step 3). Lazy batches (step 2): the update of a column only
    matters when it is rounded, so the errors of a batch of `block` columns are applied inside the batch
    one by one, and to the columns after it as one matrix product. With groups, a group's scale and zero
    are taken from its weights as they are when its first column is reached, after the updates so far."""
    W = weight.detach().float().clone()  # (N, K): N output rows, K input columns
    N, K = W.shape
    H = H.float().clone()
    dead = H.diagonal() == 0  # inputs that were 0 on every calibration token: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())  # dampening: 1% of the mean diagonal (§4, step 3)
    # H^-1 = U^T U with U upper triangular: U[i, i:] is row i of the inverse Hessian over the columns
    # i.. (those not yet rounded), divided by the square root of its diagonal element
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    scale, zero = torch.zeros(N, K // group_size), torch.zeros(N, K // group_size)
    block = max(block, group_size)  # a multiple of group_size: a group never straddles two batches
    for b1 in range(0, K, block):
        b2 = min(b1 + block, K)
        Wb, Ub = W[:, b1:b2], U[b1:b2, b1:b2]  # views: updates to Wb are updates to W
        E = torch.zeros(N, b2 - b1)  # the batch's scaled errors, for the update of the columns after it
        for i in range(b2 - b1):
            col = b1 + i
            if col % group_size == 0:  # a new group: its grid from its current weights, (N, 1) each
                s, z = int4_grid(Wb[:, i:i + group_size], symmetric)
                scale[:, col // group_size], zero[:, col // group_size] = s[:, 0], z[:, 0]
            q = int4_round(Wb[:, i:i + 1], s, z)  # (N, 1)
            codes[:, col] = q[:, 0]
            err = (Wb[:, i:i + 1] - int4_value(q, s, z)) / Ub[i, i]  # (N, 1)
            Wb[:, i:] -= err * Ub[i:i + 1, i:]  # OBS: the other columns of the batch absorb the error
            E[:, i] = err[:, 0]
        W[:, b2:] -= E @ U[b1:b2, b2:]  # the whole batch's errors, to every later column at once
    return codes, scale, zero


@torch.no_grad()
def gptq_model(model, calibration, group_size=128, symmetric=False, rows_per_forward=16):
    """Replace every nn.Linear of model (in place) by a GPTQ Int4Linear, in the order the model runs
    them, each calibrated on the inputs that the already quantized Linears before it produce.
    calibration: (n, T) token ids."""
    def run(fn, xs):  # fn over the rows of xs a few at a time: a block's MLP on all rows at once is big
        return torch.cat([fn(x) for x in xs.split(rows_per_forward)])

    def quantize_on(fn, xs, root, name):  # one Linear: its Hessian on the inputs fn(xs) gives it, GPTQ
        linear = root.get_submodule(name)
        H, count = torch.zeros(linear.in_features, linear.in_features), [0]

        def add(module, args):  # H = 2 X X^T, averaged over tokens (a scale GPTQ does not depend on)
            x = args[0].reshape(-1, args[0].size(-1)).float()  # (tokens, K)
            H.mul_(count[0] / (count[0] + len(x))).add_(x.T @ x, alpha=2 / (count[0] + len(x)))
            count[0] += len(x)
        hook = linear.register_forward_pre_hook(add)
        run(fn, xs)
        hook.remove()
        codes, scale, zero = gptq(linear.weight, H, group_size, symmetric)
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent), attr, Int4Linear(codes, scale, zero, linear.bias))

    # the first block's inputs as the model makes them (embeddings; the rotary tables): a hook takes
    # them and stops the forward there
    class Stop(Exception):
        pass
    first = []

    def take(module, args, kwargs):
        first.append((args[0], kwargs))
        raise Stop
    hook = model.transformer.h[0].register_forward_pre_hook(take, with_kwargs=True)
    for idx in calibration.split(rows_per_forward):
        try:
            model.hidden_states(idx)
        except Stop:
            pass
    hook.remove()
    xs = torch.cat([x for x, _ in first])  # (n, T, C)
    attend = first[0][1]  # {rope, cache, layer, mask, cache_positions}: the same for every row and block
    for block in model.transformer.h:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]  # in the order it calls them
        for name in names:
            quantize_on(lambda x: block(x, **attend), xs, block, name)
        xs = run(lambda x: block(x, **attend), xs)  # the next block's input, through the quantized block
    quantize_on(lambda x: model.lm_head(model.transformer.ln_f(x)), xs, model, "lm_head")
    return model


def calibration_rows(data_dir, n=256, T=128, seed=0):
    """(n, T) token ids: n rows of T tokens drawn at random (seeded) from the train shards in data_dir
    (prepare.py's *_train_*.bin), read as train.py reads them (shards.TokenStream). The paper calibrated
    on 128 segments of 2,048 tokens; contexts here are shorter, so twice the segments by default."""
    files = sorted(glob.glob(os.path.join(glob.escape(data_dir), "*_train_*.bin")))
    if not files:
        raise ValueError(f"no train shards (*_train_*.bin) in {data_dir}/ for GPTQ's calibration; run prepare.py")
    return TokenStream(files, B=n, T=T, seed=seed).next_batch()[0]


# ---- the whole model -----------------------------------------------------------------------------

def quantize(model, mode="int8", calibration=None, group_size=128, symmetric=False):
    """A copy of model (on the CPU, for inference) with every nn.Linear an Int8Linear (mode "int8") or an
    Int4Linear (modes "int4": round to nearest, "int4-gptq": GPTQ on calibration, (n, T) token ids, see
    calibration_rows), or model itself (mode "none"). group_size and symmetric: int4's grid (see top)."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {', '.join(map(repr, MODES))}")
    if mode == "none":
        return model
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"{mode} weights run on the CPU only (torch's int8 and int4 kernels here are CPU "
                         f"kernels); use --device=cpu, or quantize=none on a GPU")
    if mode.startswith("int4") and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not one of {GROUP_SIZES} (torch's int4 kernel)")
    if mode == "int4-gptq" and calibration is None:
        raise ValueError("int4-gptq needs calibration data: (n, T) token ids, e.g. calibration_rows(data_dir)")
    model = copy.deepcopy(model).eval()
    if mode == "int4-gptq":
        gptq_model(model, calibration, group_size, symmetric)
    else:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8Linear(child) if mode == "int8" else rtn(child, group_size, symmetric))
    model.quantization = {"mode": mode, "group_size": group_size, "symmetric": symmetric}  # for save_quantized
    return model


def weight_bytes(model):
    """Bytes of the model's weights as torch.save writes its state_dict (int8 or int4 weights with their
    scales, and the float tensors; a tied matrix once)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.tell()


# ---- a quantized model as a file -----------------------------------------------------------------

def save_quantized(model, path, tokenizer):
    """Write a model from quantize() and its tokenizer (bpe.Tokenizer) to path (see the top)."""
    q = getattr(model, "quantization", None)
    if q is None:
        raise ValueError("save_quantized takes a model from quantize(model, mode)")
    state = {"format": FORMAT, **q, "model_args": vars(model.config).copy(), "tokenizer": tokenizer.dumps(),
             "state": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(path, lambda f: torch.save(state, f))


def from_state(state, source):
    """(model, tokenizer) from the dict of a save_quantized file (read by checkpoint.load)."""
    # the model's shape with empty quantized Linears of the stored kind (RTN on the initial weights:
    # GPTQ's Linears have the same layout), then the stored state over them
    mode = "int8" if state["mode"] == "int8" else "int4"
    model = quantize(GPT(GPTConfig(**state["model_args"])), mode, group_size=state["group_size"],
                     symmetric=state["symmetric"])
    model.load_state_dict(state["state"])
    model.quantization = {k: state[k] for k in ("mode", "group_size", "symmetric")}
    tok = Tokenizer.loads(state["tokenizer"], source=f"{source} (its embedded tokenizer)")
    return model.eval(), tok
