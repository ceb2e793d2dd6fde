#!/usr/bin/env python
"""Tokenize a text/JSONL corpus into a megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Every document becomes one sequence: tokenizer.encode(text) + [eod]. Token dtype follows the vocab
(uint16 below 65500 ids, else int32). Output is written under temporary names and renamed only
when complete, so an interrupted or failed run leaves no .bin/.idx behind. Pass the PREFIX (no
extension) to the training config's data path / megatron_outeff.data.datasets.build_gpt_datasets.

Examples:
  python tools/preprocess_data.py --input data/train.jsonl --tokenizer tok/spm8k.model \\
      --output-prefix data/train_text --workers 4
  python tools/preprocess_data.py --input 'books/*.txt' --txt-mode paragraph \\
      --tokenizer opt/tokenizer.json --output-prefix data/books
"""

import argparse
import sys

from megatron_outeff.utils.cli import OneLineArgumentParser, add_corpus_arguments, command, positive_int


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(
        p,
        input_help=".txt and/or .jsonl/.json/.ndjson files or quoted globs, read in the given order",
        txt_mode_help="one document per .txt file, or per blank-line-separated block (default file)",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="sentencepiece .model, Hugging Face tokenizer.json, or a directory holding one",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        help="end-of-document token (default: sentencepiece eos; tokenizer.json: "
        "'<|endoftext|>' if present else '</s>')",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="tokenizer worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a = p.parse_args(argv)

    # Imported here so `--help` answers without the ~5 s megatron.core import.
    from megatron_outeff.data.preprocess import preprocess_corpus

    s = preprocess_corpus(**vars(a))  # the flags' names are its parameters'
    print(
        f"wrote {s.prefix}.bin/.idx: {s.documents} documents, {s.tokens} tokens ({s.dtype}) "
        f"in {s.seconds:.1f} s ({s.tokens / max(s.seconds, 1e-9):.3g} tokens/s)"
    )
    if s.lossy_documents:
        print(
            f"warning: {s.lossy_documents} of {s.documents} documents do not round-trip "
            f"(decode(encode(text)) != text; the first is document {s.first_lossy}, 0-based): with a "
            f"sentencepiece tokenizer, text holding U+2581 decodes it as a space"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
