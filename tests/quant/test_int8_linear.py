"""Real int8 (oneDNN) Linear against the emulated integer arithmetic."""

import pytest
import torch
from tolerance import rounding_bound

from megatron_outeff.quant import quantize_weight_per_channel
from megatron_outeff.quant.compressed_tensors_export import calibrate_w8a8_linears, simulate_w8a8_linear
from megatron_outeff.quant.int8_linear import Int8Linear, cpu_has_vnni, int8_model
from megatron_outeff.quant.quantizers import fake_quantize, quantize_int


def _emulate_bound(m, ref):
    """Int8Linear against ``emulate``: the int32 accumulation is exact in both; oneDNN's fp32 output path
    rounds the accumulator's conversion, the scale product, the scaling and the bias add: 4 roundings of
    terms of magnitude at most max(|y - b| + |b|) (tests/tolerance.py)."""
    b = m.bias.double() if m.bias is not None else torch.zeros(())
    return rounding_bound(torch.float32, float(((ref - b).abs() + b.abs()).max()), 4)


def _simulated_bound(x, p):
    """Int8Linear (8-bit, the export's codes) against simulate_w8a8_linear (an fp32 GEMM of the same
    dequantized values): the GEMM's K-term sums round K + 1 times (bias included) relative to
    sum_i |x_hat_i W_hat_oi| + |b_o|, plus the int8 side's 4 roundings (tests/tolerance.py)."""
    x_hat = fake_quantize(x.double(), p.input_scale.double(), p.input_zero_point.double(), -128, 127)
    terms = x_hat.abs() @ p.dequantized_weight().double().abs().t()
    if p.bias is not None:
        terms = terms + p.bias.double().abs()
    return rounding_bound(torch.float32, float(terms.max()), x.shape[-1] + 5)


def _layer(seed=0, out_f=96, in_f=256, zp=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    q, s = quantize_weight_per_channel(w)
    x = torch.randn(3, 7, in_f, generator=g) * 2
    bias = torch.randn(out_f, generator=g)
    return q, s, x, bias


@pytest.mark.parametrize("zp", [0, -37])
def test_int8_linear_exact_vs_emulation_reduce_range(zp):
    q, s, x, bias = _layer()
    x[0, 0] = 1e3  # saturates at the top of the grid
    x[0, 1] = -1e3
    m = Int8Linear(q, s, input_scale=0.03, input_zero_point=zp, bias=bias, reduce_range=True)
    y, ref = m(x), m.emulate(x)
    assert y.shape == (3, 7, 96) and y.dtype == torch.float32
    # exact integer accumulation; only the final float32 scaling rounds
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=_emulate_bound(m, ref))


@pytest.mark.skipif(not cpu_has_vnni(), reason="8-bit activations are exact only with VNNI (int32 dot products)")
def test_int8_linear_exact_vs_emulation_8bit_on_vnni():
    q, s, x, bias = _layer(seed=1)
    q[0] = 127  # worst case for int16 pair saturation
    x[0, 0] = 1e3
    m = Int8Linear(q, s, input_scale=0.03, input_zero_point=0, bias=bias, reduce_range=False)
    ref = m.emulate(x)
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=_emulate_bound(m, ref))


def test_int8_linear_from_exported_params(tiny_opt):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(2)]
    params = calibrate_w8a8_linears(tiny_opt, lambda m: [m(b) for b in calib])
    name = "model.decoder.layers.0.fc1"
    p = params[name]
    captured = []
    h = tiny_opt.get_submodule(name).register_forward_pre_hook(lambda mod, a: captured.append(a[0]))
    with torch.no_grad():
        tiny_opt(calib[0])
    h.remove()
    x = captured[0]
    fc1 = tiny_opt.get_submodule(name)
    for rr in (True, False) if cpu_has_vnni() else (True,):
        m = Int8Linear.from_params(p, reduce_range=rr)
        y = m(x)
        ref = m.emulate(x)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=_emulate_bound(m, ref))
        with torch.no_grad():
            flt = fc1(x)
        assert ((y - flt).norm() / flt.norm()).item() < 0.05
        if not rr:  # 8-bit activations: the same numbers as the compressed-tensors simulation
            torch.testing.assert_close(y, simulate_w8a8_linear(x, p), rtol=0, atol=_simulated_bound(x, p))


