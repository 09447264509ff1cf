#!/bin/sh
# Checks that OpenCV imports; only if it does not, installs the system libraries it links against
# (Debian/Ubuntu). opencv-python-headless itself comes from requirements.txt.
set -eu
PYTHON=${PYTHON:-python}
if "$PYTHON" -c "import cv2; print('cv2', cv2.__version__, 'imports fine: nothing to do.')"; then
    exit 0
fi
echo "cv2 does not import: installing the shared libraries it needs with apt-get"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends libglib2.0-0 libgl1 libsm6 libxext6 libxrender1
"$PYTHON" -c "import cv2; print('cv2', cv2.__version__, 'imports now')"
