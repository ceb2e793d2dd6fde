#!/usr/bin/env bash
# Builds, on a machine WITH the PyPI registry, the offline bundle that tools/gpu/run.sh installs on
# the GPU machine (no network there): the folder .gpu-bundle/ (git-ignored) with wheels for what that
# machine's image lacks (/work/.library/device/KINDS.md lists what it has).
#   bash tools/gpu/bundle.sh            -> .gpu-bundle/*.whl + .gpu-bundle/MANIFEST.txt
#
# - megatron-core, compressed-tensors and DeepSpeed at the versions pinned in pyproject.toml (their
#   one owner); megatron-core as the cp312 manylinux x86_64 wheel (the GPU image has Python 3.12);
# - DeepSpeed, which PyPI ships as an sdist only, built here as a pure-Python wheel with no
#   prebuilt ops (DS_BUILD_OPS=0; its setup.py imports torch: BUILD_PYTHON, default ./.venv);
# - their runtime dependencies that the GPU image lacks (EXTRA below, the versions tested in
#   ./.venv). Everything the image has (torch, triton, numpy, packaging, psutil, einops, msgpack,
#   ninja, py-cpuinfo, tqdm, pyyaml, transformers ...) is NOT bundled: run.sh installs with --no-deps
#   into a private --target folder, so the preinstalled torch and triton are never touched.
# Idempotent: wheels already in the folder are kept. Total ~10 MiB (the 64 MiB travel limit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
BUILD_PYTHON="${BUILD_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$BUILD_PYTHON" ]]; then
  echo "bundle.sh: BUILD_PYTHON '$BUILD_PYTHON' is not an executable Python with torch (run launch/setup_env.sh first, or set BUILD_PYTHON)" >&2
  exit 2
fi
# Pins from pyproject.toml (the project's only list of versions).
read -r MCORE DS CT < <("$BUILD_PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib, re
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = proj["dependencies"] + [r for extra in proj["optional-dependencies"].values() for r in extra]
pins = {m.group(1).lower(): m.group(2) for r in reqs if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", r.strip()))}
print(pins["megatron-core"], pins["deepspeed"], pins["compressed-tensors"])
PY
)
# Runtime dependencies of the three that the GPU image lacks (pydantic: DeepSpeed's config and
# compressed-tensors; hjson: DeepSpeed; loguru: compressed-tensors). typing-extensions is bundled
# because this pydantic needs >= 4.16 and the image's version is not recorded; it is a strict
# superset of older releases, so shadowing the image's copy is safe.
EXTRA=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
       typing-extensions==4.16.0 hjson==3.1.0 loguru==0.7.3)

mkdir -p "$BUNDLE"
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "[bundle] downloading megatron-core==$MCORE compressed-tensors==$CT ${EXTRA[*]} (cp312 manylinux x86_64)"
"$BUILD_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${PLATFORM[@]}" --platform any -d "$BUNDLE" \
  "megatron-core==$MCORE" "compressed-tensors==$CT" "${EXTRA[@]}"
if ! ls "$BUNDLE"/deepspeed-"$DS"-*.whl >/dev/null 2>&1; then
  echo "[bundle] building deepspeed==$DS as a pure-Python wheel (DS_BUILD_OPS=0) with $BUILD_PYTHON"
  DS_BUILD_OPS=0 "$BUILD_PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
    -w "$BUNDLE" "deepspeed==$DS"
fi
# One version of each distribution: two would stop the whole offline install.
"$BUILD_PYTHON" - "$BUNDLE" <<'PY'
import collections, pathlib, sys, zipfile
bundle = pathlib.Path(sys.argv[1])
wheels = sorted(bundle.glob("*.whl"))
names = collections.Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
dup = [n for n, c in names.items() if c > 1]
if dup:
    sys.exit(f"bundle.sh: several versions of {dup} in {bundle}: remove the stale wheels")
ds = [w for w in wheels if w.name.startswith("deepspeed-")]
assert ds and ds[0].name.endswith("-py3-none-any.whl"), f"deepspeed wheel is not pure Python: {ds}"
with zipfile.ZipFile(ds[0]) as z:
    compiled = [n for n in z.namelist() if n.endswith((".so", ".pyd"))]
assert not compiled, f"deepspeed wheel carries compiled ops: {compiled}"
total = sum(w.stat().st_size for w in wheels)
lines = [f"{w.name}  {w.stat().st_size / 2**20:.2f} MiB" for w in wheels]
lines.append(f"total {total / 2**20:.2f} MiB in {len(wheels)} wheels")
(bundle / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
print("\n".join("[bundle] " + l for l in lines))
if total > 32 * 2**20:
    sys.exit(f"bundle.sh: bundle is {total / 2**20:.1f} MiB; it must stay well under the 64 MiB travel limit")
PY
