"""
device.py: where a model runs and in what precision, for every script that runs one.

pick_device chooses the device and the dtype; autocast gives the matching mixed-precision context;
compile_problem says when torch.compile cannot work here; peak_flops looks up a GPU's peak for MFU.

Precision. Weights and optimizer state stay float32; under autocast the matmuls run in 16 bits and
the reductions (softmax, norms, the loss) in float32. bfloat16 has float32's range, so it needs no
loss scaling; float16 does (train.py's GradScaler), and is the choice on GPUs without bf16 tensor
cores (V100, T4: compute capability below 8.0). CPUs here get float32: bf16 matmuls on a CPU without
bf16 units are about 100x slower.
"""
import importlib.util
import os
import re
import shutil
from contextlib import nullcontext

import torch

DTYPES = ("float32", "bfloat16", "float16")


def pick_device(device="auto", dtype="auto"):
    """Settings -> (device, device_type, torch dtype). device auto: cuda > mps > cpu; under torchrun
    "cuda" means this process's GPU, cuda:LOCAL_RANK. A CUDA device is made current (set_device)
    before anything else touches CUDA, so every later call (RNG state, the device name for MFU, a
    bare .cuda()) is about this GPU, and no rank opens a stray context on GPU 0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use --device=cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
        torch.cuda.set_device(device)
    if dtype == "auto":
        dtype = "float32"
        if device_type == "cuda":
            # is_bf16_supported() also says yes where bf16 is only emulated (V100, T4): ask for the
            # tensor cores, which arrived with Ampere (compute capability 8.0)
            dtype = "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}")
    return device, device_type, getattr(torch, dtype)


def autocast(device_type, dtype):
    """Mixed precision for 16-bit dtypes; nothing to do for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)


def for_inference(model, device, device_type, dtype):
    """The model on `device`, for a script that only reads it (sample, eval, serve). On a GPU with a
    16-bit dtype its weights are cast once: under autocast a float32 weight is cast again at every
    call, which for one decoded token is most of the memory traffic. Autocast stays on around it,
    for the reductions it keeps in float32; model.log_probs scores in float32 either way."""
    if getattr(model, "quantization", None) and device_type != "cpu":  # quantize.py's kernels are CPU kernels
        raise ValueError(f"the model's weights are {model.quantization['mode']} (quantize.py), which run on the CPU "
                         f"only; add --device=cpu")
    model = model.to(device)
    return model.to(dtype) if device_type == "cuda" and dtype != torch.float32 else model


def compile_problem(device_type):
    """Why torch.compile cannot run here (it generates C++ on CPU and Triton on CUDA), or None."""
    if device_type == "mps":
        return "torch.compile does not support training on MPS"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++", "cl")):
        return "torch.compile on CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on the PATH"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs the triton package"
    return None


# Dense peak FLOP/s per GPU from NVIDIA's datasheets (no 2:4 sparsity), for MFU. float32 means TF32
# tensor cores, which train.py switches on. A row matches when all its words appear as whole words
# in the device name, and the row with the most words wins: "NVIDIA L40" is the L40, not the L4;
# "NVIDIA H100 PCIe" is the PCIe card, not the SXM "NVIDIA H100 80GB HBM3".
PEAK_FLOPS = [  # (name words, {dtype: FLOP/s})
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),  # SXM
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),  # SXM
    ("h200 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),  # SXM and PCIe alike
    ("a10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    ("a10g", {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12}),
    ("l40s", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("l40", {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12}),
    ("l4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("4090", {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12}),
    ("3090", {"bfloat16": 71e12, "float16": 71e12, "float32": 36e12}),
    ("v100", {"float16": 125e12, "float32": 15.7e12}),  # no bfloat16 tensor cores
    ("t4", {"float16": 65e12, "float32": 8.1e12}),
]


def peak_flops(name, dtype_name):
    """Peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name()) at dtype_name, or None
    for a GPU not in the table. A MIG slice ("... MIG 3g.40gb") gets its share of the GPU's 7
    compute slices, not the whole GPU's peak."""
    name = name.lower()
    rows = [(len(words.split()), table) for words, table in PEAK_FLOPS
            if all(re.search(rf"(?<![a-z0-9]){w}(?![a-z0-9])", name) for w in words.split())]
    if not rows:
        return None
    peak = max(rows, key=lambda r: r[0])[1].get(dtype_name)
    mig = re.search(r"\bmig (\d)g\.", name)
    return peak * int(mig.group(1)) / 7 if peak and mig else peak
