"""The device plan (vocseg.runtime.device_plan) over simulated machines: GPUs that do not exist here are described
to the pure decision, or reported by torch.cuda in real training processes (tests/fake_gpus/sitecustomize.py).
A run asked for the CPU must then train on the CPU and never touch CUDA."""

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vocseg.config import ConfigSource, with_overrides
from vocseg.entry import _device_request
from vocseg.errors import UserError
from vocseg.runtime import device_plan
from vocseg.runtime.device_plan import Gpu, Launch, Machine, Request, decide

REPO = Path(__file__).resolve().parents[1]
FAKE_GPUS = REPO / "tests" / "fake_gpus"
TINY = "tests/configs/tiny.py"


def gpus(count, capability=(8, 0), name="NVIDIA A100-SXM4-40GB"):
    return tuple(Gpu(name, capability, 40 * 2**30) for _ in range(count))


MACHINES = {
    "no GPU": Machine(),
    "1 GPU cc 8.0": Machine(gpus(1)),
    "2 GPUs cc 7.0": Machine(gpus(2, (7, 0), "Tesla V100-SXM2-16GB")),
    "8 GPUs cc 8.0": Machine(gpus(8)),
    "1 GPU per task": Machine(gpus(1)),  # SLURM --gpus-per-task=1: each task sees its own GPU as device 0
}


def launches(machine_name, launcher, n):
    """The launch that the last process of ``n`` on the node sees, and the request's nproc_per_node."""
    bound = machine_name == "1 GPU per task"
    if launcher == "plain":  # the spawning process decides for the first; each spawned one for itself
        return [(Launch(), n), (Launch("plain", n, n - 1, n - 1, n), n)]
    return [(Launch(launcher, n, n - 1, n - 1, n, gpu_per_task=bound and launcher == "slurm"), None)]


CASES = list(itertools.product(MACHINES, ["cpu", "cuda", "cuda:1"], [1, 2, 4], ["plain", "torchrun", "slurm"]))


@pytest.mark.parametrize("machine_name, device, n, launcher", CASES)
def test_every_combination_is_planned_or_refused_in_one_line(machine_name, device, n, launcher):
    machine = MACHINES[machine_name]
    for launch, nproc in launches(machine_name, launcher, n):
        request = Request(device=device, amp="auto", nproc_per_node=nproc, where="config c.py")
        visible = len(machine.gpus)
        bound = launch.gpu_per_task
        refusal = None
        if device != "cpu" and not visible:
            refusal = "no GPU is visible"
        elif device == "cuda:1" and n > 1:
            refusal = "names one GPU but"
        elif device == "cuda:1" and visible < 2:
            refusal = "this process sees 1 GPU"
        elif device == "cuda" and n > visible and not bound:
            refusal = f"{n} processes on this node but each sees {visible} GPU"
        if refusal:
            with pytest.raises(UserError) as refused:
                decide(request, machine, launch)
            assert refusal in str(refused.value) and "\n" not in str(refused.value)
            assert str(refused.value).startswith("config c.py: ")
            continue
        plan = decide(request, machine, launch)
        several = n > 1
        assert plan.world_size == n
        assert plan.spawn == (n if launcher == "plain" and launch.world_size == 1 else 1)
        assert plan.ddp == several  # a bare model or DDP: the plan has no DataParallel to choose
        if device == "cpu":  # whatever the machine has
            assert plan.device == torch.device("cpu") and plan.hide_cuda and not plan.pin_memory
            assert plan.backend == ("gloo" if several else None) and not plan.sync_bn
            continue
        expected_index = 1 if device == "cuda:1" else 0 if bound else launch.local_rank
        assert plan.device == torch.device("cuda", expected_index)
        assert plan.backend == ("nccl" if several else None) and plan.sync_bn == several
        assert plan.pin_memory and not plan.hide_cuda
        ampere = machine.gpus[0].capability >= (8, 0)
        assert plan.amp_dtype == (torch.bfloat16 if ampere else torch.float16)
        assert plan.grad_scaler == (not ampere)
        assert str(plan.device) in plan.line() and plan.precision in plan.line()


