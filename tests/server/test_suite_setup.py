"""The suite's own set-up: the origin an agent clones holds the working tree as it is, and the server answers."""

import subprocess

from online import ROOT


def listed(folder):
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=folder,
        check=True,
        capture_output=True,
    ).stdout
    return sorted(p for p in out.decode().split("\0") if p and (folder / p).is_file())


def test_checkout_is_the_working_tree_with_its_uncommitted_changes(checkout):
    files = listed(ROOT)
    assert listed(checkout) == files
    assert all((checkout / p).read_bytes() == (ROOT / p).read_bytes() for p in files)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True)
    assert status.stdout == ""  # nothing left for the agent to miss


def test_server_answers_with_the_suite_settings(server_env):
    from clearml import Task

    task = Task.create(project_name="vocseg online suite", task_name="set-up check")
    assert Task.get_task(task.id).name == "set-up check"
    task.delete()
