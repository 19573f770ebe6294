"""Where and how the model runs: device, seeds, determinism and mixed precision, chosen once; and,
under torchrun, the process group (NCCL on GPUs, gloo on CPUs) and the few collectives training needs."""
import contextlib
import datetime
import functools
import os

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


def join_cpu_group():
    """Join a gloo group of every torchrun worker, without a GPU (background removal's workers), whose
    waits have no practical time limit."""
    if not distributed():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))


def barrier():
    """Wait for every torchrun worker (nothing in a plain run)."""
    if distributed():
        dist.barrier()


def teardown():
    if distributed():
        dist.destroy_process_group()


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
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
