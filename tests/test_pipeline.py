"""End to end: the five scripts in order, with their default folders, on real photos, real
rembg u2netp and the real vgg13_bn, at a small image size."""
import json
import subprocess

import torch
import torchvision

from conftest import REPO, run_script, write_photo_set


def git_status():
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True).stdout


CLASSES = ["astronaut", "chelsea", "coffee", "rocket"]


def image_folders_read_as_torchvision_reads_them(data):
    """torchvision's own ImageFolder on every labelled folder: the same classes as the data, nothing else."""
    for split in ("train", "val", "test", "br", "ocm"):
        if (data / split).is_dir():
            found = torchvision.datasets.ImageFolder(data / split)
            assert found.classes == CLASSES, (split, found.classes)


def test_the_five_scripts_run_in_order_and_write_only_data_and_checkpoints(tmp_path):
    write_photo_set(tmp_path / "data/train", per_class=4, seed=1)
    write_photo_set(tmp_path / "data/val", per_class=2, seed=2)
    write_photo_set(tmp_path / "data/test", per_class=1, seed=3)
    data = tmp_path / "data"
    before = git_status()
    cpu = ["--device", "cpu"]

    run_script("make_remove_background.py", "--model", "u2netp", "--fallback", "copy", cwd=tmp_path, check=0)
    image_folders_read_as_torchvision_reads_them(data)
    run_script("make_cutmix.py", "--count", "8", "--img-size", "32", cwd=tmp_path, check=0)
    image_folders_read_as_torchvision_reads_them(data)
    r1 = run_script("model_1e-4.py", "--weights", "none", "--img-size", "32", "--epochs", "2", "--batch-size", "8",
                    "--watch", "data/test", *cpu, cwd=tmp_path, check=0)
    assert "images: train 16, br 16, ocm 8, val 8, watch 4" in r1.stdout
    image_folders_read_as_torchvision_reads_them(data)
    run_script("model_1e-7_ep20.py", "--epochs", "1", "--batch-size", "8", *cpu, cwd=tmp_path, check=0)
    image_folders_read_as_torchvision_reads_them(data)
    score = run_script("check_score.py", *cpu, cwd=tmp_path, check=0)
    test = run_script("check_score.py", "--data", "data/test", *cpu, cwd=tmp_path, check=0)
    image_folders_read_as_torchvision_reads_them(data)
    assert torch.load(tmp_path / "checkpoints/final.pth", weights_only=True)["classes"] == CLASSES
    for folder in ("data/br", "data/ocm", "checkpoints/stage1", "checkpoints/stage2", "checkpoints/score/val",
                   "checkpoints/score/test"):
        assert (tmp_path / folder / "log.txt").is_file(), folder

    # each scored folder keeps its own files in the one default --out, and the second line names it
    for split, proc, n in (("val", score, 8), ("test", test, 4)):
        result = json.loads((tmp_path / "checkpoints/score" / split / "score.json").read_text())
        assert result["n"] == n and 0.0 <= result["top1"] <= 1.0
        assert f"Top1 Accuracy : {100 * result['top1']:.2f}% (data/{split})" in proc.stdout
    assert len(list((tmp_path / "data/br").rglob("*.png"))) == 16
    assert len(list((tmp_path / "data/ocm").rglob("ocm_*.png"))) == 8
    final = torch.load(tmp_path / "checkpoints/final.pth", weights_only=True)
    torchvision.models.vgg13_bn(num_classes=len(final["classes"])).load_state_dict(final["model"])

    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"data", "checkpoints"}
    assert git_status() == before, "a script wrote into the repository"
