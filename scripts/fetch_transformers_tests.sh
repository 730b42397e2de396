#!/usr/bin/env bash
# Extract transformers' model tester mixins (tests/test_modeling_common.py, tests/test_configuration_common.py)
# from the source distribution of the pinned transformers version on PyPI into .cache/transformers-tests/<version>/,
# which tests/test_transformers_mixins.py imports. Idempotent: does nothing when that version is already there.
#
# Usage: scripts/fetch_transformers_tests.sh [--help]
#   PYTHON   interpreter whose pip downloads the sdist (default: .venv/bin/python, else python3)
#   DEST     cache root (default: .cache/transformers-tests)
# The sdist does not ship tests/generation/ (GenerationTesterMixin) or tests/exporters/; the test module runs
# those only from a full checkout named by TRANSFORMERS_TESTS_DIR (see tests/test_transformers_mixins.py).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
DEST="${DEST:-$ROOT/.cache/transformers-tests}"

# The pinned version is the one in requirements.txt (the one the test suite runs against).
VERSION="$(sed -n 's/^transformers==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")"
if [[ -z "$VERSION" ]]; then
    echo "fetch_transformers_tests: no 'transformers==<version>' pin in $ROOT/requirements.txt" >&2
    exit 1
fi
TARGET="$DEST/$VERSION"
FILES=(tests/test_modeling_common.py tests/test_configuration_common.py)

if [[ -f "$TARGET/.complete" ]]; then
    echo "transformers $VERSION tester mixins already in $TARGET"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# --no-build-isolation: pip only needs the archive, not a metadata build with downloaded build backends.
"$PYTHON" -m pip download -q --no-binary :all: --no-deps --no-build-isolation "transformers==$VERSION" -d "$WORK" \
    || "$PYTHON" -m pip download -q --no-binary :all: --no-deps "transformers==$VERSION" -d "$WORK"
SDIST="$(ls "$WORK"/transformers-*.tar.gz)"
PREFIX="transformers-$VERSION"

rm -rf "$TARGET"
mkdir -p "$TARGET"
tar -xzf "$SDIST" -C "$WORK" "${FILES[@]/#/$PREFIX/}"
for f in "${FILES[@]}"; do
    mkdir -p "$TARGET/$(dirname "$f")"
    cp "$WORK/$PREFIX/$f" "$TARGET/$f"
done
# tests/ is a package in transformers' repository (test_configuration_common.py imports its __init__.py).
touch "$TARGET/tests/__init__.py"
echo "$VERSION" > "$TARGET/.complete"
echo "transformers $VERSION tester mixins written to $TARGET"
