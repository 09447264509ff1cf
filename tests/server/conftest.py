"""The online suite (`make test-server`): real ClearML server, real SDK, real `clearml-agent` processes.

The server is the one the usual variables name: CLEARML_CONFIG_FILE, or CLEARML_API_HOST, CLEARML_FILES_HOST,
CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY. Without one the run stops at once with one line saying how
to point it at one; these tests never skip. `.ci/run` starts a throwaway local server for them.

Every training run starts from a clone of a bare origin made from the working tree as it is (uncommitted edits
included), with this project's venv outside that clone, as a user with a shared venv or conda env has it; the
agents clone the same origin and reuse the same venv, so nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from online import ROOT, task_id_of, train

SERVER_VARS = ("CLEARML_API_HOST", "CLEARML_FILES_HOST", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")
HOW = (
    'point the online suite at a ClearML server: `eval "$(../shared/clearml-server/clearml-local start '
    '/tmp/cml)"` (a throwaway local one), or export CLEARML_CONFIG_FILE=<clearml.conf>, or all of '
    + "/".join(SERVER_VARS)
)
_TUNED = {}  # the suite's copy of the configuration (see pytest_configure)


def _server_problem():
    """None when a server is named, else the one-line reason why not."""
    conf = os.environ.get("CLEARML_CONFIG_FILE")
    if conf:
        return None if Path(conf).is_file() else f"CLEARML_CONFIG_FILE={conf} does not exist"
    missing = [name for name in SERVER_VARS if not os.environ.get(name)]
    if len(missing) == len(SERVER_VARS):
        return "no ClearML server configured"
    return f"{', '.join(missing)} not set" if missing else None


def pytest_configure(config):
    problem = _server_problem()
    if problem:
        raise pytest.UsageError(f"make test-server: {problem}: {HOW}")
    # The suite's own copy of the configuration: the named one (if a file), plus the SDK's thread reporter,
    # which makes every task.close() here take 0.1 s instead of ~11 s. HOME points at an empty folder so
    # that no ~/clearml.conf of the user mixes in.
    tmp = Path(tempfile.mkdtemp(prefix="vocseg-online-"))
    text = Path(os.environ["CLEARML_CONFIG_FILE"]).read_text() if os.environ.get("CLEARML_CONFIG_FILE") else ""
    conf = tmp / "clearml.conf"
    conf.write_text(text + "\nsdk { development { report_use_subprocess: false } }\n")
    (tmp / "home").mkdir()
    _TUNED.update(tmp=tmp, conf=conf, home=tmp / "home")
    os.environ["CLEARML_CONFIG_FILE"] = str(conf)
    from clearml.backend_api import Session

    host = Session.get_api_server_host()
    try:
        urllib.request.urlopen(f"{host}/debug.ping", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answers
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"make test-server: ClearML server {host} does not answer ({exc}): {HOW}") from None


def pytest_unconfigure(config):
    if _TUNED:
        shutil.rmtree(_TUNED["tmp"], ignore_errors=True)


@pytest.fixture(scope="session")
def server_env():
    """The environment of every process the suite starts: the server, no stray ClearML/queue settings, CI=true
    (Ignite's ClearML handlers would bypass the server under CI unless the project overrides that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_")) or k in SERVER_VARS}
    env.update(CLEARML_CONFIG_FILE=str(_TUNED["conf"]), HOME=str(_TUNED["home"]), CI="true", PYTHONUNBUFFERED="1")
    return env


def _git(*args, cwd, env=None):
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def origin(tmp_path_factory):
    """A bare repository holding the working tree as it is now (tracked and untracked files, not ignored
    ones) as one commit on branch main, the way an agent must see it."""
    tmp = tmp_path_factory.mktemp("origin")
    bare = tmp / "origin.git"
    _git("init", "-q", "--bare", "--initial-branch=main", str(bare), cwd=tmp)
    # A private index, so neither the real index nor the working tree is touched.
    env = {
        **os.environ,
        "GIT_INDEX_FILE": str(tmp / "index"),
        "GIT_AUTHOR_NAME": "online suite",
        "GIT_AUTHOR_EMAIL": "suite@localhost",
        "GIT_COMMITTER_NAME": "online suite",
        "GIT_COMMITTER_EMAIL": "suite@localhost",
    }
    has_head = (
        subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    )
    if has_head:
        _git("read-tree", "HEAD", cwd=ROOT, env=env)
    _git("add", "-A", ".", cwd=ROOT, env=env)
    tree = _git("write-tree", cwd=ROOT, env=env)
    commit = _git(
        "commit-tree",
        tree,
        *(["-p", "HEAD"] if has_head else []),
        "-m",
        "online suite: working tree",
        cwd=ROOT,
        env=env,
    )
    _git("push", "-q", str(bare), f"{commit}:refs/heads/main", cwd=ROOT)
    yield bare
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def checkout(origin, tmp_path_factory):
    """Where the suite's runs start: a clone of the origin, outside which the project venv lives."""
    work = tmp_path_factory.mktemp("checkout") / "vocseg"
    _git("clone", "-q", str(origin), str(work), cwd=work.parent)
    assert not Path(sys.executable).resolve().is_relative_to(work)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def agent_env(server_env, tmp_path_factory):
    """An agent that reuses this venv instead of building one from the task's requirements."""
    return {
        **server_env,
        "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL": "1",
        "CLEARML_AGENT_SKIP_PIP_VENV_INSTALL": sys.executable,
    }


@pytest.fixture(scope="session")
def online_run(checkout, server_env, synthetic_voc, tmp_path_factory):
    """One tracked training run of the tiny config, online, from the clone: its task id, output, local files."""
    out = tmp_path_factory.mktemp("online_run")
    proc = train(checkout, server_env, out, DATASET_PATH=str(synthetic_voc))
    assert proc.returncode == 0, proc.output[-4000:]
    (run_dir,) = (out / "tiny_clearml").iterdir()
    return {"id": task_id_of(proc.output), "output": proc.output, "run_dir": run_dir}
