import pytest
import torch


def make_tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
        do_layer_norm_before=True, init_std=0.05,
    )
    model = OPTForCausalLM(cfg).eval()
    return model


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()
