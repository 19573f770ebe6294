"""tools/make_demo_data.py: the quick start's Fashion-MNIST photos, in the contract's layout."""
import os
import subprocess
import sys

from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import make_demo_data  # noqa: E402

def make(data, *args):
    """The demo-data step as command 1 runs it, on a machine with no network and no system dataset:
    every download is refused (proxy to a closed port) and /usr/share/datasets is not looked at."""
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--data", str(data), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def listing(data):
    return sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))


def test_demo_data_has_the_layout_counts_and_rgb_png_and_a_rerun_keeps_it(tmp_path):
    data = tmp_path / "data"
    r = make(data, "--train", "3", "--val", "2", "--test", "1")
    assert r.returncode == 0, r.stderr
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        folders = sorted(p.name for p in (data / split).iterdir())
        assert folders == sorted(make_demo_data.CLASSES)
        assert all(len(list((data / split / c).glob("*.png"))) == n for c in folders)
    names = [p.name for p in data.rglob("*.png")]
    assert len(names) == len(set(names)) == 60  # no photo in two splits
    with Image.open(next(data.rglob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (28, 28)

    first = listing(data)
    again = make(data, "--train", "3", "--val", "2", "--test", "1")
    assert again.returncode == 0 and "nothing to do" in again.stdout and listing(data) == first


def test_demo_data_refuses_to_write_over_a_users_photos(tmp_path):
    data = tmp_path / "data"
    mine = data / "train" / "cats" / "my_cat.jpg"
    mine.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(mine)
    r = make(data, "--train", "1", "--val", "1", "--test", "0")
    assert r.returncode == 2 and "not the demo" in r.stderr
    assert mine.exists() and not (data / "val").exists()
