"""Where a process computes, decided once, in one place: the device plan.

``decide(request, machine, launch)`` is a pure function of what the run asks for (the device, amp, sync_bn and
nproc_per_node settings), what this process sees (``Machine``: its GPUs, whether the CPU computes bf16) and how
the processes were started (``Launch``: plain, torchrun or SLURM, the ranks, per-task GPU binding). It returns a
``DevicePlan``: the process-group backend, this rank's device, DDP or a bare model (never DataParallel), SyncBN,
the autocast dtype and GradScaler, pinned memory, and how many processes a plain launch starts. Every refusal
is one line, raised before any process group starts.

``vocseg.entry`` decides the plan at the start of each process and ``adopt``s it; the rest of the package reads
``current()`` and uses the helpers below (``place_model``, ``synchronize``, ``peak_memory``): nothing else asks
torch.cuda or ignite where to put things. A run asked for the CPU hides CUDA from itself (and its DataLoader
workers and spawned ranks) before anything could initialise it, so a GPU machine's CUDA is never touched.
"""

import os
import re
from dataclasses import dataclass, field, replace

import torch

from vocseg.errors import UserError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose cuDNN convolutions run bf16 natively
# CPU flags of native bf16 arithmetic (x86 AVX512-BF16 / AMX, Arm's BF16 extension). Without them torch emulates
# bf16 on the CPU: slower than fp32, so "auto" never picks it there.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple  # (major, minor)
    total_memory: int = 0  # bytes


@dataclass(frozen=True)
class Machine:
    """What this process sees: its visible GPUs (CUDA_VISIBLE_DEVICES applied) and the CPU's bf16."""

    gpus: tuple = ()
    cpu_bf16: bool = False


@dataclass(frozen=True)
class Launch:
    """How this process was started. ``launcher``: "plain" (python; it may start ``world_size`` processes
    itself), "torchrun" (torchrun / torch.distributed.launch) or "slurm" (an srun step of several tasks)."""

    launcher: str = "plain"
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    gpu_per_task: bool = False  # SLURM bound each task to GPUs of its own, each seen from device 0


@dataclass(frozen=True)
class Request:
    """What the run asks for: the settings of the same names (vocseg.settings)."""

    device: str | None = None
    amp: str | None = "off"
    sync_bn: bool | None = None
    nproc_per_node: int | None = None
    where: str = "the config"  # what the refusals name: the config file, or --device


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    backend: str | None  # the process group's: None for a single process
    world_size: int
    spawn: int  # processes a plain launch starts here (1 under torchrun and SLURM: they started them)
    ddp: bool
    sync_bn: bool
    amp_dtype: torch.dtype | None
    grad_scaler: bool
    pin_memory: bool
    hide_cuda: bool
    gpu: Gpu | None = None
    warnings: tuple = field(default=())  # what the plan could not do as asked: the log warns of each

    @property
    def precision(self) -> str:
        if self.amp_dtype is None:
            return "fp32"
        kind = "bf16 autocast" if self.amp_dtype == torch.bfloat16 else "fp16 autocast with GradScaler"
        return f"{kind} on the CPU" if self.device.type == "cpu" else kind

    @property
    def precision_name(self) -> str:
        """fp32, bf16 or fp16: what metrics.json records."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def line(self) -> str:
        """The log header's device line."""
        where = str(self.device)
        if self.gpu is not None:
            cap = ".".join(map(str, self.gpu.capability))
            where += f" ({self.gpu.name}, compute capability {cap})"
        group = "one process" if self.world_size == 1 else f"{self.world_size} processes, {self.backend}"
        model = "DDP" + (" + SyncBN" if self.sync_bn else "") if self.ddp else "bare model"
        parts = [where, group, model, f"precision {self.precision}"]
        if self.pin_memory:
            parts.append("pinned host memory")
        if self.hide_cuda:
            parts.append("CUDA hidden")
        return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# The decision.


