"""bench/gpu_check.sh's results: results.json (every step's status, seconds and figures) and table.md, from
what the steps left; run after every step and on exit, so a time-out or a kill keeps what was measured.

    python bench/gpu_check_report.py OUT WORK --elapsed S --deadline S

Standard library only: it runs whatever state the Python is in.
"""
import argparse
import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata import files  # noqa: E402 (standard library only)
from smalldata.layout import RunPaths  # noqa: E402 (standard library only)

# The goal, the one place it is written down (the docs and bench/gpu_check.sh repeat it).
GOALS = ("on an H100/H200 at 256 px in bf16: >= 4,000 training images/s, >= 4x the plain torchvision loop, "
         "and whole stage-1 epochs (precise BN, evaluation, keeper) >= 85 % of the bare step rate")
STEPS = ["setup", "photos", "breakdown", "throughput", "br", "ocm", "torchrun1", "stream", "demo", "compile"]
DONE_WITH_SKIPS = {"br", "ocm", "torchrun1", "stream", "demo"}  # the pipeline's exit 1: done, some inputs skipped


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def last_metrics(stage_dir):
    """The last epoch of a stage's metrics.csv: its images/s and seconds, as the stage measured them."""
    try:
        with open(Path(stage_dir) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    if not rows:
        return {}
    return {"epochs": len(rows), "images/s, last epoch (the stage's own count)": float(rows[-1]["images_per_s"]),
            "train seconds, last epoch": float(rows[-1]["seconds"]), "val_acc": float(rows[-1]["val_acc"])}


def br_figures(log):
    """BR's providers (the list its banner names, up to the ';') and its rate, from its log."""
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    providers = re.search(r"onnxruntime providers ([\w, ]+?);", text)
    rate = re.search(r"([\d.]+) images/s \(model load not counted\)", text)
    done = re.search(r"summary: done (\d+)", text)
    return {"providers": providers[1].split(", ") if providers else None,
            "images/s": float(rate[1]) if rate else None, "done": int(done[1]) if done else None}


def count_images(folder):
    return sum(1 for p in Path(folder).rglob("*") if p.is_file() and p.parent != Path(folder)
               and not p.name.startswith(".") and p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def figures_of(name, out, work):
    """What one step measured, from its JSON, its log or the files it wrote."""
    if name in ("setup", "breakdown", "throughput", "compile"):
        return read_json(out / "json" / f"{name}.json")
    if name == "photos":
        return {split: count_images(work / "data" / split) for split in ("train", "val", "test")}
    if name == "br":
        return br_figures(out / "logs" / "br.log")
    if name == "ocm":
        return {"images": count_images(work / "data" / "ocm")}
    if name in ("torchrun1", "stream"):
        return last_metrics(RunPaths.of(work / name, "stage1").dir)
    if name == "demo":
        summary, score = read_json(work / "demo" / "demo_summary.json"), read_json(work / "demo/score/test/score.json")
        return {"kind": summary.get("kind"), "(a) test top-1": summary.get("a"), "(d) test top-1": summary.get("d"),
                "d - a": summary.get("d_minus_a"), "BR masks": summary.get("masks"),
                "final, test top-1": score.get("top1")}
    return {}


def status(name, code):
    if not code.lstrip("-").isdigit():
        return code  # "skipped: ..."
    code = int(code)
    if code == 0:
        return "ok"
    if code == 1 and name in DONE_WITH_SKIPS:
        return "ok (some inputs skipped)"
    return "timed out" if code in (124, 137) else f"failed (exit {code})"


def pick(d, *keys):
    """d[k1][k2]...; a text met on the way ("n/a on CPU") is the answer; None when a key is missing."""
    for key in keys:
        if isinstance(d, str):
            return d
        d = d.get(key) if isinstance(d, dict) else None
    return d


def goal_rows(steps, gpu):
    """(figure, measured, goal or what to expect, met) of the goal's three figures (met: None off a GPU or
    when not measured), then the other figures worth a look (met: None)."""
    fig = {s["name"]: s["figures"] for s in steps}
    rate, ratio = pick(fig, "throughput", "ours images/s"), pick(fig, "throughput", "ours / baseline")
    whole = pick(fig, "breakdown", "whole epochs", "whole / bare")

    def met(value, least):
        return None if value is None or not gpu else value >= least
    goals = [("training images/s at 256 px, bf16 (ours)", rate, ">= 4000", met(rate, 4000)),
             ("ours / plain torchvision loop, same run", ratio, ">= 4", met(ratio, 4)),
             ("whole stage-1 epochs / bare training", whole, ">= 0.85", met(whole, 0.85))]
    stage = "images/s, last epoch (the stage's own count)"
    others = [
        ("per-epoch seconds (breakdown)", pick(fig, "breakdown", "whole epochs", "seconds per epoch"), ""),
        ("precise BN path (breakdown)", pick(fig, "breakdown", "whole epochs", "precise BN"), ""),
        ("host syncs per epoch (bar aside)", pick(fig, "breakdown", "host syncs", "per epoch"), "2"),
        ("NCHW<->NHWC conversion launches, 4 steps", pick(fig, "breakdown", "layout conversions",
                                                          "launches in 4 steps"), "0"),
        ("peak GPU memory GiB", pick(fig, "breakdown", "peak GPU memory", "GiB"), ""),
        ("BR providers", pick(fig, "br", "providers"), "CUDAExecutionProvider first"),
        ("BR images/s", pick(fig, "br", "images/s"), ""),
        ("torchrun, 1 process: images/s", pick(fig, "torchrun1", stage), ""),
        ("streamed: images/s", pick(fig, "stream", stage), ""),
        ("demo (shortened): final test top-1", pick(fig, "demo", "final, test top-1"), ""),
        ("torch.compile", pick(fig, "compile", "torch.compile"), ""),
    ]
    return goals + [(f, m, g, None) for f, m, g in others]


def report(out, work, elapsed, deadline):
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()] \
        if (out / "steps.tsv").exists() else []
    rows += [(name, "not run", "0") for name in STEPS if name not in {row[0] for row in rows}]
    steps = [{"name": name, "status": status(name, code), "exit": int(code) if code.lstrip("-").isdigit() else None,
              "seconds": int(seconds), "figures": figures_of(name, out, work)} for name, code, seconds in rows]
    setup = next((s["figures"] for s in steps if s["name"] == "setup"), {})
    device = pick(setup, "versions", "device")
    gpu = device not in (None, "cpu")
    goals = goal_rows(steps, gpu)
    results = {"goal": GOALS, "device": device, "elapsed_s": elapsed, "deadline_s": deadline,
               "goals": [{"figure": f, "measured": m, "goal": g, "met": ok} for f, m, g, ok in goals],
               "steps": steps}
    files.write_json(out / "results.json", results)
    verdict = {True: "met", False: "NOT met", None: "not measured" if gpu else "a GPU goal"}
    lines = [f"device: {device or 'unknown'}; {elapsed} s of the {deadline} s deadline", f"goal: {GOALS}", "",
             "| figure | measured | goal (or expected) | |", "|---|---|---|---|"]
    lines += [f"| {f} | {'-' if m is None else m} | {g} | {verdict[ok] if i < 3 else ''} |"
              for i, (f, m, g, ok) in enumerate(goals)]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in steps]
    files.write_text(out / "table.md", "\n".join(lines) + "\n")
    return lines, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--deadline", type=int, default=0)
    p.add_argument("--print", action="store_true", help="also print the table")
    p.add_argument("--exit-code", action="store_true",
                   help="exit 1 when a step did not run to its end (one skipped with --skip aside)")
    args = p.parse_args()
    lines, steps = report(args.out, args.work, args.elapsed, args.deadline)
    if args.print:
        print("\n".join(lines))
    unfinished = [s for s in steps if not s["status"].startswith("ok") and s["status"] != "skipped: --skip"]
    return 1 if args.exit_code and unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
