"""Search ranges for code/scripts/hpo.py: parsing and checking against a base task's Config constants (no server:
the parts that run on the server are in tests/server/test_hpo_online.py)."""

import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from vocseg.clearml import search as hs
from vocseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"learning_rate": "0.01", "batch_size": "4", "num_epochs": "2", "amp": "off", "sync_bn": "False"}


def test_ranges_from_the_command_line_and_a_space_file(tmp_path):
    space = tmp_path / "space.py"
    space.write_text("space = {'batch_size': [4, 8], 'num_epochs': 'int:1:3'}\n")
    ranges = hs.parse_ranges(["learning_rate=loguniform:1e-4:1e-1", "amp=choice:off,bf16"], space)
    assert {r.name: (r.kind, r.values) for r in ranges} == {
        "batch_size": ("choice", (4, 8)),
        "num_epochs": ("int", (1, 3)),
        "learning_rate": ("loguniform", (1e-4, 1e-1)),
        "amp": ("choice", ("off", "bf16")),
    }
    hs.check_ranges(ranges, BASE, "base", "random")
    made = {p.name: p for p in hs.clearml_parameters(ranges)}
    lr = made["Config/learning_rate"]  # ClearML samples log10 exponents
    assert (lr.min_value, lr.max_value) == (pytest.approx(-4), pytest.approx(-1))
    assert all(1e-4 <= lr.get_value()["Config/learning_rate"] <= 1e-1 for _ in range(50))
    assert made["Config/batch_size"].values == [4, 8]


@pytest.mark.parametrize(
    "param, message",
    [
        ("learning_rate", "must be NAME=RANGE"),
        ("learning_rate=normal:0:1", "is not one of loguniform:MIN:MAX"),
        ("learning_rate=loguniform:0:1", "needs MIN < MAX and MIN > 0"),
        ("learning_rate=uniform:0.1:0.01", "needs MIN < MAX"),
        ("batch_size=int:2:8.5", "needs whole numbers"),
        ("learning_rate=loguniform:a:b", "is not one of"),
    ],
)
def test_malformed_ranges_are_one_line_errors(param, message):
    with pytest.raises(UserError, match=message):
        hs.parse_ranges([param])


@pytest.mark.parametrize(
    "param, message",
    [
        ("momentum=uniform:0.5:0.9", "momentum is not a Config/ hyperparameter of base task base"),
        ("batch_size=loguniform:1:64", "not an int, the type of Config/batch_size=4 in the base task: use int:MIN:MAX"),
        ("batch_size=choice:4,8.5", "not an int"),
        ("learning_rate=choice:fast,slow", "not a float"),
        ("sync_bn=choice:1,0", "not a bool"),
    ],
)
def test_ranges_that_do_not_fit_the_base_task(param, message):
    with pytest.raises(UserError, match=message):
        hs.check_ranges(hs.parse_ranges([param]), BASE, "base", "random")


def test_grid_search_needs_steps():
    with pytest.raises(UserError, match="grid search needs a step"):
        hs.check_ranges(hs.parse_ranges(["learning_rate=uniform:0.01:0.1"]), BASE, "base", "grid")
    hs.check_ranges(hs.parse_ranges(["learning_rate=uniform:0.01:0.1:0.03"]), BASE, "base", "grid")
    assert math.isclose(
        hs.clearml_parameters(hs.parse_ranges(["learning_rate=uniform:0.01:0.1:0.03"]))[0].step_size, 0.03
    )


def test_script_prints_one_line_before_contacting_any_server(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "code" / "scripts" / "hpo.py"))["main"]
    for args, message in (
        (["--param", "learning_rate=choice:1", "--queue", ""], "--queue is empty"),
        (["--trials", "0"], "--trials 0 --concurrent 1: both must be at least 1"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["tiny_clearml", "--queue", "q1", *args])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    # The real thing once: a process, no server configured, one line.
    proc = subprocess.run(
        [
            sys.executable,
            "code/scripts/hpo.py",
            "tiny_clearml",
            "--queue",
            "q1",
            "--param",
            "learning_rate=loguniform:1:0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "needs MIN < MAX" in lines[0]
