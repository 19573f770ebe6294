"""What each epoch measures: exact BatchNorm statistics (any batch size, any number of workers), the
standard error of a mean loss, the augmentation presets and the weight averages."""
import json
import math
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from test_ddp import torchrun
from test_runtime import tiny_data, tiny_loop
from smalldata.augment import PRESETS, Augment
from smalldata.averages import EMA, SWA
from smalldata.train import evaluate, precise_bn, train_epoch


def two_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def direct_statistics(model, x):
    """Layer by layer, over all images at once: each BatchNorm's input mean and (unbiased) variance, that
    input computed with the layers before it normalised by their own statistics so found."""
    stats, h = [], x
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.BatchNorm2d):
                mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
                stats.append((mean, var))
                h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + layer.eps)
                h = h * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
            else:
                h = layer(h)
    return stats


def test_precise_bn_statistics_are_exact_whatever_the_batch_size():
    x, y = tiny_data(n=45, size=12)
    results = []
    for chunk in (7, 64):  # seven passes cut short, or one pass over the whole set
        loop = tiny_loop(two_bn_model(), batch_size=8)
        with torch.no_grad():
            for bn in (loop.model[1], loop.model[4]):  # statistics far from the truth
                bn.running_mean.fill_(3.0)
                bn.running_var.fill_(0.01)
        precise_bn(loop, x, chunk=chunk)
        results.append([(bn.running_mean.clone(), bn.running_var.clone()) for bn in (loop.model[1], loop.model[4])])
    truth = direct_statistics(loop.model, loop.norm(x))
    for got in results:
        for (mean, var), (true_mean, true_var) in zip(got, truth):
            torch.testing.assert_close(mean, true_mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(var, true_var, rtol=1e-5, atol=1e-5)


def test_precise_bn_statistics_of_two_gloo_workers_equal_one_process(tmp_path):
    worker = REPO / "tests" / "ddp_worker.py"
    one = subprocess.run([sys.executable, worker, tmp_path / "one.json", "bn", "64"], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    for chunk in ("64", "7"):  # each worker's share in one pass, or in passes of 7 images
        two = torchrun(worker, tmp_path / f"two{chunk}.json", "bn", chunk)
        assert two.returncode == 0, two.stderr[-3000:]
        a, b = (json.loads((tmp_path / n).read_text()) for n in ("one.json", f"two{chunk}.json"))
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_the_loss_comes_with_the_standard_error_of_a_mean():
    loop = tiny_loop()
    x, y = tiny_data(n=30)
    train_epoch(loop, x, y)
    loss, se, acc = evaluate(loop, x, y)
    loop.model.eval()
    with torch.no_grad():
        per_image = F.cross_entropy(loop.model(loop.norm(x)), y, reduction="none").double().numpy()
    assert math.isclose(loss, per_image.mean(), rel_tol=1e-5)
    assert math.isclose(se, per_image.std(ddof=1) / math.sqrt(len(per_image)), rel_tol=1e-4)
    _, _, _, each = evaluate(loop, x, y, per_image=True)
    assert len(each.correct) == 30 and 100 * each.correct.count("1") / 30 == acc
    np.testing.assert_allclose(each.losses, per_image, rtol=1e-4, atol=1e-5)  # each photo's own loss, in order


def test_augment_none_trains_on_the_photos_as_they_are_and_the_others_change_them():
    x, _ = tiny_data(n=4, size=16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(Augment("none")(x, g), x.float())
    for name in PRESETS:
        if name != "none":
            assert not torch.equal(Augment(name)(x, g), x.float())


def test_a_new_augmentation_is_one_function_and_one_preset_entry(monkeypatch):
    from smalldata import augment

    def invert(n, generator, p=1.0):
        """Pixel values turned over (a test's own operation)."""
        return augment.Pixels(torch.rand(n, 1, generator=generator), lambda x, draws: (1 - x) * (draws < p).view(-1, 1, 1, 1))

    monkeypatch.setitem(augment.PRESETS, "inverted", [(invert, {})])
    x, _ = tiny_data(n=4, size=16)
    assert torch.allclose(Augment("inverted")(x, torch.Generator()), 255 - x.float(), atol=1e-3)
    assert augment.definition("inverted") == [["invert", {"p": 1.0}]] and "invert(p=1)" in augment.describe("inverted")


def test_a_flip_and_crop_of_the_whole_photo_move_pixels_as_said():
    from smalldata import augment

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    flipped = Augment("none")
    flipped.ops = [(augment.flip, {"p": 1.0})]
    assert torch.equal(flipped(x, torch.Generator()), x.flip(-1).float())
    whole = Augment("none")
    whole.ops = [(augment.crop, {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)})]
    torch.testing.assert_close(whole(x, torch.Generator()), x.float(), atol=1e-3, rtol=0)


def test_swa_is_the_mean_of_the_last_epochs_weights_and_ema_follows_each_step():
    loop = tiny_loop()
    x, y = tiny_data(n=12)
    swa, ema = SWA(loop.model, 3), EMA(loop.model, 1.0)
    snapshots = {}
    for epoch in range(1, 9):
        train_epoch(loop, x, y)
        ema.after_step(loop.model, steps_per_epoch=3)
        snapshots[epoch] = {k: v.clone() for k, v in loop.model.state_dict().items()}
    assert swa.held(8) == {6, 7, 8}  # a trailing window: the last 3 epochs
    swa.prepare(snapshots, 8)
    for name, avg in swa.model.named_parameters():
        torch.testing.assert_close(avg, (snapshots[6][name] + snapshots[7][name] + snapshots[8][name]) / 3)
    assert "epochs 6-8" in swa.describe()
    swa.prepare({e: s for e, s in snapshots.items() if e >= 7}, 8)  # an epoch the run never had is said
    assert "epochs 7-8 (the run had 2 of the window's 3)" in swa.describe()
    assert ema.updates == 8 and not all(torch.equal(a, b) for a, b in zip(ema.model.parameters(),
                                                                           loop.model.parameters()))
