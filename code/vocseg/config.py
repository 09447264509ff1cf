"""Config files: where a run's config and script are, their literal constants, and loading them with errors
that name the file and line. The only module that knows py_config_runner's internals."""

import ast
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from py_config_runner import ConfigObject, InferenceConfigSchema, TrainvalConfigSchema
from pydantic import ValidationError

from vocseg.errors import UserError


class ConfigSource(NamedTuple):
    """What a run was asked to do, known before anything in the config is evaluated."""

    config_path: Path
    script_path: Path | None
    mutations: dict


def config_source(config: ConfigObject) -> ConfigSource:
    """The paths and mutations py_config_runner hands a script, read without loading the config.

    py_config_runner 0.3.2 keeps them in private attributes (its mutations as AST nodes);
    tests/test_config.py fails if an upgrade moves them.
    """
    given = config.__dict__["__internal_config_object_data_dict__"]
    mutations = config.__dict__["_mutations"] or {}
    script = given.get("script_filepath")
    return ConfigSource(
        Path(given["config_filepath"]),
        Path(script) if script else None,
        {name: ast.literal_eval(node) for name, node in mutations.items()},
    )


def load_config(path, mutations: Mapping | None = None) -> ConfigObject:
    """Evaluates the config now (py_config_runner is lazy) so that its errors surface here, clearly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    config = ConfigObject(path, mutations=dict(mutations) if mutations else None)
    try:
        len(config)  # forces the load
    except SyntaxError as exc:
        raise UserError(f"syntax error in config {path}, line {exc.lineno}: {exc.msg}") from None
    except UserError:
        raise
    except Exception as exc:
        # The innermost frame inside the config file tells the user where to look.
        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).name in (path.name, "<string>")
        ]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise UserError(f"config {path}{where} failed: {type(exc).__name__}: {exc}") from exc
    config["config_filepath"] = path
    return config


def _check(config: ConfigObject, schema, path) -> None:
    try:
        schema.validate(config)
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
        wrong = [f"{'.'.join(map(str, e['loc']))} ({e['msg']})" for e in exc.errors() if e["type"] != "missing"]
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if wrong:
            parts.append("invalid keys: " + "; ".join(wrong))
        raise UserError(f"config {path}: {'; '.join(parts)}: define them in the config file") from None


def check_trainval(config: ConfigObject) -> None:
    _check(config, TrainvalConfigSchema, config["config_filepath"])


def check_inference(config: ConfigObject) -> None:
    _check(config, InferenceConfigSchema, config["config_filepath"])


def env_path(name: str, default=None):
    """An optional path from the environment (empty string counts as unset)."""
    value = os.environ.get(name, "")
    return value if value else default


def literal_constants(path) -> dict:
    """The config's top-level ``name = literal`` assignments, read without running it: exactly what
    py_config_runner's mutations can replace."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except SyntaxError as exc:
        raise UserError(f"syntax error in config {path}, line {exc.lineno}: {exc.msg}") from None
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return constants


def peek_constant(path, name: str, mutations: Mapping | None = None, default=None):
    """A top-level constant of a config, read without running it (the seed must be set before the
    config builds its model)."""
    if mutations and name in mutations:
        return mutations[name]
    return literal_constants(path).get(name, default)


def _integer(minimum):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _one_of(*choices):
    return lambda v: any(v == c and type(v) is type(c) for c in choices)


def _optional(check):
    return lambda v: v is None or check(v)


def _positive_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# Run-control keys -> (check, the allowed values as the error states them). Checked on the literal constants
# before the config runs (a bad seed or batch_size fails before any model or dataset is built) and again on
# the loaded config (values computed in the file). A key the config does not define keeps its default.
RUN_CONTROLS = {
    "seed": (_integer(0), "an integer >= 0"),
    "num_epochs": (_integer(1), "an integer >= 1"),
    "batch_size": (_integer(1), "an integer >= 1 (the total over all processes)"),
    "accumulation_steps": (_integer(1), "an integer >= 1"),
    "val_interval": (_integer(1), "an integer >= 1 (epochs between validations)"),
    "save_every_iters": (_integer(1), "an integer >= 1 (iterations between checkpoints)"),
    "log_every_iters": (_integer(1), "an integer >= 1"),
    "es_patience": (_optional(_integer(1)), "None (no early stopping) or an integer >= 1"),
    "num_workers": (_integer(0), "an integer >= 0"),
    "crop_size": (_integer(1), "an integer >= 1"),
    "num_classes": (_integer(2), "an integer >= 2"),
    "amp": (_one_of("auto", "bf16", "fp16", "off"), "'auto', 'bf16', 'fp16' or 'off'"),
    "sync_bn": (_one_of(True, False), "True or False"),
    "cudnn_benchmark": (_one_of(True, False), "True or False"),
    "channels_last": (_one_of(True, False), "True or False"),
    "compile_model": (
        lambda v: _one_of(True, False)(v) or isinstance(v, dict),
        "True, False or a dict of torch.compile keywords",
    ),
    "dist_timeout": (_optional(_positive_number), "None or a number of seconds > 0"),
    "tta_flip": (_one_of(True, False), "True or False"),
    "save_predictions": (_one_of(True, False), "True or False"),
    "tta_scales": (
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(map(_positive_number, v)),
        "a non-empty tuple of numbers > 0, e.g. (1.0,)",
    ),
}


def check_run_controls(values: Mapping, path) -> None:
    """Raise a UserError for the first run-control key of ``values`` whose value is not allowed."""
    for key, (allowed, description) in RUN_CONTROLS.items():
        if key in values and not allowed(values[key]):
            raise UserError(f"config {path}: {key} = {values[key]!r} is not allowed: set {key} to {description}")


def check_constants(path, mutations: Mapping | None = None) -> None:
    """The run controls written as literals in the config file (or given as mutations), before it runs."""
    check_run_controls({**literal_constants(path), **(mutations or {})}, path)


def check_loaded(config: ConfigObject, path) -> None:
    check_run_controls({key: config[key] for key in RUN_CONTROLS if key in config}, path)


def check_seed(config: ConfigObject, peeked) -> None:
    """The seed was read from the file's text before the config ran (to seed the model it builds): the
    config must end up with that same value."""
    actual = config.get("seed")
    try:
        same = int(actual) == int(peeked)
    except (TypeError, ValueError):
        same = False
    if not same:
        raise UserError(
            f"config {config['config_filepath']}: seed is read before the config runs and gave "
            f"{peeked!r}, but the config sets {actual!r}: write it as a literal, e.g. seed = 12"
        )
