#!/bin/sh
# Optional: build NVIDIA apex from source. Nothing in this repo needs it (native torch.amp does mixed
# precision); it is here for configs that explicitly ask for apex. Needs a CUDA toolkit matching torch.
set -eu
PYTHON=${PYTHON:-python}
if "$PYTHON" -c "import apex.amp" >/dev/null 2>&1; then
    echo "apex is already importable with $PYTHON: nothing to do."
    exit 0
fi
# The PyPI package called 'apex' is an unrelated project: never 'pip install apex'.
SRC=${APEX_SRC:-/tmp/apex-src}
echo "Cloning https://github.com/NVIDIA/apex into $SRC"
[ -d "$SRC/.git" ] || git clone --depth 1 https://github.com/NVIDIA/apex "$SRC"
echo "Building apex with its C++/CUDA extensions (several minutes) using $PYTHON"
cd "$SRC"
"$PYTHON" -m pip install -v --disable-pip-version-check --no-cache-dir --no-build-isolation \
    --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" .
"$PYTHON" -c "import apex; print('apex installed:', apex.__file__)"
