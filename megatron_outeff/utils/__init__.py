"""Small shared helpers with no dependency on Megatron, DeepSpeed or transformers."""
