"""Two processes under torchrun, online: one task on the server, every value reported once, also through a restart."""

import subprocess
import sys
import time
from collections import Counter

from online import free_port, iterations_of, scalar_events, task_id_of, train


def test_torchrun_two_processes_make_one_task_with_each_metric_once(checkout, server_env, synthetic_voc, tmp_path):
    from clearml import Task

    def tiny_tasks():
        return {t.id for t in Task.get_tasks(project_name="Pascal-VOC12 Training", task_name="tiny_clearml")}

    before = tiny_tasks()
    launcher = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    )
    proc = train(checkout, server_env, tmp_path / "out", launcher=launcher, DATASET_PATH=str(synthetic_voc))
    assert proc.returncode == 0, proc.output[-4000:]
    task_id = task_id_of(proc.output)  # exactly one "created new task" among both ranks' output
    assert tiny_tasks() - before == {task_id}
    task = Task.get_task(task_id)
    assert task.get_status() == "completed"
    events = scalar_events(task)
    twice = [key for key, n in Counter((m, v, i) for m, v, i, _ in events).items() if n > 1]
    assert not twice
    # batch_size is the global batch (2 per process): the same 4 iterations as one process.
    at = iterations_of(events)
    assert at[("train", "batch_loss")] == [1, 2, 3, 4] and at[("val", "mIoU")] == [1, 2]
    assert at[("val/IoU", "background")] == [1, 2]
    assert "world size 2" in "\n".join(task.get_reported_console_output(number_of_reports=10000))


def test_torchrun_restart_continues_the_same_task(checkout, server_env, synthetic_voc, tmp_path):
    """kill -9 of one rank: torchrun restarts the group, which continues the task and ends with the scalars of an
    uninterrupted run, each once."""
    import psutil
    from clearml import Task
    from test_preemption_online import values_of

    def torchrun(*extra):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *extra,
            "-m",
            "py_config_runner",
            "code/scripts/training.py",
            "tests/configs/tiny.py",
        ]

    env = {**server_env, "DATASET_PATH": str(synthetic_voc), "TINY_SAVE_EVERY": "2"}
    out = tmp_path / "restarted"
    launcher = subprocess.Popen(
        torchrun("--max-restarts=2"),
        cwd=checkout,
        env={**env, "CLEARML_OUTPUT_PATH": str(out)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("tiny/*/checkpoints/training_checkpoint_4.pt")):
        time.sleep(0.05)
    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children()}
    ranks[1].kill()
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-4000:]
    task_id = task_id_of(output)  # one task created, by the first group's rank 0
    assert output.count(f"continuing task {task_id}, recorded in the run folder") == 1
    (run_dir,) = (out / "tiny").iterdir()
    assert "resumed from " in output and (run_dir / "clearml_task_id").read_text() == task_id

    reference = train(
        checkout,
        server_env,
        tmp_path / "reference",
        config="tests/configs/tiny.py",
        launcher=tuple(torchrun()[:6]),
        DATASET_PATH=str(synthetic_voc),
        TINY_SAVE_EVERY="2",
    )
    assert reference.returncode == 0, reference.output[-4000:]
    task = Task.get_task(task_id)
    assert task.get_status() == "completed"
    continued = values_of(task)
    assert iterations_of([(*key, v) for key, v in continued.items()])[("train", "batch_loss")] == [2, 4, 6, 8, 10, 12]
    assert continued == values_of(Task.get_task(task_id_of(reference.output)))
