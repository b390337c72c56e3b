"""quantize.py's int4 weights: round to nearest and GPTQ on a small model trained here, the packed Linear,
the quantized file, and the int8 API left as it was."""
import pytest
import torch
import torch.nn.functional as F

import quantize as Q
from checkpoint import load_quantized
from decode import generate
from model import GPT, GPTConfig

GROUP = 32  # two groups per row of the 64-wide model below, so groups are not whole rows


@pytest.fixture(scope="module")
def trained(workdir):
    """(model, calibration rows, tokenizer): a 2 x 64 GPT-2 (biases, tied head) trained for 150 steps on
    the tiny prepared data, so its weights and inputs have the structure GPTQ exploits, unlike an init."""
    from bpe import Tokenizer
    from shards import TokenStream
    data = workdir / "data" / "tiny"
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = TokenStream(sorted(map(str, data.glob("*_train_*.bin"))), B=8, T=32, seed=0)
    for _ in range(150):
        x, y = stream.next_batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.6  # learned something: ln(512) = 6.2 at the start
    calibration = Q.calibration_rows(str(data), n=64, T=64)
    return model.eval(), calibration, Tokenizer.load(str(data / "tokenizer.bpe"))


@pytest.fixture(scope="module")
def rtn_and_gptq(trained):
    model, calibration, _ = trained
    return (Q.quantize(model, "int4", group_size=GROUP),
            Q.quantize(model, "int4-gptq", calibration=calibration, group_size=GROUP))


def linears(model):
    """{name: layer} of the model's quantized Linears, in the order the model runs them."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (Q.Int4Linear, Q.Int8Linear))}


def test_calibration_rows_are_train_tokens(trained, workdir):
    _, calibration, _ = trained
    assert calibration.shape == (64, 64) and calibration.dtype == torch.long
    assert len({tuple(r) for r in calibration.tolist()}) == 64  # 64 different rows, not one repeated
    assert torch.equal(calibration, Q.calibration_rows(str(workdir / "data" / "tiny"), n=64, T=64))  # seeded
    with pytest.raises(ValueError, match="no train shards"):
        Q.calibration_rows(str(workdir))


def test_rtn_and_gptq_weights_are_within_one_step_of_the_float_weights(trained, rtn_and_gptq):
    """Round to nearest: every weight within half a step of its group's grid. GPTQ rounds weights that
    it has moved to absorb earlier errors, so a few land further (up to about 4 steps in this model):
    nearly all stay within one step, and half a step is still the typical error."""
    model = trained[0]
    floats = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for q in rtn_and_gptq:
        assert list(linears(q)) == list(floats)  # every Linear quantized, none else
        for name, layer in linears(q).items():
            scale = layer.scales_and_zeros[..., 0].float().t().repeat_interleave(GROUP, dim=1)  # (out, in)
            steps = ((layer.dequantize() - floats[name]).abs() / scale).flatten()  # error in steps
            if q is rtn_and_gptq[0]:
                assert steps.max() <= 0.55, name  # not 0.5: bfloat16 scales and zeros move the grid ends a little
            else:
                assert (steps <= 1).float().mean() > 0.97 and steps.median() < 0.5, name
            assert layer.codes().unique().numel() == 16  # the whole grid is used


def test_gptq_output_error_is_lower_than_rtn_for_every_layer(trained, rtn_and_gptq, workdir):
    """GPTQ's claim: on the inputs a layer sees (from the quantized layers before it), its output is
    closer to the float layer's than round to nearest gets: ||X W^T - X Wq^T|| per Linear."""
    model, calibration, _ = trained
    rtn, gptq = rtn_and_gptq
    floats = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs, hooks = {}, []
    for name, layer in linears(gptq).items():
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].size(-1)))))
    with torch.no_grad():
        gptq(calibration)
    for h in hooks:
        h.remove()
    for name in floats:
        X, W = torch.cat(inputs[name]), floats[name]
        e_rtn = (X @ (W - linears(rtn)[name].dequantize()).T).norm()
        e_gptq = (X @ (W - linears(gptq)[name].dequantize()).T).norm()
        assert e_gptq < 0.9 * e_rtn, (name, e_gptq.item(), e_rtn.item())
    # and the whole model: GPTQ's logits are closer to float32's than RTN's on rows it was not calibrated on
    x = Q.calibration_rows(str(workdir / "data" / "tiny"), n=8, T=64, seed=1)
    with torch.no_grad():
        ref = model(x)[0]
        assert (gptq(x)[0] - ref).norm() < (rtn(x)[0] - ref).norm()


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_linear_is_dequantize_then_matmul_in_four_bits(symmetric):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    q = Q.rtn(linear, group_size=128, symmetric=symmetric)
    if symmetric:
        assert (q.scales_and_zeros[..., 1] == 0).all()
    x = torch.randn(2, 5, 256)
    # the kernel reads the input in bfloat16 and returns bfloat16: within that rounding of the reference
    ref = F.linear(x.bfloat16().float(), q.dequantize(), linear.bias.detach())
    got = q(x)
    assert got.shape == (2, 5, 96) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    assert (F.linear(x, linear.weight) - got).norm() / got.norm() < 0.15  # and near the float layer
    # 4 bits per weight: 96 x 256 codes in half as many bytes, one bfloat16 scale and zero per group
    state = q.state_dict()
    assert state["qweight"].dtype == torch.uint8 and state["qweight"].numel() == 96 * 256 // 2
    assert "packed" not in state
    stored = sum(t.numel() * t.element_size() for k, t in state.items() if k != "bias")
    assert stored == 96 * 256 // 2 + 96 * 2 * 2 * 2  # 1/8 of float32's 98,304 bytes, plus 768 of scales


