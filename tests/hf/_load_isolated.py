"""Run with `python -S` from the export tests: loads exported directories with
AutoModelForCausalLM(trust_remote_code=True) in a process where megatron_outeff is NOT importable.

argv: site_packages job.pt result.pt
"""

import sys

sys.path.insert(0, sys.argv[1])

import importlib.util

assert importlib.util.find_spec("megatron_outeff") is None, "megatron_outeff must not be importable here"

import torch  # noqa: E402 (after the check above)
from transformers import AutoModelForCausalLM  # noqa: E402

job = torch.load(sys.argv[2])
result = {}
for name, directory in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=job["ids"], attention_mask=job["am"]).logits
    result[name] = {
        "logits": logits,
        "class": type(model).__name__,
        "module": type(model).__module__,
        "quant_points": [n for n, m in model.named_modules() if type(m).__name__ == "QuantPoint"],
        "megatron_outeff_loaded": any(k.startswith("megatron_outeff") for k in sys.modules),
    }
torch.save(result, sys.argv[3])
