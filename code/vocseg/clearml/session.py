"""The ClearML session of a run: online or offline, the task, how an agent reruns it, enqueueing, Docker settings.

``export CLEARML_OUTPUT_PATH=...`` switches it on (a run under ``clearml-agent`` always has it on).

Online or offline: a server is used when credentials are configured (``~/clearml.conf``,
``CLEARML_CONFIG_FILE``, or ``CLEARML_API_ACCESS_KEY``/``CLEARML_API_SECRET_KEY``); without credentials,
or with ``CLEARML_OFFLINE_MODE=1``, the run is tracked offline into a session zip that
``code/scripts/import_offline_session.py`` uploads later.

A configured server that does not answer a short probe makes the run *fall back to offline* with a
warning rather than fail: a training run is worth more than its live dashboard, and the offline session
loses nothing (import it once the server is back). What cannot work offline -- enqueueing with
``CLEARML_QUEUE``, importing a session, fetching a model by id -- fails with a one-line UserError instead.

What a run reports to its task is in ``clearml_reports``; a clone's edits, read under an agent before the
processes start, in ``clone_edits``.
"""

import contextlib
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist

from vocseg import settings
from vocseg.clearml import agent_task_id
from vocseg.clearml.checkout import find_checkout
from vocseg.config import literal_constants
from vocseg.errors import UserError, one_line
from vocseg.runtime.ranks import from_rank_zero

PROJECT = "Pascal-VOC12 Training"
SECTION = "Config"  # hyperparameter section holding the config's constants
CONFIG_OBJECT = "config"  # configuration object holding the config file's text
TASK_FILE = "clearml_task_id"  # in the run folder: the task a rerun there continues
PROBE_TIMEOUT_S = 5.0
_SECRET_NAME = re.compile(r"key|token|passw|secret|credential", re.IGNORECASE)
_IMPORT_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "import_offline_session.py"
_REQUIREMENTS = Path(__file__).resolve().parents[3] / "requirements.txt"


def say(message: str) -> None:
    # The vocseg logger is configured only once train() has an output folder; this runs before.
    print(f"ClearML (vocseg): {message}", file=sys.stderr, flush=True)


def running_under_agent() -> bool:
    return agent_task_id() is not None


def enabled() -> bool:
    return bool(os.environ.get("CLEARML_OUTPUT_PATH")) or running_under_agent()


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters: the config's literal constants, and edits made to them in the UI turned into mutations.


def config_constants(config_path) -> dict:
    """Top-level ``name = literal`` numbers, strings and bools of a config, read without running it.

    Exactly the assignments py_config_runner's mutations can replace; secret-looking names are left out.
    """
    return {
        name: value
        for name, value in literal_constants(config_path).items()
        if isinstance(value, (bool, int, float, str)) and not _SECRET_NAME.search(name)
    }


def _cast(name: str, value, like):
    if isinstance(like, bool):
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError
    if isinstance(like, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value) if not isinstance(value, str) else int(value.strip())
    if isinstance(like, float):
        return float(value)
    return str(value)


def config_overrides(original: Mapping, edited: Mapping) -> dict:
    """The edited hyperparameters that differ from the config, cast back to the config's types.

    ClearML hands hyperparameters back as strings; a name the config does not define, or a value that
    does not parse as the original's type, is a UserError (one line).
    """
    overrides = {}
    for name, value in edited.items():
        if name not in original and name in settings.SETTINGS:
            # A setting recorded from CONFIG_OVERRIDES that the file does not set as a literal.
            cast = settings.parse_value(value) if isinstance(value, str) else value
            settings.check({name: cast}, f"hyperparameter {SECTION}/{name}")
            overrides[name] = cast
            continue
        if name not in original:
            raise UserError(
                f"hyperparameter {SECTION}/{name} is not a constant of the config (known: "
                f"{', '.join(sorted(original))}): remove it from the task"
            )
        like = original[name]
        try:
            cast = _cast(name, value, like)
        except (TypeError, ValueError):
            raise UserError(
                f"hyperparameter {SECTION}/{name}={value!r} is not a valid {type(like).__name__} "
                f"(config value {like!r}): fix it in the task"
            ) from None
        if cast != like or type(cast) is not type(like):
            overrides[name] = cast
    return overrides


# ---------------------------------------------------------------------------------------------------------
# Online / offline.


def _credentials_configured() -> bool:
    from clearml.backend_api.session.defs import ENV_ACCESS_KEY, ENV_AUTH_TOKEN
    from clearml.config import config_obj

    return bool(ENV_AUTH_TOKEN.get() or ENV_ACCESS_KEY.get() or config_obj.get("api.credentials.access_key", None))


