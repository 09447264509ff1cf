"""The git checkout a run starts from: what an agent needs to clone to run the same thing again.

ClearML derives the repository from the file that called ``Task.init``; under ``python -m py_config_runner``
that is py_config_runner's ``__main__`` in site-packages, so a venv or conda env outside the checkout gives
no repository (or the one holding the venv). The run's working directory holds the script and the config:
its checkout is the one to record.
"""

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Checkout:
    root: Path
    repository: str  # the remote an agent clones ("" when the checkout has none)
    branch: str
    commit: str
    diff: str  # uncommitted changes to tracked files and new untracked (not ignored) files, against commit


def _git(folder, *args, env=None) -> str:
    return subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True, text=True).stdout


def _remote(root: Path, branch: str) -> str:
    """The branch's upstream remote, else ``origin``, else the first remote; "" when there is none."""
    names = _git(root, "remote").split()
    upstream = subprocess.run(
        ["git", "config", f"branch.{branch}.remote"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    for name in [upstream, "origin", *names]:
        if name in names:
            url = _git(root, "remote", "get-url", name).strip()
            # A remote that is a local path is recorded absolute, so an agent on this host can clone it.
            local = root / url
            return str(local.resolve()) if local.exists() else url
    return ""


def _diff(root: Path) -> str:
    # A throwaway index: untracked files show as additions, and the user's own index is left alone.
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", "HEAD", env=env)
        _git(root, "add", "-A", ".", env=env)
        return _git(root, "diff", "--cached", "--binary", "HEAD", env=env)


def find_checkout(folder=".") -> Checkout | None:
    """The git checkout holding ``folder`` with at least one commit, or None (not a checkout, no git)."""
    try:
        root = Path(_git(folder, "rev-parse", "--show-toplevel").strip())
        commit = _git(root, "rev-parse", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    branch = subprocess.run(
        ["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()  # "" on a detached HEAD
    return Checkout(root=root, repository=_remote(root, branch), branch=branch, commit=commit, diff=_diff(root))
