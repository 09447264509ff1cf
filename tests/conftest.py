"""Shared fixtures. `synthetic_voc` is built once per session: treat it as read-only and copy
whatever a test needs to break (see copy_voc in test_datasets.py)."""

import pytest

from vocseg.synthetic import make_synthetic_voc


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """Folder containing VOCdevkit/ (DATASET_PATH); SBD (SBD_DATASET_PATH) is its "SBD" child.

    24 VOC train and 21 VOC val images at 96x96, so every class appears in both splits.
    """
    out = tmp_path_factory.mktemp("synthetic_voc")
    make_synthetic_voc(out, 24, 21, size=(96, 96), seed=0)
    return out
