"""Every listed sample checked once before a run starts, so a bad file fails the run at once, not epochs in.

A check reads what drawing the sample would reject (datasets._SegmentationFiles.check: image header and end
marker, the whole mask: mode, values, size). A passed check
is remembered in ``$VOCSEG_CACHE_DIR`` (default ``~/.cache/vocseg``) under a key made of every checked file's
path, size and modification time, so a rerun on unchanged data only stats the files.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

from torch.utils.data import Subset

log = logging.getLogger(__name__)
_VERSION = "2"  # bump when the check itself changes, so old passes no longer count


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vocseg"
    return Path(os.environ.get("VOCSEG_CACHE_DIR") or default) / "sample-checks"


def _files_and_indices(samples):
    """(reader from datasets.py, indices) behind a loader's dataset (SegmentationSamples over a Subset or not)."""
    raw, indices = getattr(samples, "dataset", samples), None
    if isinstance(raw, Subset):
        raw, indices = raw.dataset, list(raw.indices)
    if not callable(getattr(raw, "check", None)):  # not one of datasets.py's readers
        return None, None
    return raw, range(len(raw)) if indices is None else indices


def _key(entries) -> str:
    digest = hashlib.sha256(_VERSION.encode())
    for files, index in entries:
        for path in (files.image_paths[index], files.mask_paths[index]):
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _collect(loaders: dict):
    """[(reader, index)], each sample once, and the names of the loaders that could not be checked."""
    entries, skipped = {}, []
    for name, loader in loaders.items():
        if loader is None:
            continue
        files, indices = _files_and_indices(loader.dataset)
        if files is None:
            skipped.append(name)
            continue
        for index in indices:
            entries.setdefault((id(files), index), (files, index))
    return list(entries.values()), skipped


def check_loaders(loaders: dict) -> str:
    """Checks the samples of ``{name: DataLoader or None}``; returns the line to log. Raises UserError."""
    entries, skipped = _collect(loaders)
    marker = cache_dir() / _key(entries)
    note = f" ({', '.join(skipped)}: not a VOC/SBD reader, not checked)" if skipped else ""
    if marker.is_file():
        return f"{len(entries)} samples unchanged since their last check ({marker}){note}"
    start = time.perf_counter()
    for files, index in entries:
        files.check(index)
    seconds = time.perf_counter() - start
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:
        log.warning("sample check not cached (%s): set VOCSEG_CACHE_DIR to a writable folder to skip it next time", exc)
    return f"checked {len(entries)} samples in {seconds:.1f} s (images, masks, sizes){note}"
