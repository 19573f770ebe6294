"""Where and how the model runs: device, seeds, determinism and mixed precision, chosen once."""
import contextlib
import os

import torch

from .cli import UsageError


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
    """Device, seeds and the speed switches for a training run; returns (device, amp dtype or None)."""
    device = resolve_device(device_name)
    torch.manual_seed(seed)
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


def describe(device, dtype):
    """One banner line: the device and the number format."""
    if device.type != "cuda":
        return "device cpu, float32 (mixed precision is for GPUs)"
    name = torch.cuda.get_device_name(device)
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]
    return f"device {device} ({name}), {precision}, channels_last"
