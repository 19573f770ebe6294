"""Run by tests/test_ddp.py, with and without torchrun: the training loop's own functions on a small
model without BatchNorm or dropout (so that one process and two workers must agree to rounding), on
fixed random images. Rank 0 writes what it measured to the JSON file named by argv[1]."""
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata import IMAGENET_MEAN, IMAGENET_STD, runtime  # noqa: E402
from smalldata.settings import Optimiser  # noqa: E402
from smalldata.train import evaluate, make_loop, precise_bn, train_epoch  # noqa: E402


def batchnorm_statistics():
    """Exact precise-BN statistics of a small BatchNorm model on fixed images (argv[2]: mode "bn")."""
    device, amp = runtime.setup("cpu", seed=0, deterministic=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3),
                          nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    loop = make_loop(model, Optimiser(lr=1e-2, batch_size=8), device, amp, IMAGENET_MEAN, IMAGENET_STD)
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 45
    x = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    precise_bn(loop, x, chunk=int(sys.argv[3]))
    if runtime.is_main():
        stats = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}
        Path(sys.argv[1]).write_text(json.dumps(stats))
    runtime.teardown()


def dropout_masks():
    """Each worker's dropout mask after make_loop, and its model's first weights (argv[2]: mode "dropout")."""
    device, amp = runtime.setup("cpu", seed=0, deterministic=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    make_loop(model, Optimiser(lr=1e-2, batch_size=8), device, amp, IMAGENET_MEAN, IMAGENET_STD)
    mask = (model[2](torch.ones(64)) > 0).int()
    got = [None] * runtime.world()[1]
    torch.distributed.all_gather_object(got, {"mask": mask.tolist(), "weights": model[1].weight.flatten().tolist()})
    if runtime.is_main():
        Path(sys.argv[1]).write_text(json.dumps(got))
    runtime.teardown()


def slow_worker_arrives():
    """A worker that is still loading when the others are done (argv[2]: "arrive", argv[3]: "wait" or
    "no-wait"): with runtime.all_arrive the first collective of the default group (3 s timeout) waits for
    it; without, it times out. Rank 0 writes "ok" when the collective went through."""
    import datetime
    import time

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    with runtime.main_first():
        if runtime.world()[0] == 2:
            time.sleep(8)  # reading a large decode cache from a slow file system
    if sys.argv[3] == "wait":
        runtime.all_arrive()
    total = torch.ones(1)
    torch.distributed.all_reduce(total)  # (DDP's constructor begins with such a collective)
    if runtime.is_main():
        Path(sys.argv[1]).write_text(f"ok {int(total)}")
    runtime.teardown()


def workers_disagree():
    """Each worker resumes after another epoch (argv[2]: "agree"): each writes what same_everywhere said."""
    runtime.setup("cpu", seed=0)
    try:
        runtime.same_everywhere(runtime.world()[0], "the epoch each resumes after")
        said = "agreed"
    except Exception as e:  # noqa: BLE001 - what it raised is the result
        said = f"{type(e).__name__}: {e}"
    Path(f"{sys.argv[1]}.{runtime.world()[0]}").write_text(said)
    runtime.teardown()


def dropout_after_a_resume():
    """Each worker's dropout mask after a save and a restore, against the mask it draws without them
    (argv[2]: "rng"); rank 0 writes every worker's."""
    from smalldata.train import restore_training_state, rng_state, training_state

    device, amp = runtime.setup("cpu", seed=0, deterministic=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    loop = make_loop(model, Optimiser(lr=1e-2, batch_size=8), device, amp, IMAGENET_MEAN, IMAGENET_STD)
    model[2](torch.ones(64))  # an epoch's worth of draws
    state = training_state(loop, [], {}, ranks=runtime.gather(rng_state(loop)))
    on = (model[2](torch.ones(64)) > 0).int().tolist()
    torch.manual_seed(12345)  # (a new process)
    restore_training_state(loop, state)
    resumed = (model[2](torch.ones(64)) > 0).int().tolist()
    got = runtime.gather({"uninterrupted": on, "resumed": resumed})
    if runtime.is_main():
        Path(sys.argv[1]).write_text(json.dumps(got))
    runtime.teardown()


def main():
    device, amp = runtime.setup("cpu", seed=0, deterministic=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.arange(48) % 3
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    loop = make_loop(model, Optimiser(lr=1e-2, batch_size=8, no_precise_bn=True), device, amp, IMAGENET_MEAN,
                     IMAGENET_STD)
    rows = []
    for _ in range(2):
        loss, acc, _ = train_epoch(loop, x, y)
        rows.append({"train": [loss, acc], "eval": list(evaluate(loop, x[:45], y[:45]))})  # loss, its SE, acc  # 45: uneven shares
    if runtime.is_main():
        weights = {k: v.flatten().tolist() for k, v in loop.model.state_dict().items()}
        Path(sys.argv[1]).write_text(json.dumps({"rows": rows, "weights": weights, "world": runtime.world()[1]}))
    runtime.teardown()


if __name__ == "__main__":
    {"bn": batchnorm_statistics, "dropout": dropout_masks, "arrive": slow_worker_arrives, "agree": workers_disagree,
     "rng": dropout_after_a_resume}.get(sys.argv[2] if len(sys.argv) > 2 else "", main)()
