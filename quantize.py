"""
quantize.py: int8 weights for CPU inference, and the size of a model's weights.

Why int8. Decoding one token per step reads every weight once per step, and on a CPU that read, more
than the arithmetic, sets the pace. Stored as int8, the Linear weights take a quarter of float32's
bytes, and the int8 matrix kernels (fbgemm / oneDNN) do four times the multiply-adds per instruction.

What is quantized. Every nn.Linear (attention, MLP and the output head) becomes an Int8Linear:
  - weights: int8 once, here, with one scale per output row ("per channel"), so one large row does
    not coarsen the grid of all the others as a single scale per matrix would;
  - inputs: int8 on the fly at every call ("dynamic": no calibration data), with one scale per row,
    that is per token ("per-token"). The matrix product runs in int8 and comes back in float32.
Embeddings and norms stay float32 (a lookup and a few vectors). With tied weights, lm_head gets an
int8 copy while wte keeps the float32 table for its lookups.

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
directly (README, Measured). torch.ao also ships inside torch, so int8 adds no dependency.
"""
import copy
import io
import warnings

import torch
import torch.nn as nn

MODES = ("none", "int8")


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


def quantize(model, mode="int8"):
    """A copy of model (on the CPU, for inference) with every nn.Linear an Int8Linear (mode "int8"),
    or model itself (mode "none")."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {', '.join(map(repr, MODES))}")
    if mode == "none":
        return model
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 weights run on the CPU only (torch.ao's int8 kernels are fbgemm/qnnpack); "
                         "use --device=cpu, or quantize=none on a GPU")
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model.eval()


def weight_bytes(model):
    """Bytes of the model's weights as torch.save writes its state_dict (int8 weights with their
    scales, and the float tensors; a tied matrix once)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.tell()
