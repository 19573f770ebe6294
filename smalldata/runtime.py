"""Where and how the model runs: device, seeds, determinism and mixed precision, chosen once; and,
under torchrun, the process group (NCCL on GPUs, gloo on CPUs) and the few collectives training needs."""
import contextlib
import datetime
import functools
import ipaddress
import os
import shutil
import socket
import subprocess

import torch
import torch.distributed as dist

from .cli import UsageError


def world():
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain run."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main():
    return world()[0] == 0


def distributed():
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun():
    """True under torchrun, even with one worker (which then still trains through DDP: its overhead is
    measured by bench/gpu_check.sh)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def all_sum(*values):
    """Sum each scalar tensor over all workers (one collective); the tensors as they are in a plain run."""
    if not distributed():
        return values
    stacked = torch.stack([v.double() for v in values])
    dist.all_reduce(stacked)
    return tuple(stacked.unbind())


def all_sum_tensor(tensor):
    """`tensor` summed over all workers, in place (one collective); as it is in a plain run."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def all_min(tensor):
    """`tensor` replaced by its minimum over all workers, in place; as it is in a plain run."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


@functools.cache
def patient_group():
    """A gloo group whose waits have no practical time limit: for waiting on work of unknown length, such
    as rank 0 decoding 100k photos, which NCCL's watchdog (10 minutes by default) would kill."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes the decode cache), the other workers after it (they read it)."""
    group = patient_group() if distributed() else None
    if distributed() and not is_main():
        dist.barrier(group=group)
    yield
    if distributed() and is_main():
        dist.barrier(group=group)


def all_arrive():
    """Wait, without a time limit, until every torchrun worker is here (nothing in a plain run). Called
    after the data are loaded: NCCL's first collective (DDP's constructor) times out after 10 minutes,
    and a worker reading a large decode cache from a slow file system may need longer."""
    if distributed():
        dist.barrier(group=patient_group())


def same_everywhere(value, what):
    """Refuse, on every torchrun worker alike, when the workers hold different integers `value`; `what`
    says what the value is and what to do (one line)."""
    if not distributed():
        return
    ends = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(ends, op=dist.ReduceOp.MIN, group=patient_group())
    if int(ends[0]) != -int(ends[1]):
        raise UsageError(f"the torchrun workers disagree: {what} ranges from {int(ends[0])} to {-int(ends[1])} "
                         "across them")


def gather(obj):
    """Every worker's `obj`, in rank order (a small picklable object; [obj] in a plain run)."""
    if not distributed():
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj, group=patient_group())
    return out


def join_cpu_group():
    """Join a gloo group of every torchrun worker, without a GPU (background removal's workers), whose
    waits have no practical time limit."""
    if not distributed():
        check_gloo_interface()
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))


def gloo_interface_problem(env=os.environ, hostname=None):
    """What would stop gloo's workers on several machines from reaching each other, in one line; None
    when nothing would. Without GLOO_SOCKET_IFNAME gloo binds to the address the hostname resolves to,
    which on many Ubuntu hosts is 127.0.1.1 (/etc/hosts): the other machines then wait until a timeout.
    Every multi-machine run needs gloo, also on GPUs (patient_group); one machine needs nothing."""
    nodes_apart = int(env.get("WORLD_SIZE", 1)) > int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    if not nodes_apart:
        return None
    present = [name for _, name in socket.if_nameindex()]
    example = next((name for name in present if name != "lo"), present[0])
    fix = (f"set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the interface the machines reach each "
           f"other on, one of: {', '.join(present)} (e.g. GLOO_SOCKET_IFNAME={example})")
    wanted = [name for name in env.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    if wanted:
        missing = [name for name in wanted if name not in present]
        return f"GLOO_SOCKET_IFNAME names {', '.join(missing)}, which this machine lacks; {fix}" if missing else None
    hostname = hostname or socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError as e:
        return f"a run on several machines, and this machine's hostname {hostname!r} does not resolve ({e}); {fix}"
    if ipaddress.ip_address(address).is_loopback:
        return (f"a run on several machines, and gloo would bind to {address}, the loopback address this "
                f"machine's hostname {hostname!r} resolves to, which the other machines cannot reach; {fix}")
    return None


def check_gloo_interface():
    """Stop (exit 2) before a multi-machine process group is joined that would hang; see gloo_interface_problem."""
    problem = gloo_interface_problem()
    if problem:
        raise UsageError(problem)


def barrier():
    """Wait for every torchrun worker (nothing in a plain run)."""
    if distributed():
        dist.barrier()


def teardown():
    if distributed():
        dist.destroy_process_group()


def listed_gpus():
    """The GPUs `nvidia-smi -L` lists ([] without nvidia-smi, or when it finds none). Not when the GPUs
    are hidden on purpose (CUDA_VISIBLE_DEVICES empty or -1): then the CPU is what was asked for."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1") or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def resolve_device(name):
    """--device: auto is the GPU when torch sees one. On a machine whose GPU torch cannot use (a CPU-only
    build, a driver older than the build needs), auto stops instead of training for hours on the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        gpus = listed_gpus() if name == "cpu" else []
        if gpus:
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(f"nvidia-smi lists {gpus[0].split(' (UUID')[0]}, but torch {torch.__version__} "
                             f"({build}) cannot use it; bash tools/setup.sh names the torch build or driver "
                             "this machine needs; to run on the CPU anyway, give --device cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no GPU; use --device cpu")
    return torch.device(name)


def amp_dtype(device):
    """bf16 where the GPU computes it natively, fp16 (with a GradScaler) on older GPUs, none on the CPU.

    `including_emulation=False`: T4 and V100 only emulate bf16, slowly; they get fp16.
    """
    if device.type != "cuda":
        return None  # float32 is the CPU reference
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(dtype):
    """Loss scaling, needed by fp16 only; a no-op object otherwise, so the step has no if/else."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def setup(device_name, seed, deterministic=False):
    """Device, seeds and the speed switches for a training run; returns (device, amp dtype or None).
    Under torchrun each worker takes the GPU of its local rank and joins the process group."""
    device = resolve_device(device_name)
    _, size, local = world()
    if device.type == "cuda":  # an explicit index: the one GPU this process uses (torchrun: its local rank's)
        if size > 1:
            torch.cuda.set_device(local)
        device = torch.device("cuda", torch.cuda.current_device())
    if (size > 1 or launched_by_torchrun()) and not distributed():
        check_gloo_interface()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)  # the same on every worker: the model is built alike (train.make_loop reseeds)
    if deterministic:
        # cuBLAS needs a fixed workspace to repeat itself; a few CUDA kernels (adaptive pooling's
        # backward among them) have no deterministic version and only warn.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, amp_dtype(device)


def seed_worker(seed):
    """Seed this worker's own random numbers (dropout) apart from the others: seed + rank. The shared
    draws (batch order, augmentation) come from a generator seeded alike on every worker."""
    torch.manual_seed(seed + world()[0])


def describe(device, dtype):
    """One banner line: the device and the number format (and, under torchrun, the workers)."""
    size = world()[1]
    workers = (f"; {size} worker{'s' if size > 1 else ''} (torchrun, DistributedDataParallel over "
               f"{dist.get_backend()})") if distributed() else ""
    if device.type != "cuda":
        return f"device cpu, float32 (mixed precision is for GPUs){workers}"
    name = torch.cuda.get_device_name(device)
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]
    return f"device {device} ({name}), {precision}, channels_last{workers}"