def test_a_single_process_on_many_gpus_trains_a_bare_model_on_the_gpu_it_names(monkeypatch):
    # ignite's auto_model wrapped such a model in DataParallel over every GPU (defect 1).
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device, index in (("cuda", 0), ("cuda:3", 3)):
        plan = decide(Request(device=device, nproc_per_node=1), MACHINES["8 GPUs cc 8.0"], Launch())
        assert plan.device == torch.device("cuda", index) and not plan.ddp and plan.world_size == 1
        model = device_plan.place_model(torch.nn.Conv2d(3, 4, 1), _on_cpu(plan))
        assert type(model) is torch.nn.Conv2d  # neither DataParallel nor DDP


def _on_cpu(plan):
    # The same plan on the CPU, for the one step (moving the weights) that needs a GPU to exist.
    from dataclasses import replace

    return replace(plan, device=torch.device("cpu"))


def test_adopting_a_plan_sets_its_gpu_before_anything_is_built(monkeypatch):
    # cuda:1 in one process: the model and the batches both go to the plan's device, and CUDA's current device
    # follows it (ignite's auto_model put the model on cuda:0 and the batches went to cuda:1: defect 1).
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    plan = decide(Request(device="cuda:1"), MACHINES["2 GPUs cc 7.0"], Launch())
    device_plan.adopt(plan)
    try:
        assert chosen == [torch.device("cuda", 1)] and device_plan.current() is plan
    finally:
        device_plan.release()
    cpu = decide(Request(device="cpu"), MACHINES["8 GPUs cc 8.0"], Launch())
    device_plan.adopt(cpu)
    device_plan.release()
    assert chosen == [torch.device("cuda", 1)]  # a CPU plan sets no GPU


def test_slurm_tasks_with_a_gpu_each_use_their_device_0():
    # srun --gpus-per-task=1: task 3 of 4 sees one GPU, numbered 0 (its LOCAL_RANK 3 was "invalid device
    # ordinal": defect 3). Without the binding the same view is too few GPUs for the node, said in one line.
    env = {
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "3",
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "4",
        "SLURM_GPUS_PER_TASK": "1",
    }
    launch = device_plan.detect_launch(env)
    assert launch == Launch("slurm", 4, 3, 3, 4, gpu_per_task=True)
    plan = decide(Request(device="cuda"), MACHINES["1 GPU per task"], launch)
    assert plan.device == torch.device("cuda", 0) and plan.backend == "nccl" and plan.ddp
    unbound = device_plan.detect_launch({k: v for k, v in env.items() if k != "SLURM_GPUS_PER_TASK"})
    with pytest.raises(UserError, match=r"slurm started 4 processes on this node but each sees 1 GPU\(s\).*"):
        decide(Request(device="cuda"), MACHINES["1 GPU per task"], unbound)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, Launch("torchrun", 8, 5, 1, 4)),
        (
            {"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}
            | {"SLURM_STEP_TASKS_PER_NODE": "2(x2),1"},
            Launch("slurm", 5, 4, 0, 1),
        ),
        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, Launch()),  # a batch script's own shell
        ({}, Launch()),
    ],
)
def test_how_a_process_was_launched(env, expected):
    assert device_plan.detect_launch(env) == expected


@pytest.mark.parametrize(
    "capability, name, expected",
    [
        ((7, 0), "Tesla V100-SXM2-16GB", torch.float16),
        ((7, 5), "Tesla T4", torch.float16),
        ((8, 0), "NVIDIA A100-SXM4-40GB", torch.bfloat16),
        ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16),
    ],
)
def test_gpu_precision_follows_the_compute_capability(capability, name, expected):
    machine = Machine(gpus(1, capability, name))
    for amp, dtype in (("auto", expected), ("fp16", torch.float16), ("off", None)):
        plan = decide(Request(device="cuda", amp=amp), machine, Launch())
        assert plan.amp_dtype == dtype and plan.grad_scaler == (dtype == torch.float16)


