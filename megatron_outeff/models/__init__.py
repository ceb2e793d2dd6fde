"""Model families built on megatron-core (OPT) and their Hugging Face weight mappings."""
