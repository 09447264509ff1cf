"""Every setting a user can give a run, in one table, and the one rule that decides which source wins.

A setting comes from, highest first:

1. ``CONFIG_OVERRIDES`` (environment: ``"learning_rate=0.01 num_epochs=30"``), so that it reaches every
   process under python, torchrun, srun, sbatch and agents;
2. the setting's own environment variable, where it has one (``RUN_NAME``, ``DIST_TIMEOUT``, ...);
3. the config file, with a ClearML clone's edits applied (its ``Config/*`` values and configuration text);
4. the default below.

``docs/configs.md`` is generated from this module: ``python -m vocseg.settings > docs/configs.md``.
"""

import ast
import difflib
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vocseg.errors import UserError

OVERRIDES_VARIABLE = "CONFIG_OVERRIDES"


@dataclass(frozen=True)
class Setting:
    key: str
    accepts: str  # the allowed values, as errors and the docs word them
    check: Callable[[Any], bool]
    default: Any
    help: str
    env: str | None = None


def _integer(minimum):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _one_of(*choices):
    return lambda v: any(v == c and type(v) is type(c) for c in choices)


def _optional(check):
    return lambda v: v is None or check(v)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v):
    return _number(v) and v > 0


def _text(v):
    return isinstance(v, str) and v.strip() != ""


_BOOL = ("True or False", _one_of(True, False))
_NONE = None  # no default of its own: the config sets it, or the code does without

