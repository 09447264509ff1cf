"""A plain launch says how many processes it starts (the count itself: tests/test_device_plan.py)."""

import pytest


@pytest.mark.slow
def test_a_plain_launch_says_how_many_processes_it_starts(synthetic_voc, tmp_path):
    from test_training import TINY, make_env, run_script

    env = make_env(synthetic_voc, tmp_path, NPROC_PER_NODE="2", CONFIG_OVERRIDES="num_epochs=1")
    proc = run_script("training", TINY, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vocseg: starting 2 processes on this machine" in proc.stderr
    assert "NPROC_PER_NODE=1 or CONFIG_OVERRIDES=nproc_per_node=1 runs one" in proc.stderr
