#!/usr/bin/env python
"""Train a sentencepiece tokenizer for megatron_outeff.

The model reserves <pad>=0, <s>=1, </s>=2 (end of document), <unk>=3 and uses byte fallback with
identity normalization, so decode(encode(text)) == text for any UTF-8 text without U+2581
(sentencepiece's whitespace symbol "\u2581" decodes as a space; tools/preprocess_data.py counts
and reports documents that do not round-trip). Writes
OUTPUT_PREFIX.model (load it with megatron_outeff.data.tokenizer.load_tokenizer, or pass it to
tools/preprocess_data.py --tokenizer) and OUTPUT_PREFIX.vocab (human-readable pieces).

Examples:
  python tools/train_tokenizer.py --input 'corpus/*.txt' --output-prefix tok/spm8k
  python tools/train_tokenizer.py --input train.jsonl --json-key text --vocab-size 32000 \\
      --model-type unigram --output-prefix tok/uni32k
"""

import argparse
import sys

from megatron_outeff.data.tokenizer_training import MAX_SENTENCE_BYTES, MODEL_TYPES, train_sentencepiece
from megatron_outeff.utils.cli import OneLineArgumentParser, add_corpus_arguments, command, positive_float, positive_int


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(
        p,
        input_help=".txt files (one document per file, or per paragraph with --txt-mode "
        "paragraph) and/or .jsonl files (one JSON object per line); quote globs",
        txt_mode_help="document unit of .txt input (only matters for sampling; default file)",
    )
    p.add_argument(
        "--output-prefix",
        dest="model_prefix",
        required=True,
        help="writes PREFIX.model and PREFIX.vocab (directories are created)",
    )
    p.add_argument(
        "--vocab-size", type=positive_int, default=8192, help="total pieces incl. specials and 256 bytes (default 8192)"
    )
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="default bpe")
    p.add_argument(
        "--character-coverage",
        type=positive_float,
        default=0.9995,
        help="share of characters covered by pieces; the rest falls back to bytes",
    )
    p.add_argument(
        "--input-sentence-size",
        type=positive_int,
        default=2_000_000,
        help="max lines sentencepiece samples into memory (default 2M)",
    )
    p.add_argument(
        "--threads", dest="num_threads", type=positive_int, default=None, help="trainer threads (default: CPU count)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model/.vocab")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    a = p.parse_args(argv)
    stats = {}
    path = train_sentencepiece(**vars(a), stats=stats)  # the flags' names are its parameters'
    print(
        f"wrote {path} ({a.model_type}, vocab {a.vocab_size}, eod '</s>' = 2) from {stats['documents']} documents, "
        f"{stats['sentences']} lines"
    )
    if stats["long_lines"]:
        print(
            f"note: {stats['long_lines']} line(s) longer than {MAX_SENTENCE_BYTES} bytes (sentencepiece's maximum "
            f"sentence length) were cut at spaces into {stats['chunks']} pieces for training; nothing was skipped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
