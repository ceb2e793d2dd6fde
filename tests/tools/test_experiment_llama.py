"""The experiment runner on the Llama family: the experiment's model is chosen with training.model.arch
(the same arch_overrides keys serve both families), trained, exported as a plain LlamaForCausalLM,
quantized like for like through our Llama remote code, and reported. One arm, tiny, a few steps."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from evallib import run_experiment  # noqa: E402
from test_experiment import GPU_CONFIG, TINY  # noqa: E402  (the OPT test's tiny experiment)


def test_runner_trains_and_evaluates_a_llama_arm(tmp_path):
    out = tmp_path / "exp"
    sets = [s for s in TINY if not s.startswith("arms=")] + ["arms=[vanilla]", "training.model.arch=llama-tiny"]
    r = run_experiment(GPU_CONFIG, out, sets, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "vanilla" in json.loads((out / "report.json").read_text())["arms"]
    arm = json.loads((out / "arms" / "vanilla" / "result.json").read_text())
    assert arm["evaluation"]["model"]["class"] == "LlamaForCausalLM"
    final = arm["final"]
    # 2 layers x (7 Linears, 2 RMSNorms, 5 QuantPoints of our remote code) + the embedding and the final RMSNorm
    assert final["quantized_activation_count"] == 2 * (7 + 2 + 5) + 2 and final["quant_points"] == 10
    for k in ("loss", "ppl_fp32", "ppl_w8a8_paper", "ppl_w8a8_deployable", "first_token_mass_idle", "max_inf_norm"):
        assert final.get(k) is not None, k
    assert json.loads((out / "arms" / "vanilla" / "hf" / "config.json").read_text())["model_type"] == "llama"
