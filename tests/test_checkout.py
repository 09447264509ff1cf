"""vocseg.clearml.checkout: the git state a run records so that an agent can run it again."""

import subprocess

from vocseg.clearml.checkout import find_checkout


def git(folder, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def make_repo(path):
    path.mkdir()
    git(path, "init", "-q", "--initial-branch=main")
    (path / "tracked.py").write_text("a = 1\n")
    (path / ".gitignore").write_text("ignored/\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    return path


def test_checkout_records_remote_commit_branch_and_every_uncommitted_change(tmp_path):
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "--initial-branch=main", str(origin))
    repo = make_repo(tmp_path / "repo")
    git(repo, "remote", "add", "origin", "../origin.git")
    (repo / "tracked.py").write_text("a = 2\n")
    (repo / "new_config.py").write_text("lr = 0.1\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_text("x")
    (repo / "sub").mkdir()

    found = find_checkout(repo / "sub")
    assert found.root == repo and found.branch == "main" and found.commit == git(repo, "rev-parse", "HEAD")
    assert found.repository == str(origin.resolve())  # a relative local remote, made absolute
    assert "+a = 2" in found.diff and "+lr = 0.1" in found.diff and "big.bin" not in found.diff
    assert git(repo, "diff", "--cached") == ""  # the user's index is untouched

    # The recorded diff applies on a fresh clone at the recorded commit: what the agent does.
    clone = tmp_path / "clone"
    git(repo, "push", "-q", "origin", "main")
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    subprocess.run(["git", "apply"], input=found.diff, text=True, cwd=clone, check=True)
    assert (clone / "new_config.py").read_text() == "lr = 0.1\n" and (clone / "tracked.py").read_text() == "a = 2\n"


def test_checkout_without_remote_or_outside_git(tmp_path):
    repo = make_repo(tmp_path / "repo")
    assert find_checkout(repo).repository == ""
    plain = tmp_path / "plain"
    plain.mkdir()
    assert find_checkout(plain) is None