def _api_host() -> str:
    from clearml.backend_api import Session

    return Session.get_api_server_host()


def probe_server(host: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the API server answers at all (any HTTP status), else why not.

    ClearML's own first request retries for minutes without a word; this bounds the wait.
    """
    try:
        urllib.request.urlopen(f"{host}/debug.ping", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None


def choose_offline(need_server: str | None = None) -> bool:
    """Decides, says and applies online vs offline (before Task.init). ``need_server`` names what cannot
    work offline (e.g. enqueueing): then an unusable server is a UserError instead of a fallback."""
    from ignite.handlers.clearml_logger import ClearMLLogger

    if running_under_agent():
        ClearMLLogger.set_bypass_mode(False)  # see below
        return False
    reason, offline = None, True
    if os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "CLEARML_OFFLINE_MODE is set"
    elif not _credentials_configured():
        reason = (
            "no ClearML server configured (no credentials in ~/clearml.conf, CLEARML_CONFIG_FILE or "
            "CLEARML_API_ACCESS_KEY/CLEARML_API_SECRET_KEY)"
        )
    else:
        host = _api_host()
        problem = probe_server(host)
        if problem is None:
            offline = False
        else:
            reason = f"ClearML server {host} did not answer a {PROBE_TIMEOUT_S:.0f} s probe ({problem})"
    if offline and need_server:
        raise UserError(
            f"{need_server} needs a reachable ClearML server, but {reason}: configure one "
            f"(see experiments/clearml/README.md)"
        )
    if offline:
        say(f"{reason}: tracking OFFLINE; the session zip and the command to import it are printed at the end")
    # Ignite calls offline mode "bypass" and turns it on whenever CI is set: this decision wins instead.
    ClearMLLogger.set_bypass_mode(offline)
    return offline


def _tune_sdk() -> None:
    from clearml.config import config, config_obj

    from vocseg.clearml.outage import sdk_retry_overrides

    config_obj.set_overrides(
        {
            "sdk": {
                "development": {
                    # The default subprocess event reporter makes Task.close() wait 7-10 s for its polling loop; a
                    # reporter thread ends at once and costs nothing noticeable per reported value.
                    "report_use_subprocess": False,
                    # Repository detection inside Task.init (well under a second here), so that the entry point set
                    # right after it is not overwritten by a background thread.
                    "vcs_repo_detect_async": False,
                }
            }
        },
        sdk_retry_overrides(),  # a server that stops answering must not stall the run
    )
    config.clear_config_impl()


# ---------------------------------------------------------------------------------------------------------
# The task.


def _entry_point(config_path, script_path, root: Path | None = None) -> dict:
    """What an agent runs again: ``python -m py_config_runner SCRIPT CONFIG`` from the same folder of its clone
    (the working directory relative to the checkout's root)."""
    cwd = Path.cwd().resolve()

    def rel(p):
        p = Path(p).resolve()
        return p.relative_to(cwd).as_posix() if p.is_relative_to(cwd) else p.as_posix()

    args = [rel(script_path)] if script_path else []
    working_dir = cwd.relative_to(root.resolve()).as_posix() if root and cwd.is_relative_to(root.resolve()) else "."
    return {"entry_point": " ".join(["-m py_config_runner", *args, rel(config_path)]), "working_dir": working_dir}


def task_to_continue(output_dir) -> str | None:
    """The task a rerun in ``output_dir`` continues (a requeued SLURM job, a restarted torchrun group, the same
    command again): the one recorded there, if the folder holds a training checkpoint of an unfinished run."""
    recorded = Path(output_dir) / TASK_FILE if output_dir else None
    if recorded is None or not recorded.is_file() or running_under_agent():
        return None
    if not any((recorded.parent / "checkpoints").glob("training_checkpoint_*.pt")):
        return None
    metrics = recorded.parent / "metrics.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(metrics.read_text()).get("completed"):
            return None
    return recorded.read_text().strip() or None


def task_name(config_path) -> str:
    """The task's name: the config's name, or its file name when that is shorter than the 3 characters the
    server requires of a task name (``v2`` -> ``v2.py``), so any config name can run online."""
    stem = Path(config_path).stem
    return stem if len(stem) >= 3 else f"{stem}.py"


def init_task(
    config_path,
    task_type: str = "training",
    script_path=None,
    need_server: str | None = None,
    continue_id: str | None = None,
):
    """Creates this process's ClearML task from a config *path* (the config is not evaluated), or continues
    task ``continue_id`` (online only).

    Records the config file (configuration object and artifact), the script, git state, installed packages
    and an entry point an agent can run. For evaluation scripts: ``init_task(config_path, "testing")``;
    call ``finish(task)`` at the end.
    """
    from clearml import Task

    _tune_sdk()
    offline = choose_offline(need_server)
    continue_id = None if offline else continue_id
    monitor, init_returned = _resource_monitor_after_init()
    try:
        task = Task.init(
            project_name=PROJECT,
            task_name=task_name(config_path),
            task_type=task_type,
            reuse_last_task_id=continue_id or False,
            # 0: report at the iterations given, never shifted past the task's last one (the SDK's default
            # when a task continues, under an agent too); a continued run reports its real iterations.
            continue_last_task=0,
            # Models are registered explicitly (best checkpoints only); scalars come from Ignite's handlers,
            # not a second time from TensorBoard.
            auto_connect_frameworks={"pytorch": False, "tensorboard": False, "tensorboardx": False},
            auto_resource_monitoring=monitor,
        )
    except Exception as exc:  # e.g. a server that answers but rejects the credentials
        raise UserError(
            f"ClearML could not create the task: {one_line(exc)}: check the server and credentials "
            f"(or unset CLEARML_OUTPUT_PATH to train untracked)"
        ) from None
    finally:
        init_returned.set()
    if continue_id and task.id == continue_id:
        say(f"continuing task {task.id}, recorded in the run folder: its curves go on at their own iterations")
    elif continue_id:
        say(
            f"task {continue_id}, recorded in the run folder, could not be continued on this server: the run "
            f"reports to a new task {task.id}"
        )
    if task.running_locally():
        _record_how_to_rerun(task, config_path, script_path)
    # Under an agent this hands back the (possibly edited) text; clone_edits has already applied it.
    task.connect_configuration(Path(config_path), name=CONFIG_OBJECT, description="the py_config_runner config file")
    task.upload_artifact("config", artifact_object=Path(config_path), wait_on_upload=False)
    if script_path:
        task.upload_artifact("script", artifact_object=Path(script_path), wait_on_upload=False)
    return task


def _record_how_to_rerun(task, config_path, script_path) -> None:
    # What make install installs: the pinned requirements and vocseg itself from the agent's clone
    # (ClearML's import scan sees only the module that called Task.init and finds clearml alone).
    if _REQUIREMENTS.is_file():
        task.set_packages([*_REQUIREMENTS.read_text().splitlines(), "-e ."])
    # ClearML derives the repository and entry point from the file that called Task.init: py_config_runner's
    # __main__ in site-packages, wherever the venv lives. Record the working directory's checkout (it holds
    # the script and the config) and the command line that was really run.
    found = find_checkout(Path.cwd())
    if found is None or not found.repository:
        say(
            f"{Path.cwd()} is {'not inside a git checkout' if found is None else 'a git checkout without a remote'}"
            f": the task records no repository, so clones of it cannot be run by an agent"
        )
    repo = (
        dict(repository=found.repository, branch=found.branch, commit=found.commit, diff=found.diff)
        if found
        else dict(repository="", branch="", commit="", diff="")
    )
    task.set_script(
        binary=f"python{sys.version_info.major}.{sys.version_info.minor}",
        **repo,
        **_entry_point(config_path, script_path, found and found.root),
    )


def finish(task) -> None:
    """Closes a task; offline, prints the session zip and the command that imports it into a server."""
    folder = task.get_offline_mode_folder() if task.is_offline() else None
    task.close()
    if folder:
        announce_offline_session(folder)


def _resource_monitor_after_init():
    """ClearML's resource monitor (machine, CPU and GPU graphs), as a class for ``Task.init`` whose thread starts
    its work once ``Task.init`` has returned (set the event returned with it). In ClearML 2.1.12 the monitor's
    first act, writing the machine's specs into the task, and Task.init's last, writing the run's, take the
    task's edit lock from two threads at once, and that lock is not safe across threads: 2 of the last 4 runs
    of the online suite's two-process clone hung there for good (rank 0 in Task.init, the other rank waiting
    for it). In a monitor subprocess (not this project's setting) the event is never set: it starts after
    two minutes then."""
    from clearml.utilities.resource_monitor import ResourceMonitor

    init_returned = threading.Event()

    class AfterInit(ResourceMonitor):
        def daemon(self):
            init_returned.wait(timeout=120.0)
            super().daemon()

    return AfterInit, init_returned


def end_as_stopped(task) -> None:
    """Has ClearML's exit hook mark ``task`` stopped when the process exits. Left to itself the hook marks a run
    that a signal stopped (it saved a checkpoint to continue from) failed when it exits non-zero (75, or 130 on
    Ctrl-C) and completed when it exits 0 (a requeue request file); its flag for a stop asked from the web UI
    gives the status such a run has. The SDK has no public way to set it."""
    hook = getattr(type(task), "_Task__exit_hook", None)
    if hook is not None:
        hook.remote_user_aborted = True


def announce_offline_session(folder) -> None:
    archive = Path(f"{folder}.zip")
    script = os.path.relpath(_IMPORT_SCRIPT) if _IMPORT_SCRIPT.exists() else "code/scripts/import_offline_session.py"
    say(f"offline session: {archive}\n  import it into a ClearML server later with:\n  python {script} {archive}")


def requested_queue(source) -> str | None:
    """The queue this run is to be sent to instead of training here (never under an agent)."""
    if running_under_agent():
        return None
    return source.setting("clearml_queue")


def set_docker(task, source) -> None:
    """``clearml_docker_image`` (config) or VOCSEG_DOCKER_IMAGE: the container an agent started with
    ``--docker`` runs this task (and its clones) in. DataLoader workers pass batches through shared memory,
    which Docker limits to 64 MB by default: hence ``--ipc=host`` unless other arguments are given."""
    image = source.setting("clearml_docker_image")
    if not image:
        return
    arguments = source.setting("clearml_docker_arguments")
    task.set_base_docker(docker_image=str(image), docker_arguments=str(arguments))
    say(f"agents started with --docker run this task in {image} ({arguments})")


def prepare(source, output_dir=None):
    """Rank 0's task of a tracked training run (None on the other ranks): a new one, or the one a rerun in
    ``output_dir`` continues. Enqueues the run instead, and exits, when a queue is requested. A clone's edits
    are already in ``config_path`` and the mutations (``clone_edits``, applied before the processes start)."""
    config_path, script_path = source.config_path, source.script_path
    queue = requested_queue(source)
    if queue and idist.get_world_size() > 1:
        raise UserError(
            f"CLEARML_QUEUE={queue} hands the run to an agent: start it as one process "
            "(python -m py_config_runner ...), not with torchrun"
        )
    made = {}

    def set_up():  # rank 0's; the task object stays in this process
        task = made["task"] = init_task(
            config_path,
            "training",
            script_path,
            need_server=queue and f"CLEARML_QUEUE={queue}",
            continue_id=None if queue else task_to_continue(output_dir),
        )
        if task.running_locally():
            # The overrides too, as Config/* values: a clone shows them and can edit them.
            task.connect({**config_constants(config_path), **source.overrides}, name=SECTION)
            set_docker(task, source)
            if not queue and output_dir:
                # What an earlier run in this folder could not deliver (its server did not answer at its end).
                from vocseg.clearml.pending import deliver_on_start

                deliver_on_start(output_dir, task, say)
            if queue:
                say(f"enqueueing the task in queue {queue!r}; this process exits")
                task.execute_remotely(queue_name=queue, exit_process=True)

    from_rank_zero("setting up its ClearML task", set_up)
    return made.get("task")


def unusable_server() -> tuple | None:
    """None when a ClearML server is configured and answers the short probe; else ``(None, "")`` when none is
    configured, or ``(host, why)`` when it does not answer; ``require_server`` words it as an error."""
    if not _credentials_configured():
        return None, ""
    host = _api_host()
    problem = probe_server(host)
    return (host, problem) if problem else None


def require_server(what: str) -> None:
    """A one-line UserError, starting with ``what`` needed it, unless a ClearML server is configured and answers
    a short probe."""
    unusable = unusable_server()
    if unusable and unusable[0] is None:
        raise UserError(
            f"{what} needs a ClearML server, and none is configured: run clearml-init or set "
            f"CLEARML_API_HOST/CLEARML_API_ACCESS_KEY/CLEARML_API_SECRET_KEY"
        )
    if unusable:
        raise UserError(
            f"{what} needs the ClearML server {unusable[0]}, which did not answer ({unusable[1]}): "
            f"start it or fix CLEARML_API_HOST"
        )


def fetch_model_weights(model_id: str) -> str:
    """The local copy of a ClearML model's weights file, or a one-line UserError saying why not."""
    what = f"weights_path {model_id} (a ClearML model id)"
    require_server(what)
    try:
        from clearml import InputModel

        local = InputModel(model_id=model_id).get_weights()
    except Exception as exc:
        raise UserError(f"{what} could not be fetched: {one_line(exc)}") from None
    if not local:
        raise UserError(f"{what}: the model has no downloadable weights file")
    return local