def test_bf16_on_an_older_gpu_and_bad_values_are_one_line():
    with pytest.raises(UserError) as caught:
        decide(
            Request("cuda", "bf16", where="config configs/train/x.py"), Machine(gpus(1, (7, 5), "Tesla T4")), Launch()
        )
    message = str(caught.value)
    assert "\n" not in message and "Tesla T4" in message and "7.5" in message and "amp='fp16'" in message
    with pytest.raises(UserError, match="amp='float16'.*'auto', 'bf16', 'fp16', 'off'"):
        decide(Request("cpu", "float16"), Machine(), Launch())
    with pytest.raises(UserError, match=r"device='gpu' is not 'cpu', 'cuda' or 'cuda:N'"):
        decide(Request("gpu"), Machine(), Launch())


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_computes_it(native):
    machine = Machine(cpu_bf16=native)
    plan = decide(Request("cpu", "auto"), machine, Launch())
    assert plan.amp_dtype == (torch.bfloat16 if native else None) and not plan.grad_scaler
    assert plan.precision_name == ("bf16" if native else "fp32")
    assert ("bf16 autocast on the CPU" in plan.line()) == native
    if native:
        assert decide(Request("cpu", "bf16"), machine, Launch()).amp_dtype == torch.bfloat16
    else:  # emulated bf16 would be a silent slowdown
        with pytest.raises(UserError, match="this CPU has no native bf16"):
            decide(Request("cpu", "bf16"), machine, Launch())
    with pytest.raises(UserError, match="amp='fp16' in the config on the CPU"):
        decide(Request("cpu", "fp16"), machine, Launch())
    assert decide(Request("cpu", "off"), machine, Launch()).amp_dtype is None


def test_cpu_flags_are_read_from_the_kernel(tmp_path):
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n")
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    assert device_plan.cpu_has_bf16(amd) and device_plan.cpu_has_bf16(arm)
    assert not device_plan.cpu_has_bf16(intel) and not device_plan.cpu_has_bf16(tmp_path / "missing")


def test_sync_bn_across_gpu_processes_unless_the_config_says_no():
    on_gpus = decide(Request("cuda"), Machine(gpus(2)), Launch("torchrun", 2, 0, 0, 2))
    assert on_gpus.sync_bn and not device_plan.with_sync_bn(on_gpus, False).sync_bn
    on_cpus = decide(Request("cpu", sync_bn=True), Machine(gpus(2)), Launch("torchrun", 2, 0, 0, 2))
    assert not on_cpus.sync_bn and "sync_bn=True ignored" in on_cpus.warnings[0]
    assert not device_plan.with_sync_bn(on_cpus, None).warnings
    alone = decide(Request("cuda", sync_bn=True), Machine(gpus(2)), Launch())
    assert alone.spawn == 2 and alone.sync_bn  # the plain launch's processes will use it


# ---------------------------------------------------------------------------------------------------------
# The settings a plan is asked with, as the entry point reads them (before the config runs).


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE", "CONFIG_OVERRIDES", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)

    def write(text="", mutations=None):
        path = tmp_path / "c.py"
        path.write_text(text)
        source = with_overrides(ConfigSource(path, None, mutations or {}))
        return decide(_device_request(source, "auto"), MACHINES["8 GPUs cc 8.0"], device_plan.detect_launch())

    return write


