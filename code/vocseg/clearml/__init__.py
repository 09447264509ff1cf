"""Everything that talks to ClearML: the task, a clone's edits, reports, checkpoints and datasets on the server,
hyperparameter search. The SDK is imported inside these modules' functions, so a run without ClearML never loads it."""

import os


def agent_task_id() -> str | None:
    """The task clearml-agent runs in this process (TRAINS_TASK_ID: older agents), or None; read from the agent's
    environment so that deciding costs no import of the SDK."""
    return os.environ.get("CLEARML_TASK_ID") or os.environ.get("TRAINS_TASK_ID") or None
