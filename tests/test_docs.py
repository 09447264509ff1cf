"""Every shell block of README.md and docs/*.md runs as written, or carries a marker saying why it cannot run here.

A block is a fence opened with ```bash, ```sh, ```shell or ```console (of a console block, the lines after a
``$ `` prompt). The blocks of one page run in order in one bash shell (``set -eo pipefail``: a command that fails
fails the test), so a block may use what an earlier block of its page exported or wrote. Each page runs in its
own copy of the repository (the .venv linked, not copied) with:

- HOME a fresh folder, holding synthetic VOC2012 + SBD data in ``$HOME/data`` (the folder the docs download to);
  ``DATASET_PATH``/``SBD_DATASET_PATH`` point at it; no ClearML configuration, so tracked runs go offline;
- ``PRETRAINED_BACKBONE`` a randomly initialised ResNet-101 checkpoint (nothing is downloaded);
- ``CONFIG_OVERRIDES`` set to ``TINY``, and a ``python`` first on PATH that appends ``TINY`` to any
  ``CONFIG_OVERRIDES`` a block gives, so the ResNet-101 recipes train for seconds on the CPU.

A block that cannot run here has, on the line just above its fence::

    <!-- not run by tests/test_docs.py: REASON -->

A block that needs several SLURM nodes is run instead by tests/slurm/test_docs_nodes.py (``make test-slurm``, on a
two-node cluster of CPU nodes), with the substitutions that module lists; it has, on the line just above its fence::

    <!-- run by tests/slurm/test_docs_nodes.py on two SLURM nodes: WHAT -->

test_every_block_is_run_or_marked lists the blocks not run here with their reasons or the module that runs them
(``pytest -rA -s`` shows the list), and checks that module takes each of its blocks.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(bash|sh|shell|console)\s*$")  # indented inside a list item too
MARKER = re.compile(r"^<!-- not run by tests/test_docs\.py: (.*?) -->$")
# A block run on two SLURM nodes by the module it names (make test-slurm), not here.
ELSEWHERE = re.compile(r"^<!-- run by (tests/slurm/\w+\.py) on two SLURM nodes: (.*?) -->$")
COVERED = re.compile(r"covered by (tests/[\w/]+\.py)::(\w+)")
# Settings that make every config of this repository train and score for seconds on the CPU.
TINY = "device=cpu num_epochs=1 batch_size=2 crop_size=64 num_workers=0"
# Variables of the developer's shell that would change what the documented commands do.
CLEARED = ("CLEARML_", "TRAINS_", "SLURM_", "TORCHELASTIC_", "VOCSEG_DOCKER_")
CLEARED_NAMES = {
    "OUTPUT_PATH",
    "RUN_NAME",
    "RESUME_FROM",
    "WEIGHTS_PATH",
    "CONFIG_OVERRIDES",
    "NPROC_PER_NODE",
    "DIST_TIMEOUT",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
}
PAGE_TIMEOUT_S = 420


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    text: str
    reason: str | None  # why it is not run; None: it is run (here, or by ``elsewhere``)
    elsewhere: str | None = None  # the test module that runs it instead of this one (a path from the root)

    def __str__(self):
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.relative_to(REPO)}:{i + 1}: the shell block is never closed"
        body = textwrap.dedent("\n".join(lines[i + 1 : end])).splitlines()
        if fence.group(1) == "console":
            body = [line[2:] for line in body if line.startswith("$ ")]
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker, elsewhere = MARKER.match(above.strip()), ELSEWHERE.match(above.strip())
        reason = marker.group(1).strip() if marker else None
        found.append(Block(page, i + 1, "\n".join(body), reason, elsewhere.group(1) if elsewhere else None))
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def test_every_block_is_run_or_marked():
    every = all_blocks()
    assert every, "no shell block found in README.md and docs/*.md"
    marked = [b for b in every if b.reason is not None]
    elsewhere = [b for b in every if b.elsewhere is not None]
    print(
        f"\n{len(every) - len(marked) - len(elsewhere)} shell blocks run here, {len(elsewhere)} elsewhere, "
        f"{len(marked)} marked as not run:"
    )
    for block in elsewhere:
        print(f"  {block}: run by {block.elsewhere}")
    for block in marked:
        print(f"  {block}: {block.reason}")
    # A block run elsewhere must be one that module takes and can turn into its command.
    for module_path in sorted({b.elsewhere for b in elsewhere}):
        path = REPO / module_path
        assert path.is_file(), f"{module_path}: named by a marker, but there is no such file"
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        taken = {str(b) for b in module.BLOCKS}
        for block in (b for b in elsewhere if b.elsewhere == module_path):
            assert str(block) in taken, f"{block}: marked as run by {module_path}, which does not take it"
            module.script(block, port=29400)  # fails on a block its substitutions do not fit
    for block in marked:
        assert block.reason, f"{block}: the marker gives no reason"
        covered = COVERED.search(block.reason)
        if block.reason.startswith("long run"):
            assert covered, f"{block}: a long run must name the test that covers it (covered by tests/X.py::name)"
        if covered:
            path, name = REPO / covered.group(1), covered.group(2)
            assert path.is_file() and re.search(rf"^def {name}\(", path.read_text(), re.M), (
                f"{block}: {covered.group(0)} names no existing test"
            )
    # A marker must sit just above a shell block, or it silently marks nothing.
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if MARKER.match(line.strip()) or ELSEWHERE.match(line.strip()):
                following = next((x for x in lines[n + 1 :] if x.strip()), "")
                assert FENCE.match(following), f"{page.relative_to(REPO)}:{n + 1}: marker not above a shell block"


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    import torch
    from torchvision.models import resnet101

    path = tmp_path_factory.mktemp("backbone") / "resnet101.pth"
    torch.save(resnet101().state_dict(), path)
    return path


def _venv(venv: Path) -> None:
    """``venv``: the running venv's files, linked, except ``python``/``python3`` (the venv's interpreter with
    ``TINY`` appended to ``CONFIG_OVERRIDES``) and ``activate`` (which puts this ``bin`` first on PATH)."""
    real = Path(sys.prefix)
    (venv / "bin").mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "bin":
            (venv / entry.name).symlink_to(entry)
    # A key given twice in CONFIG_OVERRIDES is refused: the block's own values of TINY's keys make way for TINY's.
    keys = "|".join(item.split("=")[0] for item in TINY.split())
    merged = (
        'kept=""\nfor item in $CONFIG_OVERRIDES; do\n'
        f'    case "${{item%%=*}}" in {keys}) ;; *) kept="$kept $item" ;; esac\n'
        f'done\nexport CONFIG_OVERRIDES="${{kept# }}${{kept:+ }}{TINY}"'
    )
    shim = f'#!/bin/sh\n{merged}\nexec {real}/bin/python "$@"\n'
    for entry in (real / "bin").iterdir():
        made = venv / "bin" / entry.name
        if entry.name in ("python", "python3"):
            made.write_text(shim)
            made.chmod(0o755)
        elif entry.name == "activate":
            made.write_text(entry.read_text().replace(str(real), str(venv)))
        else:
            made.symlink_to(entry)


def _sandbox(tmp_path: Path, backbone_file: Path) -> tuple[Path, dict]:
    """A copy of the repository and the environment the page's blocks run in."""
    from vocseg.data.synthetic import make_synthetic_voc

    repo = tmp_path / "repo"
    ignored = shutil.ignore_patterns(".git", ".venv", "output", "data", "__pycache__", "*.egg-info", ".*_cache")
    shutil.copytree(REPO, repo, ignore=ignored)
    _venv(repo / ".venv")
    home = tmp_path / "home"
    make_synthetic_voc(home / "data", 8, 4, size=(64, 64), seed=0, n_test=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED) and k not in CLEARED_NAMES}
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join([str(repo / ".venv" / "bin"), env.get("PATH", "/usr/bin:/bin")]),
        DATASET_PATH=str(home / "data"),
        SBD_DATASET_PATH=str(home / "data" / "SBD"),
        PRETRAINED_BACKBONE=str(backbone_file),
        CONFIG_OVERRIDES=TINY,
        CLEARML_OFFLINE_MODE="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return repo, env


