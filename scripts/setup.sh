#!/usr/bin/env bash
# Create ./.venv and install copsd into it (editable, with the C++ CPU extension).
#   COPSD_TORCH   pip spec for torch when the venv has none (default: torch==2.13.0; on a GPU
#                 node, install your CUDA torch into the venv first and it is kept)
#   PYTHON        interpreter used to create the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=69" wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "${COPSD_TORCH:-torch==2.13.0}"
# torch first, then the package without build isolation so the extension builds against it.
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import copsd, copsd.ops; print('copsd', copsd.__version__, 'backends:', copsd.ops.available_backends())"
