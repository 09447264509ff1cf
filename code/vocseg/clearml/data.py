"""ClearML Datasets as the data source: versioned uploads of a VOC or SBD folder, and local copies of them.

``DATASET_PATH`` / ``SBD_DATASET_PATH`` may name a dataset instead of a folder:
``clearml://<dataset id>`` or ``clearml://<project>/<name>[@<version>]`` (the newest finalised version
when none is given). Each node downloads it once into ClearML's cache (local rank 0 first, the others wait
and then find it there), and the training task records the dataset id under ``Datasets/<variable>``.
``code/scripts/upload_dataset.py`` creates such datasets.
"""

import re
from pathlib import Path
from typing import NamedTuple

import ignite.distributed as idist

from vocseg.clearml.session import require_server
from vocseg.errors import UserError, one_line

SCHEME = "clearml://"
PROJECT = "Pascal-VOC12 Datasets"
_ID = re.compile(r"^[0-9a-f]{32}$")
UPLOAD_HINT = "create one with code/scripts/upload_dataset.py"
# What each kind of dataset must hold at its top, as the readers in vocseg.datasets expect it.
LAYOUTS = {"voc": ("VOCdevkit",), "sbd": ("cls", "img")}


def is_dataset_uri(value: str) -> bool:
    return value.strip().startswith(SCHEME)


def _selector(uri: str, variable: str) -> dict:
    """Dataset.get() arguments for a clearml:// address."""
    rest = uri.strip()[len(SCHEME) :].strip("/")
    if _ID.match(rest):
        return {"dataset_id": rest}
    project, _, name = rest.rpartition("/")
    name, _, version = name.partition("@")
    if not project or not name:
        raise UserError(
            f"{variable}={uri} is not a dataset address: use {SCHEME}<dataset id> or "
            f"{SCHEME}<project>/<name>[@<version>]"
        )
    return {"dataset_project": project, "dataset_name": name, "dataset_version": version or None}


def local_copy(uri: str, variable: str, kind: str) -> Path:
    """The local folder of the dataset ``uri`` names, checked to be a ``kind`` ("voc"/"sbd") layout."""
    first = idist.get_local_rank() == 0
    path, error = None, None
    if first:
        try:
            path = _fetch(uri, variable, kind)
        except UserError as exc:
            error = exc
    if idist.get_world_size() > 1:
        idist.barrier()  # the node's other processes read the copy rank 0 has just put in the cache
    if error:
        raise error
    return path if first else _fetch(uri, variable, kind)


def _fetch(uri: str, variable: str, kind: str) -> Path:
    from clearml import Dataset, Task

    selector = _selector(uri, variable)
    require_server(f"{variable}={uri}")
    recording = Task.current_task() is not None
    try:
        # alias= records the id on the current task (hyperparameter Datasets/<variable>).
        dataset = Dataset.get(
            **selector, only_completed=True, alias=variable if recording else None, silence_alias_warnings=True
        )
    except Exception as exc:
        raise UserError(
            f"{variable}={uri}: no such finalised ClearML dataset ({one_line(exc)}); {UPLOAD_HINT}, "
            f"or check the id/name"
        ) from None
    path = Path(dataset.get_local_copy())
    missing = [sub for sub in LAYOUTS[kind] if not (path / sub).is_dir()]
    if missing:
        top = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise UserError(
            f"{variable}={uri}: dataset {dataset.id} has no {'/, '.join(missing)}/ at its top (it holds "
            f"{top}): upload the folder {'that contains VOCdevkit' if kind == 'voc' else 'with cls/ img/'}"
            f" ({UPLOAD_HINT})"
        )
    print(
        f"{variable}={uri}: ClearML dataset {dataset.id} ({dataset.project}/{dataset.name} "
        f"version {dataset.version}), local copy {path}",
        flush=True,
    )
    return path


# ---------------------------------------------------------------------------------------------------------
# Uploads.


class Upload(NamedTuple):
    id: str
    version: str
    reused: bool
    files: int


def _content(root: Path, prefix: str) -> dict:
    """{path inside the dataset: sha256} of the files to upload, hashed as ClearML hashes its entries."""
    from clearml.storage.hashing import sha256sum

    return {
        (Path(prefix) / p.relative_to(root)).as_posix() if prefix else p.relative_to(root).as_posix(): sha256sum(
            str(p)
        )[0]
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _latest(project: str, name: str):
    from clearml import Dataset

    try:
        return Dataset.get(dataset_project=project, dataset_name=name, only_completed=True, silence_alias_warnings=True)
    except ValueError:  # none yet
        return None


def upload(folder: Path, kind: str, name: str, project: str = PROJECT, output_uri: str | None = None) -> Upload:
    """A finalised dataset version holding ``folder`` (VOC: its VOCdevkit/; SBD: cls/ img/ and split files).

    The newest version is reused when it holds exactly these files; otherwise a child version of it is
    created, which uploads only what changed.
    """
    from clearml import Dataset

    folder = Path(folder)
    missing = [sub for sub in LAYOUTS[kind] if not (folder / sub).is_dir()]
    if missing:
        raise UserError(
            f"{folder} has no {'/, '.join(missing)}/ sub-folder: pass the folder "
            f"{'that contains VOCdevkit' if kind == 'voc' else 'with cls/ img/ train.txt'}"
        )
    # VOC: only VOCdevkit/ goes up (the folder may hold SBD/ or other things); SBD: the whole folder.
    root, prefix = (folder / "VOCdevkit", "VOCdevkit") if kind == "voc" else (folder, "")
    require_server(f"uploading {folder}")
    content, latest = _content(root, prefix), _latest(project, name)
    if latest is not None and {p: e.hash for p, e in latest.file_entries_dict.items()} == content:
        return Upload(latest.id, latest.version, True, len(content))
    dataset = Dataset.create(
        dataset_name=name,
        dataset_project=project,
        output_uri=output_uri,
        parent_datasets=[latest.id] if latest is not None else None,
        description=f"{kind.upper()} segmentation data uploaded from {folder.resolve()}",
    )
    try:
        # Against the parent: adds new and changed files, removes the ones gone from the folder.
        dataset.sync_folder(local_path=str(root), dataset_path=prefix or None, verbose=False)
        dataset.upload(show_progress=False, output_url=output_uri)
        dataset.finalize()
    except Exception as exc:
        raise UserError(
            f"uploading {folder} as dataset {dataset.id} failed: {one_line(exc)}; the draft is left on "
            f"the server, rerun to try again"
        ) from None
    return Upload(dataset.id, dataset.version, False, len(content))
