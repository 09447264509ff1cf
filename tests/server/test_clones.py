"""What a clone may change, run by a real clearml-agent: the config file's text (then Config/* on top), the
number of processes; and the container an enqueued task asks for."""

import uuid
from collections import Counter

import pytest
from online import agent_execute, clone_of, console_text, iterations_of, poly_lr, scalar_events, task_id_of, train

CONFIG = "tests/configs/tiny_clearml.py"


def run_clone(clone, agent_env, synthetic_voc, tmp_path):
    from clearml import Task

    proc = agent_execute(
        clone.id,
        {**agent_env, "DATASET_PATH": str(synthetic_voc), "CLEARML_OUTPUT_PATH": str(tmp_path / "out")},
        tmp_path,
    )
    return proc, Task.get_task(clone.id)


def test_edited_config_text_runs_with_config_edits_on_top(online_run, checkout, agent_env, synthetic_voc, tmp_path):
    text = (checkout / CONFIG).read_text()
    assert "num_epochs = 2\n" in text and "learning_rate = 0.01\n" in text
    clone = clone_of(online_run["id"], "tiny_clearml text edit", batch_size=8, learning_rate=0.04)
    # In the text: 3 epochs and another learning rate, which the Config/learning_rate edit overrides.
    clone.set_configuration_object(
        "config",
        config_text=text.replace("num_epochs = 2\n", "num_epochs = 3\n").replace(
            "learning_rate = 0.01\n", "learning_rate = 0.03\n"
        ),
    )
    proc, task = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode == 0, proc.output[-4000:]
    assert task.get_status() == "completed"
    events = scalar_events(task)
    assert iterations_of(events)[("train", "batch_loss")] == [1, 2, 3]  # 3 epochs (text) of 1 batch of 8 (Config)
    lrs = {(s, i): v for m, s, i, v in events if m == "lr"}
    assert lrs[("0", 1)] == pytest.approx(poly_lr(0.04, 1, 3))  # Config/learning_rate wins over the text
    log = console_text(task)
    assert "the configuration object 'config' was edited in the task" in log
    assert "batch_size=8 (was 4), learning_rate=0.04 (was 0.01)" in log


def test_unparsable_config_text_stops_with_one_line_naming_the_task(online_run, agent_env, synthetic_voc, tmp_path):
    clone = clone_of(online_run["id"], "tiny_clearml broken text")
    clone.set_configuration_object("config", config_text="learning_rate = (\n")
    proc, task = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.output.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: task {clone.id} (tiny_clearml broken text): the edited configuration object 'config' "
        "does not parse (line 1: '(' was never closed): fix its text in the task, or clone the "
        "original again"
    ]
    assert "Traceback" not in proc.output and "train images" not in proc.output
    assert task.get_status() == "failed"


def test_ill_typed_hyperparameter_stops_with_one_line_naming_the_task(online_run, agent_env, synthetic_voc, tmp_path):
    clone = clone_of(online_run["id"], "tiny_clearml bad edit", batch_size="eight")
    proc, task = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.output.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: task {clone.id} (tiny_clearml bad edit): hyperparameter Config/batch_size='eight' is "
        "not a valid int (config value 4): fix it in the task"
    ]
    assert "Traceback" not in proc.output and task.get_status() == "failed"


def test_clone_with_nproc_per_node_2_trains_in_two_processes_as_one_task(
    online_run, checkout, agent_env, synthetic_voc, tmp_path
):
    clone = clone_of(online_run["id"], "tiny_clearml two processes")
    clone.set_configuration_object("config", config_text=(checkout / CONFIG).read_text() + "nproc_per_node = 2\n")
    proc, task = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode == 0, proc.output[-4000:]
    assert task.get_status() == "completed"
    log = console_text(task)
    assert "world size 2" in log and log.count("train images 8") == 1
    events = scalar_events(task)
    assert not [key for key, n in Counter((m, v, i) for m, v, i, _ in events).items() if n > 1]
    assert iterations_of(events)[("train", "batch_loss")] == [1, 2, 3, 4]


def test_docker_image_and_shared_memory_argument_are_stored_on_the_enqueued_task(
    checkout, server_env, synthetic_voc, tmp_path
):
    from clearml import Task
    from clearml.backend_api.session.client import APIClient

    queue = f"vocseg-docker-{uuid.uuid4().hex[:8]}"  # no agent serves it: only what is stored is checked
    APIClient().queues.create(name=queue)
    image = "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"
    proc = train(
        checkout,
        server_env,
        tmp_path / "out",
        DATASET_PATH=str(synthetic_voc),
        CLEARML_QUEUE=queue,
        VOCSEG_DOCKER_IMAGE=image,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    task = Task.get_task(task_id_of(proc.output))
    try:
        assert task.get_status() == "queued"
        container = task.data.container
        assert container["image"] == image and "--ipc=host" in container["arguments"].split()
    finally:
        Task.dequeue(task)
        task.mark_stopped(force=True)


def test_clone_edits_of_run_name_and_dist_timeout_take_effect(online_run, agent_env, synthetic_voc, tmp_path):
    # Neither is a literal of tiny_clearml.py: both are settings, read before the config runs (the run folder,
    # the process group), so they must come from the clone's Config/* too.
    clone = clone_of(
        online_run["id"], "tiny_clearml settings edit", run_name="edited-name", dist_timeout=33, nproc_per_node=2
    )
    proc, task = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode == 0, proc.output[-4000:]
    assert (tmp_path / "out" / "tiny_clearml" / "edited-name" / "metrics.json").is_file()
    assert "process group gloo of 2 processes, collective timeout 33 s" in proc.output
    assert task.get_status() == "completed"


def test_config_overrides_are_recorded_on_the_task_and_a_clone_reruns_them(
    checkout, server_env, agent_env, synthetic_voc, tmp_path
):
    from clearml import Task

    # num_epochs is a literal of tiny_clearml.py; cudnn_benchmark is a setting the config does not set.
    overrides = "num_epochs=1 cudnn_benchmark=False"
    proc = train(checkout, server_env, tmp_path / "first", DATASET_PATH=str(synthetic_voc), CONFIG_OVERRIDES=overrides)
    assert proc.returncode == 0, proc.output[-4000:]
    task = Task.get_task(task_id_of(proc.output))
    params = task.get_parameters_as_dict()["Config"]
    assert (params["num_epochs"], params["cudnn_benchmark"], params["learning_rate"]) == ("1", "False", "0.01")
    (run_dir,) = (tmp_path / "first" / "tiny_clearml").iterdir()
    assert (run_dir / "overrides.json").is_file()

    clone = clone_of(task.id, "tiny_clearml overrides clone")
    proc, ran = run_clone(clone, agent_env, synthetic_voc, tmp_path)
    assert proc.returncode == 0, proc.output[-4000:]
    assert iterations_of(scalar_events(ran))[("train", "batch_loss")] == [1, 2]  # one epoch of 8 images, batch 4