def test_int4_model_weights_and_errors(trained, rtn_and_gptq):
    model = trained[0]
    int8, int4 = Q.quantize(model, "int8"), rtn_and_gptq[0]
    assert isinstance(model.lm_head, torch.nn.Linear)  # quantize made a copy
    assert torch.equal(int4.transformer.wte.weight, model.transformer.wte.weight)  # the lookup stays float
    assert Q.weight_bytes(int4) < Q.weight_bytes(int8) < Q.weight_bytes(model)
    with pytest.raises(ValueError, match="needs calibration"):
        Q.quantize(model, "int4-gptq")
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize(model, "int4", group_size=100)
    with pytest.raises(ValueError, match="not one of"):
        Q.quantize(model, "int3")


@pytest.mark.parametrize("which", ["gptq", "int8"])
def test_save_and_load_give_identical_outputs(trained, rtn_and_gptq, tmp_path, which):
    model, calibration, tok = trained
    q = rtn_and_gptq[1] if which == "gptq" else Q.quantize(model, "int8")
    path = tmp_path / "q.pt"
    Q.save_quantized(q, str(path), tok)
    loaded, tok2 = load_quantized(str(path))
    assert tok2.dumps() == tok.dumps() and loaded.quantization == q.quantization
    x = calibration[:4]
    with torch.no_grad():
        ref, got = q(x)[0], loaded(x)[0]
    assert torch.equal(got, ref) and (ref[:, 1:] - ref[:, :-1]).abs().max() > 1  # same, and not a constant
    with torch.no_grad():
        assert torch.equal(generate(loaded, x[:, :8], 8, temperature=0), generate(q, x[:, :8], 8, temperature=0))
    with pytest.raises(ValueError, match="not a quantized model"):
        torch.save({"version": 2}, tmp_path / "other.pt")
        load_quantized(str(tmp_path / "other.pt"))


def test_int8_api_is_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("modern", n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=100)).eval()
    assert Q.MODES[:2] == ("none", "int8") and Q.quantize(model, "none") is model
    q = Q.quantize(model)  # int8 is the default
    assert all(isinstance(m, Q.Int8Linear) for m in linears(q).values()) and len(linears(q)) == 5  # 4 + the head
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert (q(x)[0] - model(x)[0]).norm() / model(x)[0].norm() < 0.05
    # quantized weights run on the CPU kernels only: moving them to a GPU is one clear error, before any copy
    from device import for_inference
    with pytest.raises(ValueError, match="int8 .quantize.py., which run on the CPU only; add --device=cpu"):
        for_inference(q, "cuda", "cuda", torch.bfloat16)
