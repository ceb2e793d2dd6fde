import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "torch_extensions"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """The single-process run every parallel layout must reproduce (also writes TensorBoard)."""
    from common import BASE, DEMO

    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.train import train

    tb = tmp_path_factory.mktemp("oracle_tb")
    cfg = load_config(DEMO, BASE + [f"logging.tensorboard_dir={tb}", "train.eval_interval=2", "train.eval_iters=1"])
    return {"losses": [loss for _, loss in train(cfg)["history"]], "tensorboard_dir": tb}
