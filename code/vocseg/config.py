"""Config files: where a run's config and script are, their literal constants, and loading them with errors
that name the file and line. The only module that knows py_config_runner's internals."""

import ast
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from py_config_runner import ConfigObject, InferenceConfigSchema, TrainvalConfigSchema
from pydantic import ValidationError

from vocseg import settings
from vocseg.errors import UserError


class ConfigSource(NamedTuple):
    """What a run was asked to do, known before anything in the config is evaluated."""

    config_path: Path
    script_path: Path | None
    mutations: dict  # py_config_runner's, then a ClearML clone's edits
    overrides: dict = {}  # CONFIG_OVERRIDES

    def setting(self, key: str, default=settings.MISSING):
        """A setting's value before the config runs, by the rule of vocseg.settings."""
        edited = {**literal_constants(self.config_path), **self.mutations}
        return settings.resolve(key, self.overrides, edited, default)

    def all_mutations(self) -> dict:
        """What loading the config changes in it: the clone's edits, then the overrides."""
        return {**self.mutations, **self.overrides}


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


def with_overrides(source: ConfigSource) -> ConfigSource:
    """``source`` with ``CONFIG_OVERRIDES`` parsed and checked against the settings and the config's names."""
    path = source.config_path
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        names = assigned_names(path)
    except SyntaxError as exc:
        raise UserError(f"syntax error in config {path}, line {exc.lineno}: {exc.msg}") from None
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        for miss in settings.near_misses(names):
            print(f"vocseg: warning: config {path} sets {miss}: no code reads it", file=sys.stderr, flush=True)
    overrides = settings.parse_overrides(os.environ.get(settings.OVERRIDES_VARIABLE, ""), names)
    literals = literal_constants(path)
    for key, value in overrides.items():
        like = literals.get(key)
        if key not in settings.SETTINGS and like is not None and not _same_kind(value, like):
            raise UserError(
                f"{settings.OVERRIDES_VARIABLE}: {key}={value!r} is a {type(value).__name__}, but {path} sets "
                f"{key} = {like!r}: give a {type(like).__name__}"
            )
    return source._replace(overrides=overrides)


def _same_kind(value, like) -> bool:
    numbers = (int, float)
    if isinstance(like, bool) or isinstance(value, bool):
        return type(value) is type(like)
    return type(value) is type(like) or (isinstance(value, numbers) and isinstance(like, numbers))


def load_config(path, mutations: Mapping | None = None) -> ConfigObject:
    """Evaluates the config now (py_config_runner is lazy) so that its errors surface here, clearly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    mutations = dict(mutations or {})
    # py_config_runner replaces only assignments the file has; a setting it lacks is set after the load.
    names = assigned_names(path) if mutations else set()
    extra = {key: mutations.pop(key) for key in list(mutations) if key not in names}
    config = ConfigObject(path, mutations=mutations or None)
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
    for key, value in extra.items():
        config[key] = value
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


def assigned_names(path) -> set:
    """The config's top-level single-name assignments, literal or not: what a py_config_runner mutation can
    replace."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    return {
        node.targets[0].id
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }


def check_run_controls(values: Mapping, path) -> None:
    """Raise a UserError for the first setting of ``values`` whose value is not allowed (vocseg.settings)."""
    settings.check(values, f"config {path}")


def check_constants(path, mutations: Mapping | None = None) -> None:
    """The run controls written as literals in the config file (or given as mutations), before it runs."""
    check_run_controls({**literal_constants(path), **(mutations or {})}, path)


def check_loaded(config: ConfigObject, path) -> None:
    check_run_controls({key: config[key] for key in settings.SETTINGS if key in config}, path)


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
