"""device.py's decisions for GPUs this machine does not have: CUDA's answers are stood in for by
monkeypatching torch.cuda's queries, and the MFU table is looked up with real device name strings."""
import pytest
import torch

import device
from device import peak_flops, pick_device


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with GPUs of a chosen compute capability; records set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    # the bf16 answer torch 2.13 gives by default: True even where bf16 is only emulated (V100, T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def use(capability):
        def get_capability(d=None):
            calls.append(("capability", d))
            assert any(c[0] == "set_device" for c in calls), "the device must be current before it is queried"
            return capability
        monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
        return calls
    return use


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_needs_bf16_tensor_cores(fake_gpus, monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16 slowly: they get float16; A100 (8.0) and H100 (9.0) bf16."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fake_gpus(capability)
    assert pick_device("cuda", "auto") == ("cuda", "cuda", expected)


def test_any_cuda_device_is_made_current(fake_gpus, monkeypatch):
    """A single process on cuda:1 must make cuda:1 current (RNG state, device name, stray contexts),
    and under torchrun "cuda" means the process's own GPU."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    calls = fake_gpus((8, 0))
    assert pick_device("cuda:1", "float32")[0] == "cuda:1"
    assert calls == [("set_device", "cuda:1")]  # an explicit dtype: no capability query needed
    calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda", "auto") == ("cuda:3", "cuda", torch.bfloat16)
    assert calls == [("set_device", "cuda:3"), ("capability", "cuda:3")]


def test_cpu_and_bad_settings():
    assert pick_device("cpu", "auto") == ("cpu", "cpu", torch.float32)
    with pytest.raises(ValueError, match="device='tpu' is not one of"):
        pick_device("tpu", "auto")
    with pytest.raises(ValueError, match="dtype='half' is not one of 'auto', 'float32'"):
        pick_device("cpu", "half")
    assert device.autocast("cpu", torch.float32).__class__.__name__ == "nullcontext"


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),           # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),                 # not the SXM figure
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bfloat16", 312e12 * 3 / 7),  # a slice: its share
    ("NVIDIA A10", "bfloat16", 125e12),
    ("NVIDIA A10G", "bfloat16", 70e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40", "bfloat16", 181e12),                      # not the L4's row
    ("NVIDIA L40S", "float32", 183e12),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165e12),
    ("Tesla V100-SXM2-16GB", "float16", 125e12),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),              # no bf16 tensor cores: no MFU
    ("Tesla T4", "float16", 65e12),
    ("NVIDIA RTX A6000", "bfloat16", None),                  # not in the table
])
def test_peak_flops_matches_the_most_specific_name(name, dtype, expected):
    assert peak_flops(name, dtype) == pytest.approx(expected) if expected else peak_flops(name, dtype) is None
