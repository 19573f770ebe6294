"""The plain baseline: how a torchvision user trains a classifier on a folder without this project.

    python bench/plain_loop.py --data DATA --out history.csv --arch vgg13_bn --img-size 64 --steps 280

torchvision.datasets.ImageFolder on DATA/train, DATA/val and DATA/test with Resize((S, S)), ToTensor
and ImageNet Normalize, no augmentation; a shuffled DataLoader; Adam at lr 1e-4; BatchNorm's own
running averages (model.train() to train, model.eval() to measure); val and test measured after
every epoch; the epoch with the best val accuracy (the first, on a tie) is the result. Trains the
epochs that --steps optimiser steps take. Writes one row per epoch (val_acc, val_loss, watch_acc and
watch_correct, test being the watched folder, in ImageFolder's file order) and prints the result.
"""
import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train/, val/ and test/")
    p.add_argument("--out", type=Path, required=True, help="history CSV")
    p.add_argument("--arch", default="vgg13_bn")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, required=True, help="optimiser steps (epochs follow)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


@torch.inference_mode()
def measure(model, loader):
    model.eval()
    losses, hits = [], []
    for x, y in loader:
        logits = model(x)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        hits.append(logits.argmax(1) == y)
    losses, hits = torch.cat(losses), torch.cat(hits)
    return 100.0 * hits.float().mean().item(), losses.mean().item(), "".join("1" if h else "0" for h in hits.tolist())


def main():
    args = get_args()
    torch.manual_seed(args.seed)
    tf = transforms.Compose([transforms.Resize((args.img_size, args.img_size)), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    sets = {s: torchvision.datasets.ImageFolder(args.data / s, transform=tf) for s in ("train", "val", "test")}
    train = torch.utils.data.DataLoader(sets["train"], batch_size=args.batch_size, shuffle=True)
    held = {s: torch.utils.data.DataLoader(sets[s], batch_size=64) for s in ("val", "test")}
    model = torchvision.models.get_model(args.arch, num_classes=len(sets["train"].classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    epochs = math.ceil(args.steps / len(train))
    rows, t0 = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc, val_loss, _ = measure(model, held["val"])
        test_acc, _, test_bits = measure(model, held["test"])
        rows.append({"epoch": epoch, "val_acc": round(val_acc, 3), "val_loss": round(val_loss, 5),
                     "val_n": len(sets["val"]), "watch_acc": round(test_acc, 3), "watch_correct": test_bits})
        print(f"epoch {epoch}/{epochs}  val {val_acc:.1f}%  test {test_acc:.1f}%  {time.perf_counter() - t0:.0f} s",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    print(f"best val epoch {best['epoch']}: val {best['val_acc']:.1f}%, test {best['watch_acc']:.1f}% "
          f"({epochs} epochs, {epochs * len(train)} steps)")


if __name__ == "__main__":
    main()
