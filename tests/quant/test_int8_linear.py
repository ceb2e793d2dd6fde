"""Real int8 (oneDNN) Linear against the emulated integer arithmetic."""
import pytest
import torch

from megatron_outeff.quant import quantize_weight_per_channel
from megatron_outeff.quant.compressed_tensors_export import calibrate_w8a8_linears, simulate_w8a8_linear
from megatron_outeff.quant.int8_linear import Int8Linear, cpu_has_vnni


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
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not cpu_has_vnni(), reason="8-bit activations are exact only with VNNI (int32 dot products)")
def test_int8_linear_exact_vs_emulation_8bit_on_vnni():
    q, s, x, bias = _layer(seed=1)
    q[0] = 127  # worst case for int16 pair saturation
    x[0, 0] = 1e3
    m = Int8Linear(q, s, input_scale=0.03, input_zero_point=0, bias=bias, reduce_range=False)
    ref = m.emulate(x)
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


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
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        with torch.no_grad():
            flt = fc1(x)
        assert ((y - flt).norm() / flt.norm()).item() < 0.05
        if not rr:  # 8-bit activations: the same numbers as the compressed-tensors simulation
            torch.testing.assert_close(y, simulate_w8a8_linear(x, p), rtol=0, atol=1e-4)


def test_int8_linear_bad_inputs():
    q, s, _, _ = _layer()
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(q.float(), s, 0.1)
    with pytest.raises(ValueError, match="input_zero_point"):
        Int8Linear(q, s, 0.1, input_zero_point=200)
    with pytest.raises(ValueError, match="last dim"):
        Int8Linear(q, s, 0.1)(torch.zeros(2, 3))