SETTINGS = {
    s.key: s
    for s in [
        # What the run computes on, and how many processes.
        Setting(
            "device",
            "'cpu', 'cuda' or 'cuda:N'",
            lambda v: isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda"),
            _NONE,
            "where the model runs (vocseg.runtime.device_plan); 'cuda' stops when no GPU is visible, 'cpu' hides CUDA",
        ),
        Setting(
            "nproc_per_node",
            "None or an integer >= 1",
            _optional(_integer(1)),
            _NONE,
            "processes a plain launch starts on this machine (default: one per visible GPU, 1 on CPU)",
            "NPROC_PER_NODE",
        ),
        Setting(
            "dist_timeout",
            "None or a number of seconds > 0",
            _optional(_positive),
            _NONE,
            "how long a rank waits for the others in a collective (default 120 s with gloo, 10 min with nccl)",
            "DIST_TIMEOUT",
        ),
        Setting(
            "amp",
            "'auto', 'bf16', 'fp16' or 'off'",
            _one_of("auto", "bf16", "fp16", "off"),
            "auto",
            "mixed precision: 'auto' is bf16 on compute capability 8.0+, fp16 below; on a CPU bf16 where it is native",
        ),
        Setting(
            "sync_bn",
            "None, True or False",
            _optional(_one_of(True, False)),
            _NONE,
            "SyncBatchNorm across GPU processes (None: on when several CUDA processes train)",
        ),
        Setting("cudnn_benchmark", *_BOOL, True, "let cuDNN pick the fastest kernels for the input sizes"),
        Setting("channels_last", *_BOOL, False, "channels-last memory format on CUDA"),
        Setting(
            "compile_model",
            "True, False or a dict of torch.compile keywords",
            lambda v: _one_of(True, False)(v) or isinstance(v, dict),
            False,
            "torch.compile the model",
        ),
        # Data.
        Setting(
            "seed",
            "an integer >= 0",
            _integer(0),
            0,
            "seeds the model's initialisation, the data order and the augmentations; read before the config runs",
        ),
        Setting(
            "batch_size",
            "an integer >= 1 (the total over all processes)",
            _integer(1),
            _NONE,
            "images per step over all processes (per micro-batch when accumulation_steps > 1)",
        ),
        Setting("num_workers", "an integer >= 0", _integer(0), _NONE, "DataLoader worker processes per rank"),
        Setting("crop_size", "an integer >= 1", _integer(1), _NONE, "side of the square training crops"),
        Setting("num_classes", "an integer >= 2", _integer(2), 21, "classes the model predicts (VOC: 21)"),
        # Schedule.
        Setting("num_epochs", "an integer >= 1", _integer(1), _NONE, "epochs to train (the recipes derive it)"),
        Setting(
            "num_iterations",
            "None or an integer >= 1",
            _optional(_integer(1)),
            _NONE,
            "optimiser steps of a recipe; the baseline configs derive num_epochs from it",
        ),
        Setting("learning_rate", "a number > 0", _positive, _NONE, "the optimiser's base learning rate"),
        Setting(
            "weight_decay", "a number >= 0", lambda v: _number(v) and v >= 0, _NONE, "the optimiser's weight decay"
        ),
        Setting(
            "accumulation_steps",
            "an integer >= 1",
            _integer(1),
            1,
            "micro-batches whose gradients are summed into one optimiser step",
        ),
        Setting(
            "val_interval",
            "an integer >= 1 (epochs between validations)",
            _integer(1),
            1,
            "validate every this many epochs, and after the last",
        ),
        Setting(
            "save_every_iters",
            "an integer >= 1 (iterations between checkpoints)",
            _integer(1),
            1000,
            "write a training checkpoint every this many iterations, and at the end",
        ),
        Setting("log_every_iters", "an integer >= 1", _integer(1), 10, "log the loss every this many iterations"),
        Setting(
            "es_patience",
            "None (no early stopping) or an integer >= 1",
            _optional(_integer(1)),
            _NONE,
            "stop after this many validations without a better val mIoU",
        ),
        # Where results go, and continuing.
        Setting(
            "run_name",
            "None or a non-empty string",
            _optional(_text),
            _NONE,
            "the run folder's name (default: the SLURM job, torchrun run or ClearML task, else a timestamp)",
            "RUN_NAME",
        ),
        Setting(
            "resume_from",
            "None or a path to a training checkpoint",
            _optional(_text),
            _NONE,
            "continue from this checkpoint (a rerun in the same run folder continues by itself)",
            "RESUME_FROM",
        ),
        Setting(
            "preflight",
            *_BOOL,
            False,
            "run a few iterations, one checkpoint and a short validation on every rank, print the projected wall time"
            " of the run and exit 0, writing nothing into the run folder",
        ),
        # Evaluation and inference.
        Setting(
            "weights_path",
            "None, a .pt file or a ClearML model id",
            _optional(_text),
            _NONE,
            "the weights an evaluation config scores",
            "WEIGHTS_PATH",
        ),
        Setting("tta_flip", *_BOOL, False, "average with the horizontally flipped image at test time"),
        Setting(
            "tta_scales",
            "a non-empty tuple of numbers > 0, e.g. (1.0,)",
            lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(map(_positive, v)),
            (1.0,),
            "scales averaged at test time",
        ),
        Setting("save_predictions", *_BOOL, False, "write colour PNG predictions next to the metrics"),
        # ClearML.
        Setting(
            "clearml_queue",
            "None or a queue name",
            _optional(_text),
            _NONE,
            "enqueue the run on this ClearML queue instead of training here",
            "CLEARML_QUEUE",
        ),
        Setting(
            "clearml_docker_image",
            "None or an image name",
            _optional(_text),
            _NONE,
            "the container an agent started with --docker runs the task in",
            "VOCSEG_DOCKER_IMAGE",
        ),
        Setting(
            "clearml_docker_arguments",
            "a string of docker run arguments",
            _text,
            "--ipc=host",
            "arguments of that container",
            "VOCSEG_DOCKER_ARGUMENTS",
        ),
    ]
}

# Variables that are not settings of a config: where things are, and switches of the machine.
ENVIRONMENT = {
    OVERRIDES_VARIABLE: "overrides of any setting above or any literal of the config: `key=value` pairs, "
    "Python literals (a bare word is a string)",
    "DATASET_PATH": "the folder that holds VOCdevkit/VOC2012",
    "SBD_DATASET_PATH": "the SBD folder (cls/, img/, train.txt) of the VOC+SBD configs",
    "OUTPUT_PATH": "where run folders go (default ./output) when ClearML is off",
    "CLEARML_OUTPUT_PATH": "switches ClearML tracking on, and moves run folders there",
    "CLEARML_OFFLINE_MODE": "1: track into an offline session even when a server is configured",
    "PRETRAINED_BACKBONE": "a local ImageNet ResNet weights file, instead of torchvision's download",
    "VOCSEG_CACHE_DIR": "where downloads and fetched datasets are kept",
    "VOCSEG_CPU_ALLOCATOR": "default: leave glibc's allocator alone in CPU runs",
}


def check(values: Mapping, where) -> None:
    """Raise a UserError for the first setting of ``values`` whose value the table does not allow."""
    for key, value in values.items():
        setting = SETTINGS.get(key)
        if setting is not None and not setting.check(value):
            raise UserError(f"{where}: {key} = {value!r} is not allowed: set {key} to {setting.accepts}")


