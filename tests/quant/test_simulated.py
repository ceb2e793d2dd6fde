"""Simulated W8A8 on a tiny HF OPT: small but non-zero logit change; float model untouched."""

import torch
from torch import nn

from megatron_outeff.quant import ActivationQuantizer, QuantPoint, apply_simulated_w8a8


def test_simulated_w8a8_tiny_opt(tiny_opt):
    model = tiny_opt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(3)]
    ids = torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        ref = model(ids).logits

    sim = apply_simulated_w8a8(model, lambda m: [m(b) for b in calib])
    with torch.no_grad():
        out = sim.model(ids).logits

    # ~20 quantized tensors in a random 2-layer model: a few percent relative error (measured 4.2%)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel
    # every Linear / Embedding / LayerNorm except the LM head got quantizers
    dec = model.model.decoder
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules()) - 1  # minus lm_head
    n_emb, n_ln = 2, 2 * len(dec.layers) + 1
    assert len(sim.act_quantizers) == n_lin + n_emb + n_ln
    assert len(sim.weight_quantizers) == n_lin + n_emb + n_ln
    assert sim.excluded == ["lm_head"] and not sim.uncalibrated
    assert all(not q.calibrating for q in sim.act_quantizers.values())
    # LM head keeps the float (tied) embedding weight; the copy's embedding is quantized
    assert torch.equal(sim.model.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(sim.model.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    # float model untouched: same parameters, no hooks, same logits
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(len(m._forward_hooks) == 0 for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # frozen: evaluating twice gives the same result (ranges no longer move)
    with torch.no_grad():
        assert torch.equal(sim.model(ids).logits, out)


class WithPoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.residual = QuantPoint("residual")
        self.gate = nn.Linear(4, 1)

    def forward(self, x):
        return self.residual(x + self.lin(x)) * torch.sigmoid(self.gate(x))


def test_quant_points_and_exclusions():
    torch.manual_seed(0)
    m = WithPoints()
    x = torch.randn(8, 4)
    sim = apply_simulated_w8a8(m, lambda q: q(x), exclude=["gate"])
    assert set(sim.act_quantizers) == {"lin", "residual"} and sim.excluded == ["gate"]
    # the QuantPoint's quantizer saw exactly the residual sum: 256 levels at most, asymmetric
    aq: ActivationQuantizer = sim.act_quantizers["residual"]
    assert aq.zero_point.item() > 0
    with torch.no_grad():
        y = sim.model.residual(torch.linspace(-3, 3, 1000))
    assert y.unique().numel() <= 256


def test_mse_weights_and_grid_sizes(tiny_opt):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 512, (2, 16), generator=g)]
    sim = apply_simulated_w8a8(tiny_opt, lambda m: [m(b) for b in calib], weight_method="mse")
    fc1 = sim.model.model.decoder.layers[0].fc1
    wq = sim.weight_quantizers["model.decoder.layers.0.fc1"]
    # at most 255 symmetric levels, on the chosen grid, range not above max|w|
    assert fc1.weight.unique().numel() <= 255
    assert torch.allclose(fc1.weight / wq.scale, (fc1.weight / wq.scale).round(), atol=1e-4)
    assert wq.scale.item() * 127 <= tiny_opt.model.decoder.layers[0].fc1.weight.abs().max().item() + 1e-7
