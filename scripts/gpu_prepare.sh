#!/usr/bin/env bash
# Prepares what scripts/gpu_check.sh needs beyond the GPU image: the pure-Python packages the image lacks, copied as
# source from this machine's environment into .gpu_site/ (add /.gpu_site/ to .git/info/exclude once, as the device
# README does for its wheels; untracked, it would travel anyway), for the device
# tool's `carry`: run(command="scripts/gpu_check.sh $OUT", carry=[".gpu_site"]).
#
#   scripts/gpu_prepare.sh        # from the repository root, with the project's virtual environment active
#
# Packages (versions as installed here): robustbench (tests/peers/robustbench.py loads its architecture files by path),
# torchattacks and pyautoattack (scripts/benchmark_autoattack.py's peers; pyautoattack without its 44 MB
# examples/), ml_collections (configs). Everything else gpu_check.sh uses is in the image (device README, KINDS.md).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SITE="$ROOT/.gpu_site"
rm -rf "$SITE"
mkdir -p "$SITE"
PY=${PYTHON:-python}
for pkg in robustbench torchattacks pyautoattack ml_collections; do
  dir=$("$PY" -c "import importlib.util, os, sys; s = importlib.util.find_spec(sys.argv[1]); print(os.path.dirname(s.origin) if s else '')" "$pkg")
  if [ -z "$dir" ]; then echo "gpu_prepare: $pkg is not installed here" >&2; exit 2; fi
  cp -r "$dir" "$SITE/$pkg"
done
rm -rf "$SITE/pyautoattack/examples"
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
EXCLUDE="$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)/info/exclude"
grep -qxF "/.gpu_site/" "$EXCLUDE" 2>/dev/null || echo "/.gpu_site/ (not ignored yet: add it to $EXCLUDE, or it shows as untracked)"
du -sh "$SITE"
