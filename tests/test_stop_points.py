"""Where a warned run stops (SLURM's USR1 before a time limit): at the first exact point after the warning, within
lcm(accumulation_steps, log_every_iters) iterations, whatever the epoch's length. Real processes (one, or two in
a gloo group), real SIGUSR1, the training's own stop handler on an Ignite engine without a model."""

import json
import math
import multiprocessing
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

NUM_EPOCHS = 3

# (epoch length, log_every_iters, accumulation_steps): the agreement period divides or equals the epoch, the
# cases that never stopped (every check on an epoch's last iteration), and one where it does not divide.
SCHEDULES = [
    (5, 10, 1),  # the quickstart on two processes: every check of the old code fell on an epoch's end
    (5, 5, 1),
    (6, 2, 1),
    (6, 3, 3),
    (4, 4, 4),  # accumulation over the whole epoch: one process never stopped either
    (6, 2, 3),
    (5, 1, 5),
    (7, 2, 3),  # epochs end inside an accumulated step: those ends are not exact
]


def warnings_for(epoch_length):
    """When USR1 arrives: inside an iteration (its first, its middle, an epoch's last one, the run's last
    epoch) or during the first epoch's validation."""
    iterations = {1, epoch_length // 2 + 1, epoch_length, epoch_length + 2, (NUM_EPOCHS - 1) * epoch_length + 1}
    return [("iteration", i) for i in sorted(iterations)] + [("validation", 1)]


def expected_stop(epoch_length, log_every, accumulation, world, warned):
    """The first exact point at or after the warning where the ranks agree, or None (the run ends first)."""
    every = math.lcm(accumulation, log_every if world > 1 else 1)
    total = NUM_EPOCHS * epoch_length
    kind, at = warned
    first = at * epoch_length if kind == "validation" else at
    for i in range(first, total):
        end = i % epoch_length == 0
        if (not end and i % every == 0) or (end and i % accumulation == 0):
            return i
    return None


def _train_and_warn(_local_rank, schedules, out_dir):
    """In each process: every schedule and warning in turn, on an engine with the training's stop handler."""
    import ignite.distributed as idist
    from ignite.engine import Engine, Events

    from vocseg.engine.train import stop_on_preemption_signal
    from vocseg.runtime import signals

    rank, results = idist.get_rank(), []
    for epoch_length, log_every, accumulation in schedules:
        for warned in warnings_for(epoch_length):
            for warned_ranks in ([0, 1], [1]) if idist.get_world_size() > 1 else ([0],):
                signals._requested_stop.clear()
                kind, at = warned

                def warn(kind_now, at_now, warned=warned, warned_ranks=warned_ranks):
                    if (kind_now, at_now) == warned and rank in warned_ranks:
                        os.kill(os.getpid(), signal.SIGUSR1)

                trainer = Engine(lambda engine, _batch: warn("iteration", engine.state.iteration))
                trainer.state.nan_iteration = None
                validated = []

                @trainer.on(Events.EPOCH_COMPLETED)
                def _validate(engine, validated=validated, warn=warn):  # stands for train.validate
                    warn("validation", engine.state.epoch)
                    validated.append(engine.state.iteration)

                run = SimpleNamespace(
                    trainer=trainer, accumulation_steps=accumulation, log_every=log_every, preempted=""
                )
                stop_on_preemption_signal(run)
                trainer.run(range(epoch_length), max_epochs=NUM_EPOCHS)
                results.append(
                    {
                        "schedule": [epoch_length, log_every, accumulation],
                        "warned": [kind, at],
                        "warned_ranks": warned_ranks,
                        "stopped": trainer.state.iteration if run.preempted else None,
                        "validated": validated,
                    }
                )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_processes(world, out_dir):
    if world == 1:  # a process of its own: the signal handler and the stop request are per process
        process = multiprocessing.get_context("spawn").Process(target=_train_and_warn, args=(0, SCHEDULES, out_dir))
        process.start()
        process.join(300)
        assert process.exitcode == 0
        return
    import ignite.distributed as idist

    with idist.Parallel(backend="gloo", nproc_per_node=world, master_port=_free_port()) as parallel:
        parallel.run(_train_and_warn, SCHEDULES, out_dir)


@pytest.mark.parametrize("world", [1, 2])
def test_a_warned_run_stops_at_the_first_exact_point_after_the_warning(world, tmp_path):
    _in_processes(world, str(tmp_path))
    by_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(results == by_rank[0] for results in by_rank)  # every rank stops at the same iteration
    wrong = []
    for result in by_rank[0]:
        epoch_length, log_every, accumulation = result["schedule"]
        warned = tuple(result["warned"])
        expected = expected_stop(epoch_length, log_every, accumulation, world, warned)
        stopped = result["stopped"]
        if stopped != expected:
            wrong.append(f"{result}: expected a stop at {expected}")
            continue
        if stopped is None:
            continue
        warned_at = warned[1] * epoch_length if warned[0] == "validation" else warned[1]
        every = math.lcm(accumulation, log_every if world > 1 else 1)
        assert stopped - warned_at < every, result  # bounded by the agreement period
        assert stopped % accumulation == 0, result  # never inside an accumulated step
        if stopped % epoch_length == 0:  # at an epoch's end: after its validation, so a resumed run loses none
            assert result["validated"][-1] == stopped, result
    assert not wrong, "\n".join(wrong)
    # The cases of the issue: the warned run stops, with one process and with two.
    stops = {(tuple(r["schedule"]), tuple(r["warned"])): r["stopped"] for r in by_rank[0]}
    assert stops[(5, 10, 1), ("iteration", 1)] == (5 if world > 1 else 1)
    assert stops[(4, 4, 4), ("iteration", 1)] == 4
    assert stops[(5, 5, 1), ("validation", 1)] == 5