def decide(request: Request, machine: Machine, launch: Launch) -> DevicePlan:
    """The plan of the process ``launch`` describes (a plain launch that starts processes itself is decided for
    its first one; each started process decides its own)."""
    kind, index = _parse_device(request.device, machine, request.where)
    spawn = _processes_to_start(request.nproc_per_node, kind, index, machine, launch)
    if spawn > 1:  # a plain launch about to start its processes: decided for the first, each decides its own
        launch = replace(launch, world_size=spawn, local_world_size=spawn)
    world_size, local_world_size, local_rank = launch.world_size, launch.local_world_size, launch.local_rank
    gpu = None
    if kind == "cuda":
        index = _gpu_index(request, index, machine, launch, world_size, local_world_size, local_rank)
        gpu = machine.gpus[index]
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    amp_dtype = _amp_dtype(request.amp, device, gpu, machine.cpu_bf16, request.where)
    return with_sync_bn(
        DevicePlan(
            device=device,
            backend=None if world_size == 1 else ("nccl" if kind == "cuda" else "gloo"),
            world_size=world_size,
            spawn=spawn,
            ddp=world_size > 1,
            sync_bn=False,
            amp_dtype=amp_dtype,
            grad_scaler=amp_dtype == torch.float16,
            pin_memory=kind == "cuda",
            hide_cuda=kind == "cpu",
            gpu=gpu,
        ),
        request.sync_bn,
    )


