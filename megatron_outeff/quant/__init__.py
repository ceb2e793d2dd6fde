"""Quantization: fake-quant W8A8 simulation, deployable int8 export."""
