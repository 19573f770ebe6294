"""The decode cache (smalldata/cache.py) on real photo files: read back equal, rebuilt only on change."""
import os
from pathlib import Path

import numpy as np
import torch

from conftest import write_photo_set
from smalldata import IMAGENET_MEAN, IMAGENET_STD, cache
from smalldata.cli import Problems
from smalldata.data import Stacked, device_batches, load_images, placement
from smalldata.folders import scan_labelled
from smalldata.model import build_model
from smalldata.score import predict


def load(folder, img_size=24):
    problems = Problems()
    samples, _ = scan_labelled(folder)
    x, y, how, _ = load_images(samples, img_size, problems, cache_at=where(folder))
    return x, y, how, problems.items


def where(folder):
    return cache.Location(Path(folder).parent / "cache", folder)


def cache_files(folder):
    return sorted(p.name for p in where(folder).dir.iterdir())


def test_the_cache_reads_back_what_decoding_gave_and_is_rebuilt_only_when_a_file_changes(tmp_path):
    folder = write_photo_set(tmp_path / "train", per_class=2, size=40)
    (folder / "coffee" / "broken.jpg").write_bytes(b"not a photo")
    x1, y1, how1, bad1 = load(folder)
    x2, y2, how2, bad2 = load(folder)
    assert (how1, how2) == ("decoded and cached", "from cache")
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and len(y1) == 8
    assert len(bad1) == 1 and bad1 == bad2 and "broken.jpg" in bad2[0][0]  # a bad file is named on every run
    assert all(p.suffix == ".jpg" for p in folder.rglob("*") if p.is_file())  # nothing in the data folder
    first = cache_files(folder)

    assert load(folder, img_size=16)[2] == "decoded and cached"  # another size: its own cache
    assert load(folder)[2] == "from cache"

    photo = folder / "chelsea" / "chelsea_001.jpg"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))  # the photo was edited
    x3, _, how3, _ = load(folder)
    assert how3 == "decoded and cached" and torch.equal(x3, x1)  # (same pixels: only the time changed)
    after = cache_files(folder)
    assert not set(first) & set(after)  # the old 24 px cache was replaced...
    assert [n[:4] for n in after] == ["16px", "16px", "24px", "24px"]  # ...and the 16 px one kept
    assert "16 px" in cache.describe_others(where(folder).root, 24) and "rm " in cache.describe_others(where(folder).root, 24)

    (folder / "rocket" / "rocket_000.jpg").unlink()  # a photo removed
    x4, y4, how4, _ = load(folder)
    assert how4 == "decoded and cached" and len(y4) == 7


def test_a_damaged_cache_is_decoded_again(tmp_path):
    folder = write_photo_set(tmp_path / "val", per_class=1, size=40)
    x1, _, _, _ = load(folder)
    for npy in where(folder).dir.glob("*.npy"):
        npy.write_bytes(b"\x93NUMPY half")
    x2, _, how, _ = load(folder)
    assert how == "decoded and cached" and torch.equal(x1, x2)


def test_scoring_reads_the_cache_that_training_wrote(tmp_path, capsys):
    folder = write_photo_set(tmp_path / "val", per_class=2, size=40)
    (folder / "coffee" / "broken.jpg").write_bytes(b"not a photo")
    load(folder, img_size=32)  # as a training stage does
    samples, _ = scan_labelled(folder)
    model = build_model("resnet18", 4).eval()
    kwargs = dict(img_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=torch.device("cpu"), batch_size=3)
    plain_problems, cached_problems = Problems(), Problems()
    plain = predict(model, samples, problems=plain_problems, **kwargs)
    assert "decoded images: from" not in capsys.readouterr().out
    cached = predict(model, samples, problems=cached_problems, cache_at=where(folder), **kwargs)
    assert "decoded images: from" in capsys.readouterr().out
    assert plain["paths"] == cached["paths"] and len(plain["paths"]) == 8
    assert torch.equal(plain["top_i"], cached["top_i"]) and torch.equal(plain["top_p"], cached["top_p"])
    assert len(plain_problems.items) == len(cached_problems.items) == 1


def test_stacked_memory_maps_read_as_one_array_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8) for n in (5, 1, 7)]
    maps = []
    for k, part in enumerate(parts):
        np.save(tmp_path / f"{k}.npy", part)
        maps.append(np.load(tmp_path / f"{k}.npy", mmap_mode="r"))
    whole, stacked = np.concatenate(parts), Stacked(maps)
    idx = rng.permutation(13)
    assert len(stacked) == 13 and np.array_equal(stacked[idx], whole[idx])
    order = list(torch.from_numpy(idx).split(4))
    batches = list(device_batches(stacked, order, order, torch.device("cpu")))  # streamed, 3 ahead
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    assert torch.equal(torch.cat(batches), torch.from_numpy(whole[idx]))


def test_auto_placement_keeps_a_small_set_on_the_device_and_streams_one_too_large():
    cpu = torch.device("cpu")
    assert placement(10 * 2**20, cpu, "auto", True)[0] is True
    on_device, why = placement(10**15, cpu, "auto", True)  # a petabyte
    assert on_device is False and "memory-mapped from the decode cache" in why and "--data-on auto" in why
    assert placement(10**15, cpu, "device", True)[0] is True and placement(1, cpu, "stream", True)[0] is False
