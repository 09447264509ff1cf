"""Hyperparameter search with ClearML's HyperParameterOptimizer over the ``Config/*`` constants of a base task.

Each trial is a clone of the base training task with some constants edited, run by a ``clearml-agent`` that
serves the execution queue (the clone-override path of ``clearml_session``); the objective is the last
reported ``val``/``mIoU``, maximised. Everything the user can get wrong is checked before a trial is enqueued.

Ranges: ``loguniform:MIN:MAX``, ``uniform:MIN:MAX[:STEP]``, ``int:MIN:MAX[:STEP]``, ``choice:A,B,...`` (or,
in a space file, a Python list for a choice).
"""

import ast
import math
import re
import runpy
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from vocseg.clearml.session import PROJECT, SECTION, require_server, task_name
from vocseg.errors import UserError, one_line

OBJECTIVE = ("val", "mIoU")
STRATEGIES = ("random", "grid")  # optuna is not pinned in requirements.txt, so ClearML's own strategies only
_ID_CHARS = set("0123456789abcdef")


class Range(NamedTuple):
    name: str
    kind: str  # loguniform, uniform, int, choice
    values: tuple  # (min, max[, step]) or the choices


def _literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_range(name: str, spec, where: str) -> Range:
    """One range from its command-line text (or a list, from a space file)."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UserError(f"{where}: the choice for {name} is empty: list at least one value")
        return Range(name, "choice", tuple(spec))
    kind, _, rest = str(spec).partition(":")
    if kind == "choice" and rest.strip():
        return Range(name, "choice", tuple(_literal(v) for v in rest.split(",")))
    numbers = [_literal(v) for v in rest.split(":")] if rest else []
    usage = {"loguniform": "loguniform:MIN:MAX", "uniform": "uniform:MIN:MAX[:STEP]", "int": "int:MIN:MAX[:STEP]"}
    if (
        kind not in usage
        or not 2 <= len(numbers) <= (2 if kind == "loguniform" else 3)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
    ):
        raise UserError(f"{where}: range {name}={spec!r} is not one of {', '.join(usage.values())}, choice:A,B,...")
    if kind == "int" and not all(isinstance(v, int) for v in numbers):
        raise UserError(f"{where}: range {name}={spec!r} needs whole numbers; use uniform: for fractions")
    if numbers[0] >= numbers[1] or (kind == "loguniform" and numbers[0] <= 0):
        positive = " and MIN > 0" if kind == "loguniform" else ""
        raise UserError(f"{where}: range {name}={spec!r} needs MIN < MAX{positive}")
    return Range(name, kind, tuple(numbers))


def parse_ranges(params, space_file=None) -> list:
    """``--param NAME=RANGE`` texts and/or a Python file defining ``space = {name: range, ...}``."""
    ranges = []
    if space_file:
        path = Path(space_file)
        if not path.is_file():
            raise UserError(f"--space {path} does not exist")
        try:
            space = runpy.run_path(str(path)).get("space")
        except Exception as exc:
            raise UserError(f"--space {path} does not run: {one_line(exc)}") from None
        if not isinstance(space, Mapping) or not space:
            raise UserError(f"--space {path} must define space = {{'learning_rate': 'loguniform:1e-4:1e-1', ...}}")
        ranges += [parse_range(str(name), spec, f"--space {path}") for name, spec in space.items()]
    for text in params or ():
        name, sep, spec = text.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--param {text!r} must be NAME=RANGE, e.g. learning_rate=loguniform:1e-4:1e-1")
        ranges.append(parse_range(name.strip(), spec.strip(), f"--param {text}"))
    names = [r.name for r in ranges]
    if not ranges:
        raise UserError("no ranges to search: pass --param NAME=RANGE or --space FILE")
    if len(set(names)) != len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise UserError(f"{', '.join(twice)}: given two ranges; give each parameter one")
    return ranges


def _type_of(text: str) -> type:
    value = _literal(text)
    return type(value) if isinstance(value, (bool, int, float)) else str


def check_ranges(ranges, base_params: Mapping, base_name: str, strategy: str) -> None:
    """Every range names a Config constant of the base task and yields values of that constant's type."""
    for r in ranges:
        if r.name not in base_params:
            raise UserError(
                f"parameter {r.name} is not a {SECTION}/ hyperparameter of base task {base_name} "
                f"(it has: {', '.join(sorted(base_params))})"
            )
        like = _type_of(base_params[r.name])
        fits = {
            "loguniform": like is float,
            "uniform": like is float,
            "int": like in (int, float),
            "choice": all(_fits(v, like) for v in r.values),
        }[r.kind]
        if not fits:
            article = "an" if like is int else "a"
            raise UserError(
                f"range {r.name} ({r.kind} {list(r.values)}) gives values that are not {article} "
                f"{like.__name__}, the type of {SECTION}/{r.name}={base_params[r.name]} in the base task: "
                f"{'use int:MIN:MAX or choice:' if like is int else 'use choice: with such values'}"
            )
        if strategy == "grid" and r.kind in ("loguniform", "uniform") and len(r.values) < 3:
            raise UserError(f"range {r.name}: grid search needs a step (uniform:MIN:MAX:STEP) or a choice")


def _fits(value, like: type) -> bool:
    if like is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if like is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, like) if like is bool else True


