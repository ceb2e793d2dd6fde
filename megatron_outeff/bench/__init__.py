"""Benchmark support shared by tools/bench_*.py: the harness (``harness``: timing, memory, round-robin,
device and load record, incremental JSON / Markdown), the options every benchmark shares
(``options.add_output_arguments``, no torch) and the one list of benchmarked attention variants
(``variants.BENCH_VARIANTS``). Knows torch and ``megatron_outeff.ops``; nothing here is a test."""
