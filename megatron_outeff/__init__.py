"""megatron_outeff."""