def test_processes_a_plain_launch_starts(config, monkeypatch):
    assert config('device = "cuda"\n').spawn == 8  # one per visible GPU
    assert config("import torch\ndevice = 'cuda' if torch.cuda.is_available() else 'cpu'\n").spawn == 8
    assert config('device = "cpu"\n').spawn == 1  # a CPU config asks for nothing more
    assert config('device = "cpu"\nnproc_per_node = 2\n').spawn == 2
    assert config('device = "cpu"\nnproc_per_node = 2\n', {"nproc_per_node": 3}).spawn == 3
    monkeypatch.setenv("NPROC_PER_NODE", "3")
    monkeypatch.setenv("CONFIG_OVERRIDES", "nproc_per_node=1")
    assert config('device = "cuda"\nnproc_per_node = 2\n').spawn == 1  # CONFIG_OVERRIDES > environment > config
    monkeypatch.delenv("NPROC_PER_NODE")
    monkeypatch.setenv("CONFIG_OVERRIDES", "device=cpu")
    assert config('device = "cuda"\n').device == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert config("nproc_per_node = 2\n").spawn == 1  # torchrun started them


@pytest.mark.parametrize("given", ["0", "two", "1.5"])
def test_bad_nproc_per_node_is_one_line(config, monkeypatch, given):
    monkeypatch.setenv("NPROC_PER_NODE", given)
    with pytest.raises(UserError, match=f"NPROC_PER_NODE='{given}' is not allowed: set it to None or an integer >= 1"):
        config()


# ---------------------------------------------------------------------------------------------------------
# Real training processes on a machine that reports GPUs it does not have.


def fake_gpu_env(data, out, gpus, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINY_", "CLEARML", "RESUME_FROM", "CUDA_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(FAKE_GPUS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        VOCSEG_FAKE_GPUS=str(gpus),
        VOCSEG_FAKE_GPUS_LOG=str(out / "cuda_touched.log"),
        DATASET_PATH=str(data),
        OUTPUT_PATH=str(out),
        OMP_NUM_THREADS="1",
        TINY_VAL_LIMIT="8",
        **extra,
    )
    return env


def torchrun(n):
    script = Path(sys.executable).with_name("torchrun")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [*launcher, f"--nproc_per_node={n}", f"--master_port={port}"]


def start(launcher, config, env):
    cmd = [*(launcher or [sys.executable]), "-m", "py_config_runner", "code/scripts/training.py", config]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_cpu_run_on_a_gpu_machine_trains_on_the_cpu_and_never_touches_cuda(synthetic_voc, tmp_path, processes):
    # One process: ignite wrapped the CPU model in DataParallel over both GPUs (defect 1). Two under torchrun:
    # the group was nccl and each rank set its CUDA device (defect 2).
    env = fake_gpu_env(synthetic_voc, tmp_path, 2, CONFIG_OVERRIDES="num_epochs=1")
    proc = start(torchrun(2) if processes == 2 else None, TINY, env)
    touched = tmp_path / "cuda_touched.log"
    assert not touched.exists(), touched.read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = next(tmp_path.glob("tiny/*/training.log")).read_text()
    group = "one process" if processes == 1 else "2 processes, gloo | DDP"
    assert f"device cpu | {group}" in log and "CUDA hidden" in log


@pytest.mark.slow
def test_more_processes_than_gpus_is_one_line_before_any_process_group(synthetic_voc, tmp_path):
    env = fake_gpu_env(synthetic_voc, tmp_path, 1, CONFIG_OVERRIDES="device=cuda")
    proc = start(torchrun(2), TINY, env)
    assert proc.returncode != 0
    said = "torchrun started 2 processes on this node but each sees 1 GPU(s)"
    assert said in proc.stderr, proc.stderr[-3000:]  # one line per rank that got there before torchrun stopped it
    ours = proc.stderr.split("torch/distributed/elastic/multiprocessing/api.py")[0]
    assert "Traceback" not in ours and "process group" not in proc.stderr
    assert not (tmp_path / "tiny").exists()


def test_no_module_but_the_plan_asks_cuda_or_ignite_where_to_put_things():
    asks = ("torch.cuda", "idist.device", "auto_model", "DataParallel", "set_device", "torch.backends.mps")
    found = [
        f"{path.relative_to(REPO)}: {needle}"
        for path in sorted((REPO / "code").rglob("*.py"))
        if path.name != "device_plan.py"
        for needle in asks
        if needle in path.read_text()
    ]
    assert not found
