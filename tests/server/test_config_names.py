"""Config names the server would reject as task names (under 3 characters) still run online, under a name that
shows the config's."""

from online import task_id_of, train

from vocseg.clearml.search import find_base_task


def test_a_two_letter_config_runs_online(checkout, server_env, synthetic_voc, tmp_path):
    from clearml import Task

    config = tmp_path / "v2.py"
    config.write_text((checkout / "tests/configs/tiny_clearml.py").read_text())
    proc = train(checkout, server_env, tmp_path / "out", config=str(config), DATASET_PATH=str(synthetic_voc))
    assert proc.returncode == 0, proc.output[-4000:]
    task = Task.get_task(task_id_of(proc.output))
    assert (task.get_status(), task.name) == ("completed", "v2.py")
    # hpo.py's base task by config name finds it too.
    assert find_base_task("v2").id == task.id