def _parse_device(requested, machine: Machine, where: str):
    text = str(requested or "").strip()
    if not text:  # the config names no device: a visible GPU, else the CPU (the log line says which)
        return ("cuda", None) if machine.gpus else ("cpu", None)
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if not match or (match[1] == "cpu" and match[2] is not None):
        raise UserError(f"{where}: device={requested!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if match[1] == "cuda" and not machine.gpus:
        raise UserError(
            f"{where}: device='{requested}' but no GPU is visible: set device='cpu' "
            "(CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose)"
        )
    return match[1], None if match[2] is None else int(match[2])


def _processes_to_start(given, kind: str, index, machine: Machine, launch: Launch) -> int:
    if launch.launcher != "plain":
        return 1  # torchrun or srun started them
    if launch.world_size > 1:  # one of the processes a plain launch started: it starts none
        return 1
    if given is not None:
        return int(given)
    # One per visible GPU by default, so that a clone given --gpus 0,1 on an agent uses both; a device that
    # names one GPU (cuda:N) is one process.
    return max(1, len(machine.gpus)) if kind == "cuda" and index is None else 1


def _gpu_index(request: Request, index, machine: Machine, launch: Launch, world, local_world, local_rank) -> int:
    visible = len(machine.gpus)
    where = request.where
    if index is not None:
        if world > 1:
            raise UserError(
                f"{where}: device='cuda:{index}' names one GPU but {world} processes train, one GPU each: set "
                f"device='cuda' (CUDA_VISIBLE_DEVICES picks which GPUs), or run one process"
            )
        if index >= visible:
            raise UserError(
                f"{where}: device='cuda:{index}' but this process sees {visible} GPU(s) (cuda:0..cuda:{visible - 1}"
                f"{_visible_devices()}): name one of those"
            )
        return index
    if launch.gpu_per_task and local_world > visible:
        return 0  # SLURM gave this task GPUs of its own; the first is device 0 whatever its number on the node
    if local_world > visible:
        launched = "this launch starts" if launch.launcher == "plain" else f"{launch.launcher} started"
        raise UserError(
            f"{where}: {launched} {local_world} processes on this node but each sees {visible} GPU(s)"
            f"{_visible_devices()}: run at most {visible} per node (nproc_per_node / --nproc_per_node / "
            f"--ntasks-per-node), or give each SLURM task a GPU of its own (--gpus-per-task=1)"
        )
    return local_rank


def _visible_devices() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f", CUDA_VISIBLE_DEVICES={value!r}"


def _amp_dtype(amp, device: torch.device, gpu: Gpu | None, cpu_bf16: bool, where: str):
    amp = "off" if amp in (None, False) else amp
    if amp not in AMP_CHOICES:
        raise UserError(f"amp={amp!r} in {where} is not one of {', '.join(map(repr, AMP_CHOICES))}")
    if amp == "off":
        return None
    if device.type == "cpu":
        if amp == "fp16":
            raise UserError(
                f"amp='fp16' in {where} on the CPU: fp16 is a GPU format (slower than fp32 on a CPU); "
                "set amp='auto' (bf16 where the CPU computes it natively) or amp='off'"
            )
        if amp == "bf16" and not cpu_bf16:
            raise UserError(
                f"amp='bf16' in {where}: this CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag), "
                "so it would be emulated and slower than fp32: set amp='auto' or amp='off'"
            )
        return torch.bfloat16 if cpu_bf16 else None
    capability = tuple(gpu.capability)
    if amp == "auto":
        amp = "bf16" if capability >= BF16_CAPABILITY else "fp16"
    if amp == "bf16" and capability < BF16_CAPABILITY:
        raise UserError(
            f"amp='bf16' in {where}: {gpu.name} (compute capability {capability[0]}.{capability[1]}) has no bf16 "
            "tensor cores; set amp='fp16' or amp='auto'"
        )
    return torch.bfloat16 if amp == "bf16" else torch.float16


def with_sync_bn(plan: DevicePlan, requested) -> DevicePlan:
    """``plan`` with SyncBatchNorm decided from the sync_bn setting (None: on when several GPU processes train;
    a config may compute it, so training decides it again from the loaded value)."""
    if plan.world_size == 1:
        return replace(plan, sync_bn=False)
    if plan.device.type != "cuda":  # torch's SyncBatchNorm raises on CPU tensors at the first step
        said = (
            "sync_bn=True ignored: SyncBatchNorm needs GPUs; each CPU process keeps its own BatchNorm statistics "
            "(rank 0's are the ones evaluated and saved)"
        )
        return replace(plan, sync_bn=False, warnings=(said,) if requested else ())
    return replace(plan, sync_bn=True if requested is None else bool(requested), warnings=())


# ---------------------------------------------------------------------------------------------------------
# What this process sees and how it was started (the only reads of torch.cuda and the launchers' variables).


def hide_cuda(request: Request) -> bool:
    """A run asked for the CPU hides CUDA from itself and every process it starts, before anything initialises
    CUDA: then neither ignite nor a library can place work on a GPU it was not given. True when hidden."""
    if str(request.device or "").strip() != "cpu":
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


def probe_machine(request: Request) -> Machine:
    """The visible GPUs (none are asked for when the run wants the CPU) and the CPU's bf16."""
    gpus = ()
    if str(request.device or "").strip() != "cpu" and torch.cuda.is_available():
        gpus = tuple(
            Gpu(
                torch.cuda.get_device_name(i),
                tuple(torch.cuda.get_device_capability(i)),
                torch.cuda.get_device_properties(i).total_memory,
            )
            for i in range(torch.cuda.device_count())
        )
    return Machine(gpus=gpus, cpu_bf16=cpu_has_bf16())


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively, from the kernel's CPU flags (False where they cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool(set(line.split(":", 1)[1].split()) & set(CPU_BF16_FLAGS))
    except OSError:
        pass
    return False


def detect_launch(environ=None, spawned_rank: int | None = None, spawned: int = 1) -> Launch:
    """How this process was started, from the launchers' variables; ``spawned_rank`` for a process a plain
    launch started itself (one of ``spawned``)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "LOCAL_RANK" in env:  # torchrun, torch.distributed.launch (also inside srun)
        world = int(env["WORLD_SIZE"])
        return Launch(
            "torchrun",
            world,
            int(env.get("RANK", 0)),
            int(env["LOCAL_RANK"]),
            int(env.get("LOCAL_WORLD_SIZE", world)),
            gpu_per_task=False,
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1:
        return Launch(
            "slurm",
            tasks,
            int(env.get("SLURM_PROCID", 0)),
            int(env.get("SLURM_LOCALID", 0)),
            _slurm_tasks_on_this_node(env, tasks),
            gpu_per_task=_slurm_binds_gpus(env),
        )
    if spawned_rank is not None:
        return Launch("plain", spawned, spawned_rank, spawned_rank, spawned)
    return Launch()


def _slurm_tasks_on_this_node(env, tasks: int) -> int:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of the first 3
    nodes, then 1) and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return tasks
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return tasks
        counts += [int(match[1])] * int(match[2] or 1)
    node = int(env.get("SLURM_NODEID", 0) or 0)
    return counts[node] if node < len(counts) else counts[-1]


def _slurm_binds_gpus(env) -> bool:
    # --gpus-per-task / --ntasks-per-gpu give each task its own CUDA_VISIBLE_DEVICES, numbered from 0.
    return bool(
        env.get("SLURM_GPUS_PER_TASK") or env.get("SLURM_NTASKS_PER_GPU") or "gpu" in env.get("SLURM_TRES_PER_TASK", "")
    )


# ---------------------------------------------------------------------------------------------------------
# The plan of this process, and what follows from it.

_adopted: list = []


def plan_process(request: Request, spawned_rank: int | None = None, spawned: int = 1) -> DevicePlan:
    """Decides this process's plan (hiding CUDA first when it asks for the CPU) and adopts it, unless the plan
    is to start processes that will each decide their own (this one then never touches a GPU)."""
    hide_cuda(request)
    plan = decide(request, probe_machine(request), detect_launch(spawned_rank=spawned_rank, spawned=spawned))
    _adopted.clear()
    if plan.spawn == 1:
        adopt(plan)
    return plan


def adopt(plan: DevicePlan) -> None:
    _adopted[:] = [plan]
    if plan.device.type == "cuda":
        # Before the process group and before the config builds anything: NCCL and every "cuda" tensor go to
        # this rank's GPU, not to cuda:0 of every rank.
        torch.cuda.set_device(plan.device)


def release() -> None:
    """Forgets the adopted plan (a run in this process has ended)."""
    _adopted.clear()


def current() -> DevicePlan | None:
    """The plan this process adopted; None outside a run (a config loaded by a test or a benchmark)."""
    return _adopted[0] if _adopted else None


def for_inference(device: str | None, amp, where: str) -> DevicePlan:
    """The plan of a single-process script (predict, submission, export): it names its device everywhere."""
    request = Request(device=device, amp=amp, where=where)
    hide_cuda(request)
    return decide(request, probe_machine(request), Launch())


def place_model(model: torch.nn.Module, plan: DevicePlan) -> torch.nn.Module:
    """The model on the plan's device; across processes SyncBN (when planned) and DDP. Never DataParallel."""
    if plan.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(plan.device)
    if plan.ddp:
        ids = [plan.device.index] if plan.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def synchronize(plan: DevicePlan | None) -> None:
    """Waits for the device's queued work, so that a timestamp taken next counts it."""
    if plan is not None and plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)


def reset_peak_memory(plan: DevicePlan | None) -> None:
    if plan is not None and plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)


def peak_memory(plan: DevicePlan | None) -> dict:
    """The GPU's peak reserved bytes (what running out of memory is measured against) next to its total and
    the allocated peak; on the CPU the process's peak resident memory."""
    if plan is not None and plan.device.type == "cuda":
        return {
            "reserved": float(torch.cuda.max_memory_reserved(plan.device)),
            "allocated": float(torch.cuda.max_memory_allocated(plan.device)),
            "total": float(torch.cuda.get_device_properties(plan.device).total_memory),
        }
    import resource
    import sys

    rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
    return {"reserved": rss, "allocated": rss, "total": None}
