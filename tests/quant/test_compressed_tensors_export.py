"""compressed-tensors W8A8 export: reload with transformers and compare with our own simulation."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tolerance import assert_close_bound, network_depth, rounding_bound

from megatron_outeff.quant import quantize_weight_per_channel
from megatron_outeff.quant.compressed_tensors_export import export_compressed_tensors_w8a8, simulate_w8a8_model


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (2, 16), generator=g) for _ in range(3)], torch.randint(0, 512, (2, 16), generator=g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_matches_our_simulation(tiny_opt, tmp_path, symmetric):
    from transformers import AutoModelForCausalLM

    model = tiny_opt
    calib, ids = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "w8a8"
    params = export_compressed_tensors_w8a8(model, lambda m: [m(b) for b in calib], out, activation_symmetric=symmetric)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # float model untouched

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "int-quantized"
    group = cfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    assert group["input_activations"] == {
        **group["input_activations"],
        "strategy": "tensor",
        "dynamic": False,
        "symmetric": symmetric,
    }
    assert cfg["ignore"] == ["lm_head"]

    tensors = load_file(str(out / "model.safetensors"))
    fc1 = "model.decoder.layers.0.fc1"
    assert tensors[f"{fc1}.weight"].dtype == torch.int8
    q, s = quantize_weight_per_channel(model.model.decoder.layers[0].fc1.weight)
    assert torch.equal(tensors[f"{fc1}.weight"], q) and torch.equal(tensors[f"{fc1}.weight_scale"], s)
    assert tensors[f"{fc1}.input_scale"].shape == (1,)
    if not symmetric:
        assert tensors[f"{fc1}.input_zero_point"].dtype == torch.int8
        assert torch.equal(tensors[f"{fc1}.input_zero_point"], params[fc1].input_zero_point)
    assert len(params) == 12  # 6 Linears x 2 layers; lm_head stays float

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = simulate_w8a8_model(model, params)
    with torch.no_grad():
        got, want, flt = reloaded(ids).logits, ours(ids).logits, model(ids).logits
    # the same ops in the same order (measured: bit-identical); allowed float32 rounding of a 2-layer
    # model in case a kernel sums in another order (tests/tolerance.py), far below the quantization effect
    cfg = model.config
    depth = network_depth(
        dict(
            hidden_size=cfg.hidden_size,
            ffn_dim=cfg.ffn_dim,
            num_hidden_layers=cfg.num_hidden_layers,
            max_position_embeddings=ids.shape[-1],
        )
    )
    assert_close_bound(got, want, rounding_bound(torch.float32, want.abs().max(), depth))
    assert (got - flt).abs().max() > 1e-3  # and it is really quantized


def test_export_refuses_non_empty_dir_and_non_finite(tiny_opt, tmp_path):
    calib, _ = _batches()
    run = lambda m: [m(b) for b in calib]  # noqa: E731
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):
        export_compressed_tensors_w8a8(tiny_opt, run, target)
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # no temp dir left behind

    with torch.no_grad():
        tiny_opt.model.decoder.layers[1].fc2.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        export_compressed_tensors_w8a8(tiny_opt, run, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["existing"]
