"""What a clone run by clearml-agent changes, read from the server before anything is built.

Two kinds of edit, applied in this order:

1. the configuration object ``config`` (the config file's text, editable in the UI): when it differs from the
   file in the agent's checkout, the edited text is the config that runs;
2. the ``Config/*`` hyperparameters: each value that differs from the constant first recorded (the checkout's
   file) becomes a py_config_runner mutation on top of that config. A value edited in both places therefore
   takes the ``Config/*`` one.

Read with ``Task.get_task`` (no ``Task.init``), so the launcher can decide how many processes to start from
the edited config before any of them exists.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vocseg import settings
from vocseg.clearml import agent_task_id
from vocseg.clearml.session import CONFIG_OBJECT, SECTION, config_constants, config_overrides, say
from vocseg.config import ConfigSource, literal_constants
from vocseg.errors import UserError, one_line


@dataclass
class CloneEdits:
    config_path: Path  # the config to load: the checkout's file, or the edited text written out
    mutations: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # what the clone changed, for the task's console


def clone_source(source: ConfigSource) -> ConfigSource:
    """Under clearml-agent: what to run instead of ``source`` (the command line's config and mutations),
    with the task's edits applied; unchanged otherwise."""
    task_id = agent_task_id()
    if not task_id:
        return source
    edits = read_clone_edits(task_id, source.config_path)
    for note in edits.notes:
        say(note)
    return source._replace(config_path=edits.config_path, mutations={**source.mutations, **edits.mutations})


def _write_edited(text: str, config_path: Path, where: str) -> Path:
    try:
        compile(text, str(config_path), "exec")
    except SyntaxError as exc:
        raise UserError(
            f"{where}: the edited configuration object '{CONFIG_OBJECT}' does not parse (line "
            f"{exc.lineno}: {exc.msg}): fix its text in the task, or clone the original again"
        ) from None
    # Same file name in a folder of its own: the run and its output folder keep the config's name.
    path = Path(tempfile.mkdtemp(prefix="vocseg-clone-")) / config_path.name
    path.write_text(text)
    return path


def read_clone_edits(task_id: str, config_path) -> CloneEdits:
    """The config an agent's run must load for task ``task_id``, and the mutations to apply to it."""
    from clearml import Task

    config_path = Path(config_path)
    try:
        task = Task.get_task(task_id=task_id)
        text = task.get_configuration_object(CONFIG_OBJECT)
        edited = task.get_parameters_as_dict().get(SECTION, {})
    except Exception as exc:
        raise UserError(f"task {task_id}: could not read its configuration from the server: {one_line(exc)}") from None
    where = f"task {task_id} ({task.name})"
    result = CloneEdits(config_path)
    if text is not None and text != config_path.read_text():
        result = CloneEdits(_write_edited(text, config_path, where))
        result.notes.append(
            f"the configuration object '{CONFIG_OBJECT}' was edited in the task: running its text "
            f"({result.config_path}) instead of {config_path}"
        )
    original = config_constants(config_path)
    try:
        mutations = config_overrides(original, edited)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    gone = sorted(set(mutations) - set(literal_constants(result.config_path)) - set(settings.SETTINGS))
    if gone:
        raise UserError(
            f"{where}: {', '.join(f'{SECTION}/{n}' for n in gone)} edited, but the edited configuration "
            f"object no longer defines it: edit the value in the text instead"
        )
    if mutations:
        result.notes.append(
            "hyperparameters edited in the task override the config: "
            + ", ".join(
                f"{k}={v!r} (was {original[k]!r})" if k in original else f"{k}={v!r} (not set in the config)"
                for k, v in sorted(mutations.items())
            )
        )
    result.mutations = mutations
    return result
