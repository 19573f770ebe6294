"""Flags bounded by what fits, real photos up to a stated size: inf and nan refused while parsing, sizes
checked against the memory there is before any work, running out of memory reported as what it is, the
project's own pixel limit (a 108-megapixel phone photo is read, a decompression bomb is refused by name)."""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_here, skimage_photos, write_photo_set
from smalldata import cli, images, memory
from smalldata.cli import UsageError
from test_reliability import png_bomb, small_checkpoint


@pytest.mark.parametrize("kind, text", [(cli.positive_float, "inf"), (cli.positive_float, "nan"),
                                        (cli.nonnegative_float, "inf"), (cli.share, "nan"),
                                        (cli.positive_float, "-inf"), (cli.positive_int, str(2**31))])
def test_number_types_refuse_what_no_step_can_use(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)
    assert cli.positive_int(str(2**31 - 1)) == 2**31 - 1 and cli.positive_float("1e30") == 1e30


LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, file=sys.stderr)
"""


def peak_memory(argv):
    """(exit code, peak resident bytes, stderr) of `python argv`. Started from a small launcher process: a
    child forked from this test process would count the test process's own memory in its peak."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, timeout=300)
    *err, last = proc.stderr.rstrip("\n").split("\n")
    code, peak = map(int, last.split())
    return code, peak, "\n".join(err) + "\n"


def test_ocm_at_img_size_100000_exits_2_within_seconds_and_under_2_gb(tmp_path):
    """The issue's command took 20 GB and was killed by the kernel (exit 137); now the estimate refuses it
    before any photo is decoded."""
    train = write_photo_set(tmp_path / "data" / "train", per_class=2, size=48, classes=["chelsea", "coffee"])
    start = time.monotonic()
    code, peak, err = peak_memory([str(REPO / "make_cutmix.py"), "--src", str(train), "--dst", str(tmp_path / "ocm"),
                                   "--img-size", "100000", "--count", "3"])
    seconds = time.monotonic() - start
    assert code == 2, err
    assert seconds < 20 and peak < 2 * 2**30, (seconds, peak)
    assert err.startswith("error: --img-size 100000: OCM from 4 photos at that size would need about") and \
        "the largest --img-size that fits is" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ocm").exists()


def test_the_largest_value_named_fits_and_one_more_does_not():
    available = 10 * 2**30
    with pytest.raises(UsageError) as e:
        memory.check_ocm(100, 500, 100_000, available=available)
    best = int(str(e.value).rsplit(" ", 1)[1])
    memory.check_ocm(100, 500, best, available=available)
    with pytest.raises(UsageError):
        memory.check_ocm(100, 500, best + 1, available=available)
    with pytest.raises(UsageError, match="the largest --batch-size that fits is"):
        memory.check_scoring(10**9, 256)
    with pytest.raises(UsageError, match="no value fits"):
        memory.check_decoding([10, 2], 1, available=0)


@pytest.mark.parametrize("what, allocation, resource", [
    ("numpy", "numpy.empty(10**15, numpy.uint8)", "out of RAM"),
    ("torch on the CPU", "torch.empty(10**15, dtype=torch.uint8)", "out of RAM"),
    # (no GPU here: the error CUDA's caching allocator raises, raised as it raises it)
    ("torch on a GPU", "(_ for _ in ()).throw(torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 80 GiB'))",
     "out of GPU memory")])
def test_running_out_of_memory_is_exit_2_with_the_flag_to_change_not_a_bug(what, allocation, resource):
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\nimport numpy, torch\nfrom smalldata import cli\n"
            f"cli.run(lambda argv: {allocation}, memory_hint='lower --img-size')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {resource}") and "lower --img-size" in r.stderr and "bug" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory):
    """A valid 12000 x 9000 JPEG (108 megapixels, a phone's high-resolution mode) of a real photo."""
    path = tmp_path_factory.mktemp("phone") / "big.jpg"
    Image.fromarray(skimage_photos()["coffee"]).resize((12000, 9000), Image.Resampling.BILINEAR).save(path, quality=80)
    return path


