#!/usr/bin/env python
"""Convert megatron_outeff checkpoints (any TP/PP, any ZeRO stage) to other layouts and Hugging Face.

    convert_checkpoint.py to-hf   CKPT_DIR --output-dir OUT_DIR [--iteration N] [--tokenizer TOK] [--dtype fp32|fp16|bf16]
    convert_checkpoint.py reshard CKPT_DIR --output-dir OUT_DIR --tp T --pp P [--iteration N]
    convert_checkpoint.py from-hf HF_DIR --output-dir OUT_DIR --tp T --pp P [--variant NAME|JSON] [--seq-length S] [--seed K]

CKPT_DIR: a training checkpoint directory (its `latest`, or --iteration), an iter_XXXXXXX directory,
or a model-only checkpoint written by reshard / from-hf. reshard and from-hf write model-only
checkpoints (OUT/latest, OUT/iter_XXXXXXX/model/{manifest.json, tpTT_ppPP.safetensors}) that training
starts from with `--set checkpoint.init_from=OUT_DIR` (fresh optimizer, any TP/PP).
Reads safetensors + JSON only. Bad input: one line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import os
import sys
import time

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, positive_int, quiet_transformers


@command
def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    subs = {}
    # Every flag's name (dest) is the parameter of megatron_outeff.convert's function of the same name.
    for name, source, help in (
        ("to-hf", "ckpt", "checkpoint -> Hugging Face directory (plain OPT / Llama or remote code)"),
        ("reshard", "ckpt", "checkpoint -> model-only checkpoint at another TP/PP"),
        ("from-hf", "hf_dir", "Hugging Face OPT or Llama directory -> model-only checkpoint"),
    ):
        subs[name] = p = sub.add_parser(name, help=help)
        p.add_argument(source)
        p.add_argument("--output-dir", dest="out_dir", required=True, help="OUT_DIR: must not exist or be empty")
    p = subs["to-hf"]
    p.add_argument("--iteration", type=nonnegative_int, default=None, help="default: the checkpoint's latest")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer files to copy")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p = subs["reshard"]
    p.add_argument("--tp", type=positive_int, required=True)
    p.add_argument("--pp", type=positive_int, required=True)
    p.add_argument("--iteration", type=nonnegative_int, default=None)
    p = subs["from-hf"]
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--pp", type=positive_int, default=1)
    p.add_argument(
        "--variant",
        default=None,
        help="attention variant of a public OPT or Llama: a softmax name (softmax1) or JSON, e.g. "
        '\'{"softmax": "learnable", "gate": "linear"}\'; our remote-code dirs carry their own',
    )
    p.add_argument(
        "--seq-length", type=positive_int, default=None, help="training sequence length (clip_alpha variants)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of initialised gate weights")
    options = vars(parser.parse_args(argv))
    quiet_transformers()  # progress is ours, on stdout; stderr is for the one error line
    from megatron_outeff import convert

    t0 = time.time()

    def progress(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    run = getattr(convert, options.pop("command").replace("-", "_"))  # to_hf, reshard, from_hf
    out = run(**options, progress=progress)
    progress(f"done: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
