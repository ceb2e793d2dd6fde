"""Training entrypoint: DeepSpeed ZeRO around megatron-core models (the only DeepSpeed-aware package)."""