def clearml_parameters(ranges) -> list:
    from clearml.automation import (
        DiscreteParameterRange,
        LogUniformParameterRange,
        UniformIntegerParameterRange,
        UniformParameterRange,
    )

    made = []
    for r in ranges:
        name = f"{SECTION}/{r.name}"
        step = r.values[2] if len(r.values) > 2 else None
        if r.kind == "loguniform":  # ClearML samples the exponent
            made.append(LogUniformParameterRange(name, math.log10(r.values[0]), math.log10(r.values[1]), base=10))
        elif r.kind == "uniform":
            made.append(UniformParameterRange(name, r.values[0], r.values[1], step_size=step))
        elif r.kind == "int":
            made.append(UniformIntegerParameterRange(name, r.values[0], r.values[1], step_size=step or 1))
        else:
            made.append(DiscreteParameterRange(name, values=list(r.values)))
    return made


def find_base_task(ref: str):
    """The base training task: a task id, or the newest completed training task of that config name."""
    from clearml import Task

    ref = ref.strip()
    if len(ref) == 32 and set(ref) <= _ID_CHARS:
        try:
            return Task.get_task(task_id=ref)
        except Exception as exc:
            raise UserError(f"base task {ref}: no such task on the server ({one_line(exc)})") from None
    name = task_name(ref.removesuffix(".py"))  # a config name as given, or the name a short one's task gets
    tasks = [
        t
        for t in Task.get_tasks(
            project_name=PROJECT,
            task_name=f"^{re.escape(name)}$",
            task_filter={"status": ["completed"], "order_by": ["-last_update"], "type": ["training"]},
        )
        if t.name == name
    ]
    if not tasks:
        raise UserError(
            f"base task {ref}: no completed training task of that name in project {PROJECT!r}: train the "
            f"config once with CLEARML_OUTPUT_PATH set, or pass a task id"
        )
    return tasks[0]


def check_queue(queue: str) -> None:
    from clearml.backend_api.session.client import APIClient

    if not queue.strip():
        raise UserError("--queue is empty: name the queue a clearml-agent serves")
    if not [q for q in APIClient().queues.get_all(name=f"^{queue}$") if q.name == queue]:
        raise UserError(
            f"--queue {queue}: no such queue on the server: start an agent with "
            f"clearml-agent daemon --queue {queue} --create-queue"
        )


class Budget(NamedTuple):
    trials: int
    concurrent: int
    time_limit_min: float | None
    poll_s: float


def _say(message: str) -> None:
    print(f"hpo: {message}", flush=True)


def _trial_done(job_id, objective_value, objective_iteration, job_parameters, top_performance_job_id) -> None:
    edited = ", ".join(
        f"{k.split('/', 1)[-1]}={v}" for k, v in sorted(job_parameters.items()) if k.startswith(f"{SECTION}/")
    )
    # ClearML hands a list (one value per objective) to this callback.
    value = objective_value[0] if isinstance(objective_value, (list, tuple)) else objective_value
    _say(f"trial {job_id} completed: val mIoU {value:.4f} with {edited} (best so far: {top_performance_job_id})")


def _best(optimizer, parameters) -> dict | None:
    top = optimizer.get_top_experiments_details(top_k=1, only_completed=True)
    if not top:
        return None
    (value,) = [m["value"] for m in top[0]["metrics"].values() if (m["metric"], m["variant"]) == OBJECTIVE]
    wanted = {p.name for p in parameters}
    return {
        "task_id": top[0]["task_id"],
        "val_mIoU": value,
        "parameters": {k.split("/", 1)[1]: v for k, v in top[0]["hyper_parameters"].items() if k in wanted},
    }


def search(base_ref: str, ranges, queue: str, strategy: str, budget: Budget) -> dict:
    """Runs the search to the end of its budget; returns (and records on the optimiser task) the best trial."""
    from clearml import Task
    from clearml.automation import GridSearch, HyperParameterOptimizer, RandomSearch

    from vocseg.clearml.session import _tune_sdk

    if not queue.strip():
        raise UserError("--queue is empty: name the queue a clearml-agent serves")
    require_server("the hyperparameter search")
    base = find_base_task(base_ref)
    check_ranges(ranges, base.get_parameters_as_dict().get(SECTION, {}), f"{base.name} ({base.id})", strategy)
    check_queue(queue)
    _tune_sdk()
    task = Task.init(
        project_name=PROJECT,
        task_name=f"HPO {base.name}",
        task_type=Task.TaskTypes.optimizer,
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
    )
    parameters = clearml_parameters(ranges)
    optimizer = HyperParameterOptimizer(
        base_task_id=base.id,
        hyper_parameters=parameters,
        objective_metric_title=OBJECTIVE[0],
        objective_metric_series=OBJECTIVE[1],
        objective_metric_sign="max",
        optimizer_class={"random": RandomSearch, "grid": GridSearch}[strategy],
        execution_queue=queue,
        max_number_of_concurrent_tasks=budget.concurrent,
        total_max_jobs=budget.trials,
        optimization_time_limit=budget.time_limit_min,
        pool_period_min=budget.poll_s / 60,
        auto_connect_task=task,
    )
    optimizer.set_report_period(budget.poll_s / 60)
    _say(
        f"optimiser task {task.id}: {budget.trials} trials of base task {base.name} ({base.id}), "
        f"{budget.concurrent} at a time, {strategy} search, queue {queue!r}"
    )
    optimizer.start(job_complete_callback=_trial_done)
    optimizer.wait()
    best = _best(optimizer, parameters)
    optimizer.stop()
    trials = Task.get_tasks(task_filter={"parent": task.id, "status": ["completed", "failed", "stopped"]})
    summary = {
        "optimizer_task_id": task.id,
        "base_task_id": base.id,
        "best": best,
        "trials": {t.id: t.get_status() for t in trials},
    }
    task.upload_artifact("best_trial", artifact_object=summary, wait_on_upload=True)
    if best:
        task.get_logger().report_single_value("best val mIoU", best["val_mIoU"])
    task.close()
    return summary
