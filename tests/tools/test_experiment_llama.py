"""The experiment runner on the Llama family: the experiment's model is chosen with training.model.arch
(the same arch_overrides keys serve both families), trained, exported as a plain LlamaForCausalLM,
quantized like for like through our Llama remote code, and reported. One arm, tiny, a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_experiment import GPU_CONFIG, TINY  # noqa: E402  (the OPT test's tiny experiment)


def test_runner_trains_and_evaluates_a_llama_arm(tmp_path):
    out = tmp_path / "exp"
    sets = [s for s in TINY if not s.startswith("arms=")] + ["arms=[vanilla]", "training.model.arch=llama-tiny"]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "run_experiment.py"),
            "--config",
            str(GPU_CONFIG),
            "--output-dir",
            str(out),
        ]
        + [a for s in sets for a in ("--set", s)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
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
