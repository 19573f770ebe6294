"""Will it fit? Estimates of the memory a step will need (the host's, or a GPU's for training), checked before any work starts.

A flag that asks for more than the machine has (`--img-size 100000`) would otherwise be found out by
the kernel, which kills the process (exit 137) after it has taken every byte. Each check here turns
that into one line and exit 2, naming the largest value that would fit. The estimates count the
arrays the pipeline keeps (uint8 images of img_size x img_size x 3) and what is decoded ahead; they
are for refusing what cannot work, not for planning to the last megabyte.
"""
import os
import resource
from pathlib import Path

from .cli import UsageError

SHARE = 0.8  # of the available memory a step may plan to fill: the rest is Python, the libraries, the system
AHEAD = 64  # images decoded or written ahead of the consumer (images.decode_many)


def host_available():
    """Bytes this process may still take: the least of the RAM the kernel calls available, what the
    process's cgroup (a container, a systemd slice) still allows, and the address space left under
    `ulimit -v`."""
    limits = [_proc_bytes("/proc/meminfo", "MemAvailable"), _cgroup_room()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - (_proc_bytes("/proc/self/status", "VmSize") or 0))
    if limits[0] is None:  # (no /proc: what sysconf says is free)
        limits[0] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(0, min(v for v in limits if v is not None))


def _proc_bytes(path, key):
    """A "Key: N kB" line of a /proc file, in bytes; None without it."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _cgroup_room():
    """What this process's memory cgroup and those above it still allow: the least of each one's limit less
    its usage (page cache it can drop not counted); None without a limit."""
    rooms = []
    for folder, limit, usage in _cgroup_files():
        try:
            text = (folder / limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:  # (v1 writes a huge number for "no limit")
                continue
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            rooms.append(int(text) - int((folder / usage).read_text()) + int(stat.get("inactive_file", 0)))
        except (OSError, ValueError):
            continue
    return min(rooms, default=None)


def _cgroup_files():
    """(folder, limit file, usage file) of this process's memory cgroup and each one above it, cgroup v2's
    (the "0::" line of /proc/self/cgroup) and v1's (the "memory" line)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, own = line.split(":", 2)
        if controllers in ("", "memory"):
            root, names = (Path("/sys/fs/cgroup"), ("memory.max", "memory.current")) if not controllers else \
                (Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))
            folder = root / own.lstrip("/")
            for level in [folder, *folder.parents]:
                if level == root.parent:
                    break
                yield (level, *names)


# ---------------------------------------------------------------- what each step holds

def image_bytes(img_size):
    return 3 * img_size * img_size


def ocm_bytes(photos, count, img_size):
    """make_cutmix.py: every source photo squeezed to img_size, and the mixes being encoded and written
    (each with its PNG)."""
    return (photos + 2 * min(AHEAD, count)) * image_bytes(img_size)


def decoding_bytes(counts, img_size):
    """The training stages' decoding (data.load_images): every folder's images (the counts, one per
    folder) as uint8, plus one copy of the largest while its decoded photos are stacked, plus those
    decoded ahead."""
    return (sum(counts) + max(counts, default=0) + AHEAD) * image_bytes(img_size)


def scoring_bytes(batch_size, img_size, tta=False):
    """check_score.py's host side: two batches decoded ahead and one in use (uint8), the batch as float32
    (twice with --tta), and the softmax; the model's own activations come on top."""
    return batch_size * image_bytes(img_size) * (3 + 4 * (2 if tta else 1))


# ---------------------------------------------------------------- the checks

def check(flag, value, need, what, available=None):
    """Refuse `flag value` (UsageError) when need(value), the bytes it would take, is over SHARE of the
    available memory; the message names the largest value that fits. `need` must grow with the value."""
    available = host_available() if available is None else available
    budget = SHARE * available
    if need(value) <= budget:
        return
    lo, hi = 0, value  # need(lo) fits (or lo is 0), need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
    fits = f"the largest {flag} that fits is {lo}" if lo else "no value fits: free some memory first"
    raise UsageError(f"{flag} {value}: {what} would need about {_gb(need(value))} of memory, but this machine has "
                     f"{_gb(available)} available; {fits}")


def _gb(nbytes):
    return f"{nbytes / 2**30:.1f} GB" if nbytes < 2**40 else f"{nbytes / 2**40:,.0f} TB"


def check_ocm(photos, count, img_size, available=None):
    check("--img-size", img_size, lambda s: ocm_bytes(photos, count, s), f"OCM from {photos} photos at that size",
          available)


def check_decoding(counts, img_size, available=None):
    """For the training stages, before decoding: `counts` are the photos of each folder (train, br, ocm,
    val, watch)."""
    check("--img-size", img_size, lambda s: decoding_bytes(counts, s),
          f"decoding {sum(counts)} photos at that size", available)


def check_scoring(batch_size, img_size, tta=False, available=None):
    check("--batch-size", batch_size, lambda b: scoring_bytes(b, img_size, tta),
          f"scoring batches of that many {img_size} px photos", available)


def training_bytes(arch, batch, img_size, activation_bytes=4):
    """One training step of `arch` on its device: the activations autograd keeps for the backward pass
    (every module's output, counted on PyTorch's meta device: shapes only, no memory), for `batch` images,
    plus the weights, their gradients and Adam's two moments (float32). None when the model cannot be
    built on the meta device (the run finds out itself)."""
    import torch

    from .model import meta_model

    kept = [0]

    def count(module, inputs, output):  # (an in-place ReLU's output is its input's memory: not counted again)
        if not list(module.children()) and torch.is_tensor(output) and not getattr(module, "inplace", False):
            kept[0] += output.numel()

    try:
        model = meta_model(arch)
        hook = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            model.train()(torch.empty(2, 3, img_size, img_size, device="meta"))  # (2: BatchNorm trains on 2 or more)
        finally:
            hook.remove()
    except Exception:  # noqa: BLE001 - not buildable or not at this size: check_input says which
        return None
    weights = sum(p.numel() for p in model.parameters())
    return batch * kept[0] // 2 * activation_bytes + 4 * 4 * weights


def check_training(arch, batch, img_size, device, amp):
    """For the training stages, before any photo is decoded: one step at --batch-size (this worker's share)
    and --img-size must fit the training device's free memory (a GPU's, or the host's)."""
    import torch

    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"GPU memory ({torch.cuda.get_device_name(device)})"
    else:
        available, where = host_available(), "memory"
    width = 2 if amp else 4

    def need(b, s):
        return training_bytes(arch, b, s, width) or 0

    if need(1, img_size) > SHARE * available:
        check("--img-size", img_size, lambda s: need(batch, s), f"training {arch} on batches of {batch} there",
              available)
    check("--batch-size", batch, lambda b: need(b, img_size), f"training {arch} at {img_size} px ({where})",
          available)
