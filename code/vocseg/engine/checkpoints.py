"""Checkpoint saving and loading with Ignite (local files or ClearML model ids); loading explains mismatches
instead of dumping tracebacks."""

import logging
import re
import shutil
from contextlib import suppress
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine

from vocseg.errors import UserError
from vocseg.runtime import signals

_MODEL_ID = re.compile(r"[0-9a-f]{32}")


class SaveThenRemove(DiskSaver):
    """Ignite's Checkpoint deletes the oldest file before it writes the new one, so a kill during a write would
    leave a single checkpoint. Deleting after the write keeps ``n_saved`` complete files at every moment
    (one more while writing). atomic=True writes a temporary file and renames it: no half-written checkpoint.
    SIGTERM / Ctrl-C take effect once the write is over (signals.uninterrupted)."""

    def __init__(self, dirname):
        super().__init__(dirname, require_empty=False, atomic=True)
        self._stale = []

    def remove(self, filename: str) -> None:
        self._stale.append(filename)

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        with signals.uninterrupted():
            before = set(self.dirname.glob("tmp*"))
            try:
                super().__call__(checkpoint, filename, metadata)
            except BaseException:
                # Ignite removes its temporary file after a failed write, unless closing it fails too (a full
                # disk, flushing): a partial file left behind would hold the space that a rerun needs.
                for partial in set(self.dirname.glob("tmp*")) - before:
                    with suppress(OSError):
                        partial.unlink()
                raise
            for name in self._stale:
                # Ignite "removes" a file it is about to write again (the last iteration); a resumed run's
                # best-model record may name files it could not copy over.
                if name != filename:
                    with suppress(FileNotFoundError):
                        super().remove(name)
            self._stale.clear()


def training_checkpointer(to_save: dict, dirname, n_saved: int = 2) -> Checkpoint:
    return Checkpoint(to_save, SaveThenRemove(dirname), filename_prefix="training", n_saved=n_saved)


def best_model_checkpointer(model, dirname, trainer, metric: str = "mIoU", n_saved: int = 2) -> Checkpoint:
    return Checkpoint(
        {"model": model},
        SaveThenRemove(dirname),
        filename_prefix="best",
        n_saved=n_saved,
        score_function=Checkpoint.get_default_score_fn(metric),
        score_name=f"val_{metric}",
        global_step_transform=global_step_from_engine(trainer),
    )


def load_file(path, what: str, env: str):
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.pt"), key=lambda p: p.stat().st_mtime)
        example = found[-1] if found else path / "checkpoints" / "training_checkpoint_<iteration>.pt"
        raise UserError(f"{env}={path} is a folder: set {env} to a checkpoint file in it, e.g. {env}={example}")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: fix {env} (or unset it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{what} {path} is not a readable PyTorch checkpoint ({type(exc).__name__}): fix {env}"
        ) from None


def _model_state(model):
    return getattr(model, "module", model).state_dict()