def test_a_108_megapixel_photo_is_read_and_trained_on(phone_photo, tmp_path):
    img = images.open_rgb(phone_photo)
    assert img.size == (12000, 9000) and img.mode == "RGB"
    del img
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=2, size=32, classes=["chelsea", "coffee"])
    write_photo_set(data / "val", per_class=1, size=32, classes=["chelsea", "coffee"])
    os.link(phone_photo, data / "train" / "coffee" / "big.jpg")
    r = run_here("model_1e-4.py", "--data", data, "--out", tmp_path / "ck", "--arch", "resnet18", "--img-size", "32",
                 "--batch-size", "4", "--epochs", "1", "--weights", "none", "--device", "cpu", "--no-br", "--no-ocm")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images: train 5, val 2 at 32 px" in r.stdout and "skipped" not in r.stderr


def test_a_decompression_bomb_is_refused_by_name_before_it_is_decoded(tmp_path):
    png_bomb(tmp_path / "bomb.png")  # 30000 x 30000: over twice the limit, Pillow itself stops it
    png_bomb(tmp_path / "large.png", side=17000)  # 289 megapixels: between the limit and twice it
    for name, count in (("bomb.png", "more than 500,000,000"), ("large.png", "17000x17000 = 289,000,000")):
        with pytest.raises(images.BadImage) as e:
            images.open_rgb(tmp_path / name)
        assert str(e.value).endswith(f"refused as a possible decompression bomb: too many pixels ({count}; the limit "
                                     "is 250,000,000, --max-pixels raises it)"), str(e.value)


def test_max_pixels_sets_the_limit_of_every_script_that_decodes(tmp_path):
    train = write_photo_set(tmp_path / "photos", per_class=2, size=48, classes=["chelsea", "coffee"])
    try:
        ocm = run_here("make_cutmix.py", "--src", train, "--dst", tmp_path / "ocm", "--max-pixels", "2000")
        assert ocm.returncode == 2 and "(48x48 = 2,304; the limit is 2,000, --max-pixels raises it)" in ocm.stderr
        score = run_here("check_score.py", "--checkpoint", small_checkpoint(tmp_path / "m.pth", ["chelsea", "coffee"]),
                         "--data", train, "--out", tmp_path / "score", "--device", "cpu", "--max-pixels", "2000")
        assert score.returncode == 2 and "decompression bomb" in score.stderr and "none of the 4 files" in score.stderr
        assert images.MAX_PIXELS == 2000
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)  # (this process's other tests read photos too)
    assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS


def test_no_image_over_the_limit_is_made_by_resizing():
    """Pillow would fill memory a block at a time until the kernel killed the process (exit 137)."""
    with pytest.raises(UsageError, match="the largest --img-size under it is 15811"):
        images.resize_square(Image.new("RGB", (4, 4)), 20000)
    assert np.asarray(images.resize_square(Image.new("RGB", (4, 4)), 64)).shape == (64, 64, 3)


@pytest.mark.parametrize("flag, value, what", [("--img-size", "100000", "decoding 10 photos"),
                                               ("--batch-size", "2000000", "training vgg13_bn")])
def test_stage_1_sizes_that_cannot_train_exit_2_before_any_photo_is_decoded(flag, value, what, tmp_path):
    """The decoded photos (host memory), then one training step's memory (activations counted on the meta
    device, weights, gradients and Adam's moments) against the training device's: refused in seconds,
    naming the largest value that fits."""
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=2, size=32, classes=["chelsea", "coffee"])
    write_photo_set(data / "val", per_class=1, size=32, classes=["chelsea", "coffee"])
    sizes = {"--img-size": "64", "--batch-size": "8", flag: value}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "model_1e-4.py"), "--data", str(data), "--out",
                           str(tmp_path / "ck"), "--arch", "vgg13_bn", "--weights", "none", "--device", "cpu",
                           "--no-br", "--no-ocm", *[x for kv in sizes.items() for x in kv]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert proc.stderr.startswith(f"error: {flag} {value}: {what}") and \
        f"the largest {flag} that fits is" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "decode" not in proc.stdout


def test_a_training_step_estimate_grows_with_the_batch_and_the_square_of_the_size():
    one, two = memory.training_bytes("resnet18", 1, 64), memory.training_bytes("resnet18", 2, 64)
    weights = one - (two - one)
    assert weights == 16 * sum(p.numel() for p in __import__("torchvision").models.resnet18(num_classes=2).parameters())
    assert memory.training_bytes("resnet18", 1, 128) - weights == pytest.approx(4 * (one - weights), rel=0.05)
