"""Two processes under torchrun, online: one task on the server, every value reported once."""

import sys
from collections import Counter

from online import free_port, iterations_of, scalar_events, task_id_of, train


def test_torchrun_two_processes_make_one_task_with_each_metric_once(checkout, server_env, synthetic_voc, tmp_path):
    from clearml import Task

    def tiny_tasks():
        return {t.id for t in Task.get_tasks(project_name="Pascal-VOC12 Training", task_name="tiny_clearml")}

    before = tiny_tasks()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}")
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