def test_int8_linear_bad_inputs():
    q, s, _, _ = _layer()
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(q.float(), s, 0.1)
    with pytest.raises(ValueError, match="input_zero_point"):
        Int8Linear(q, s, 0.1, input_zero_point=200)
    with pytest.raises(ValueError, match="last dim"):
        Int8Linear(q, s, 0.1)(torch.zeros(2, 3))


@pytest.mark.parametrize("threads", [1, 2, 8], ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("zp", [0, -37, 127, -128])
def test_int8_codes_are_compressed_tensors_codes(zp, threads):
    """The uint8 codes are compressed-tensors' int8 codes clamp(round(x / s + z), -128, 127) (quantize_int)
    shifted by +128, bit for bit: exact .5 ties and values 1e-6 off a tie (where rounding x / s + z + 128
    in fp32 would flip), saturation, +-inf, -0. 1 and 8 threads quantize in one go, 2 in inline row blocks;
    600 rows x 768 > GRAIN_SIZE elements, so several blocks."""
    q, s, _, _ = _layer(in_f=768)
    scale = 0.0123
    g = torch.Generator().manual_seed(3)
    k = torch.randint(-300, 300, (600, 768), generator=g).float()
    x = torch.randn(600, 768, generator=g) * 2
    x[0::3] = ((k + 0.5) * scale)[0::3]
    x[1::3] = ((k + 0.5) * scale * (1 + 1e-6))[1::3]
    x[2, :8] = torch.tensor([1e30, -1e30, float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 3e5])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m8 = Int8Linear(q, s, input_scale=scale, input_zero_point=zp, reduce_range=False)
        m7 = Int8Linear(q, s, input_scale=scale, input_zero_point=zp, reduce_range=True)
        codes8, codes7 = m8.quantize_input(x), m7.quantize_input(x)
    finally:
        torch.set_num_threads(previous)
    assert codes8.dtype == torch.uint8 and codes8.shape == x.shape
    assert torch.equal(codes8.int() - 128, quantize_int(x, scale, zp, -128, 127).int())
    assert torch.equal(codes7.int(), quantize_int(x, m7.x_scale, m7.x_zero_point, 0, 127).int())


def test_int8_model_matches_simulated_w8a8(tiny_opt):
    """int8_model puts an Int8Linear in place of every calibrated Linear; on the inputs each one sees in
    the int8 model it gives the simulated compressed-tensors Linear's output up to fp32 GEMM rounding
    (identical codes; with 8-bit activations, i.e. VNNI). Whole-model logits are compared with fp32 only
    loosely: a 1e-6 rounding difference upstream can move a value across a rounding tie downstream."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(2)]
    params = calibrate_w8a8_linears(tiny_opt, lambda m: [m(b) for b in calib])
    rr = not cpu_has_vnni()
    qmodel = int8_model(tiny_opt, params, reduce_range=rr)
    assert sum(isinstance(m, Int8Linear) for m in qmodel.modules()) == len(params)
    assert not any(isinstance(m, Int8Linear) for m in tiny_opt.modules())  # the float model is untouched
    seen = {}
    hooks = [
        qmodel.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
        for n in params
    ]
    ids = torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        y = qmodel(ids).logits.double()
        flt = tiny_opt(ids).logits.double()
    for h in hooks:
        h.remove()
    assert set(seen) == set(params)
    assert torch.isfinite(y).all() and ((y - flt).norm() / flt.norm()).item() < 0.1
    if not rr:  # 8-bit activations: the export's codes; 7-bit ones only approximate it
        for name, (x, out) in seen.items():
            ref = simulate_w8a8_linear(x, params[name])
            torch.testing.assert_close(
                out, ref, rtol=0, atol=_simulated_bound(x, params[name]), msg=lambda m, n=name: f"{n}: {m}"
            )
    with pytest.raises(ValueError, match="not an nn.Linear"):
        int8_model(tiny_opt, {"model.decoder.layers.0.self_attn": params["model.decoder.layers.0.fc1"]})
