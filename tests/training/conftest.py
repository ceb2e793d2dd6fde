import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "torch_extensions")
)

import pytest  # noqa: E402


def _run_oracle(tmp_path_factory, extra):
    from layouts_worker import weights_hook
    from train_testlib import BASE, DEMO

    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.train import train

    out = tmp_path_factory.mktemp("oracle")
    weights = out / "initial_weights.pt"
    cfg = load_config(DEMO, BASE + [f"logging.tensorboard_dir={out / 'tb'}"] + extra)
    losses = [loss for _, loss in train(cfg, model_hook=weights_hook(str(weights)))["history"]]
    return {"losses": losses, "tensorboard_dir": out / "tb", "weights": weights}


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """The single-process run every parallel layout must reproduce (fp32, no clipping, no dropout).
    Also writes TensorBoard and its initial weights (pipeline layouts start from them)."""
    return _run_oracle(tmp_path_factory, ["train.eval_interval=2", "train.eval_iters=1", "logging.outlier_interval=2"])


@pytest.fixture(scope="session")
def oracle_clip(tmp_path_factory):
    """The same with gradient clipping at 0.5 (active from the first step)."""
    return _run_oracle(tmp_path_factory, ["train.clip_grad=0.5"])