def parse_value(text: str):
    """A Python literal, or the text itself when it is not one (a bare word: ``device=cpu``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def nearest(key: str, known) -> str | None:
    found = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return found[0] if found else None


def parse_overrides(text: str, config_names) -> dict:
    """``CONFIG_OVERRIDES`` as a dict, checked against the table and the config's top-level names."""
    try:
        items = shlex.split(text or "")
    except ValueError as exc:
        raise UserError(f"{OVERRIDES_VARIABLE}: {exc}: quote values as in a shell") from None
    known = set(SETTINGS) | set(config_names)
    overrides = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise UserError(f"{OVERRIDES_VARIABLE}: {item!r} is not key=value, e.g. num_epochs=30")
        if key not in known:
            near = nearest(key, known)
            hint = f"did you mean {near}?" if near else "see docs/configs.md for the settings"
            raise UserError(f"{OVERRIDES_VARIABLE}: unknown key {key!r}: {hint}")
        if key in overrides:  # the last would win silently: which one was meant is the user's to say
            first = next(i for i in items if i.partition("=")[0].strip() == key)
            raise UserError(f"{OVERRIDES_VARIABLE}: {key} is given twice ({first!r} and {item!r}): keep one")
        overrides[key] = parse_value(value)
    check(overrides, OVERRIDES_VARIABLE)
    return overrides


def _from_env(setting: Setting):
    text = os.environ.get(setting.env or "", "").strip()
    if not text:
        return None
    value = parse_value(text)
    if not setting.check(value) and setting.check(text):  # RUN_NAME=2024 is a name, not a number
        value = text
    if not setting.check(value):
        raise UserError(f"{setting.env}={text!r} is not allowed: set it to {setting.accepts}")
    return value


MISSING = object()  # no default given: the table's


def resolve(key: str, overrides: Mapping, edited_config: Mapping, default=MISSING):
    """The value of setting ``key`` before the config runs, by the rule above. ``edited_config``: the config's
    literal constants with a clone's edits applied."""
    if key in overrides:
        return overrides[key]
    setting = SETTINGS.get(key)
    from_env = _from_env(setting) if setting and setting.env else None
    if from_env is not None:
        return from_env
    if key in edited_config:
        return edited_config[key]
    if default is not MISSING:
        return default
    return setting.default if setting else None


def near_misses(names) -> list[str]:
    """Config names one or two letters away from a setting (``val_intervall``): a setting the run would ignore."""
    found = []
    for name in names:
        if name in SETTINGS:
            continue
        for key in SETTINGS:
            if name != key and abs(len(name) - len(key)) <= 2 and _distance(name, key) <= 2 and len(key) > 4:
                found.append(f"{name} (did you mean {key}?)")
                break
    return found


def _distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def markdown() -> str:
    """docs/configs.md."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated by `python -m vocseg.settings > docs/configs.md` from code/vocseg/settings.py; "
        "tests/test_settings.py fails when it is stale. -->",
        "",
        "Every setting a run reads. Set it in the config file, or without editing the config with",
        "`CONFIG_OVERRIDES` (environment, so it reaches every process under python, torchrun, srun, sbatch and",
        "ClearML agents); a setting with an environment variable can also be set there. Which source wins,",
        "highest first: `CONFIG_OVERRIDES`, the setting's environment variable, the config file (with a ClearML",
        "clone's edits), the default. `CONFIG_OVERRIDES` also overrides any other literal of the config",
        "(`learning_rate`, `output_stride`, ...); values are Python literals, a bare word is a string.",
        "",
        "```bash",
        'CONFIG_OVERRIDES="num_epochs=1 val_interval=1" \\',
        "    python -m py_config_runner code/scripts/training.py configs/train/quickstart_cpu.py",
        "```",
        "",
        "| setting | environment | accepts | default | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS.values():
        default = "" if s.default is None else f"`{s.default!r}`"
        lines.append(f"| `{s.key}` | {f'`{s.env}`' if s.env else ''} | {s.accepts} | {default} | {s.help} |")
    lines += ["", "## Other environment variables", "", "| variable | what it does |", "| --- | --- |"]
    lines += [f"| `{name}` | {text} |" for name, text in ENVIRONMENT.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