def check_model_state(model, state: dict, path) -> None:
    """Raise a UserError naming the differing keys when ``state`` does not fit ``model``."""
    expected = _model_state(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return

    def few(items):
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    details = []
    if missing:
        details.append(f"missing {few(missing)}")
    if unexpected:
        details.append(f"unexpected {few(unexpected)}")
    if shapes:
        details.append(f"shape differs {few(shapes)}")
    raise UserError(f"checkpoint {path} was saved from a different model: {'; '.join(details)}")


def resume(to_load: dict, path, env: str = "RESUME_FROM", optional=()) -> dict:
    """Restores ``to_load`` from a training checkpoint; keys in ``optional`` (newer additions, e.g. the
    best-model record) are restored where the checkpoint has them. Returns the checkpoint."""
    checkpoint = load_file(path, "checkpoint", env)
    if "settings" in to_load:
        to_load["settings"].source = path
        if "settings" not in checkpoint:  # written before settings were recorded
            to_load = {k: v for k, v in to_load.items() if k != "settings"}
    absent = [k for k in to_load if k not in checkpoint and k not in optional]
    if absent:
        raise UserError(f"checkpoint {path} lacks {', '.join(absent)}: resume from a training_checkpoint_*.pt file")
    check_model_state(to_load["model"], checkpoint["model"], path)
    to_load = _across_precisions(to_load, checkpoint, path)
    Checkpoint.load_objects(to_load={k: v for k, v in to_load.items() if k in checkpoint}, checkpoint=checkpoint)
    return checkpoint


def _across_precisions(to_load: dict, checkpoint: dict, path) -> dict:
    """A run resumed under another precision than the one that wrote ``path`` (a re-enqueued task on another
    agent, amp changed on purpose) continues; only fp16's loss scale cannot carry over, which one line says.
    The weights, optimiser and schedule are fp32 in every precision, so they load as they are."""
    scaler = to_load.get("scaler")
    if scaler is None or "scaler" not in checkpoint:
        return to_load
    saved = checkpoint["scaler"]
    if scaler.is_enabled() and not saved:
        logging.getLogger("vocseg").info(
            "checkpoint %s was written without fp16 (fp32 or bf16); this run is fp16: its loss scale starts afresh "
            "at %g",
            path,
            scaler.get_scale(),
        )
        return {k: v for k, v in to_load.items() if k != "scaler"}
    if saved and not scaler.is_enabled():
        logging.getLogger("vocseg").info(
            "checkpoint %s was written under fp16; this run is not: its loss scale (%g) is not needed",
            path,
            saved.get("scale", float("nan")),
        )
        return {k: v for k, v in to_load.items() if k != "scaler"}
    return to_load


def carry_best_models(best: Checkpoint, resumed_from, best_dir) -> list:
    """Copies the best models a restored record names from the resumed run's best/ folder into this run's;
    returns the names it could not find there (the record keeps their scores)."""
    if idist.get_rank() > 0:  # rank 0 alone writes files
        return []
    source = Path(resumed_from).resolve().parent.parent / "best"
    missing = []
    for item in best._saved:
        if (source / item.filename).is_file() and source != Path(best_dir).resolve():
            shutil.copy2(source / item.filename, Path(best_dir) / item.filename)
        elif not (Path(best_dir) / item.filename).is_file():
            missing.append(item.filename)
    return missing


def load_weights(model, path, env: str = "WEIGHTS_PATH") -> None:
    state = load_file(path, "weights file", env)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    check_model_state(model, state, path)
    getattr(model, "module", model).load_state_dict(state)


def resolve_weights(weights_path, env: str = "WEIGHTS_PATH"):
    """A local path unchanged; a ClearML model id (32 hex characters) -> the local copy of its weights."""
    if not weights_path:
        raise UserError(
            f"{env} is not set and the config's weights_path is empty: set {env}=/path/to/best_model.pt "
            "(or a ClearML model id), or weights_path in the config"
        )
    text = str(weights_path).strip()
    if not _MODEL_ID.fullmatch(text) or Path(text).exists():
        return weights_path
    from vocseg.clearml import session as clearml_session

    return clearml_session.fetch_model_weights(text)


def loads(path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        logging.getLogger("vocseg").warning("skipping damaged checkpoint %s (%s)", path, type(exc).__name__)
        return False
    return True


def newest_complete_checkpoint(folder):
    """The newest ``training_checkpoint_<iteration>.pt`` in ``folder`` that loads, or None.

    Saving is atomic (a temporary file renamed into place), so a checkpoint that does not load was damaged
    afterwards (a full disk, a copy cut short): it is skipped with a warning, never resumed from.
    """
    found = sorted(
        Path(folder).glob("training_checkpoint_*.pt"),
        key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else -1,
    )
    return next((path for path in reversed(found) if loads(path)), None)


class RunSettings:
    """The settings that fix a run's schedule and data order, kept in its training checkpoints: resuming
    with other values would continue a different run, so loading them compares and refuses."""

    def __init__(self, settings: dict, fixes: str):
        self.settings, self.fixes, self.source = dict(settings), fixes, None

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, saved: dict) -> None:
        differ = [f"{k}={saved.get(k)!r} there, {v!r} now" for k, v in self.settings.items() if saved.get(k) != v]
        if differ:
            raise UserError(
                f"checkpoint {self.source} was written with other settings ({'; '.join(differ)}): {self.fixes}"
            )
