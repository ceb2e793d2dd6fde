"""megatron-core integration: outlier-efficient attention through ModuleSpecs. Knows nothing of DeepSpeed."""