def runs_here(block: Block) -> bool:
    return block.reason is None and block.elsewhere is None


RUN = [page for page in PAGES if any(runs_here(b) for b in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN, ids=[str(p.relative_to(REPO)) for p in RUN])
def test_page_commands_run_as_written(page, tmp_path, backbone_file):
    repo, env = _sandbox(tmp_path, backbone_file)
    if any(runs_here(b) and "make demo" in b.text for b in blocks(page)):
        from vocseg.data.synthetic import make_synthetic_voc

        # make demo's own data, small: its target then exists, so the demo trains on 8 images instead of 200.
        make_synthetic_voc(repo / "data" / "synthetic", 8, 4, size=(64, 64), seed=0, n_test=3)
    script = ["set -eo pipefail"]
    for block in blocks(page):
        if runs_here(block):
            script += [f"echo '>>> block {block}' >&2", block.text]
    started = time.monotonic()
    # A session of its own, so that whatever the blocks leave running (or run past the timeout) is killed with it.
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{page.name}: over {PAGE_TIMEOUT_S} s; stderr ends:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"{page.relative_to(REPO)}: {time.monotonic() - started:.1f} s")
    if proc.returncode != 0:
        last = [line for line in err.splitlines() if line.startswith(">>> block ")]
        pytest.fail(
            f"{last[-1][4:] if last else page.name} failed (exit {proc.returncode}); stdout ends:\n"
            f"{out[-2000:]}\nstderr ends:\n{err[-4000:]}"
        )
