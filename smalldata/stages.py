"""The two training stages of the recipe, on top of train.Run.

Stage 1 (lr 1e-4) keeps the epoch where the train/val gap starts to widen sharply;
stage 2 (lr 1e-7) starts there and keeps its best epoch as final.pth.
"""
import shutil
from pathlib import Path

from . import checkpoint, files
from .cli import UsageError, say
from .model import build_model, imagenet_available
from .train import RUN_DEFINING, Run, best_epoch, find_divergence, load_data

STAGE_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "divergence.json")


def previous_run(args, stage_dir):
    """The last.pth to continue from (None for a fresh start), or "done" when the run is complete.

    --resume PATH continues that file. Without it, a last.pth already in the stage folder is
    continued when it was made with the same run-defining arguments (so rerunning the same
    command after a crash picks up where it stopped), reported as done when it is finished,
    and refused when the arguments differ, unless --fresh starts over.
    """
    last = Path(stage_dir) / "last.pth"
    if args.fresh:
        for name in STAGE_FILES:
            (Path(stage_dir) / name).unlink(missing_ok=True)
        shutil.rmtree(Path(stage_dir) / "epochs", ignore_errors=True)
        return None
    path = Path(args.resume) if args.resume else last if last.exists() else None
    if path is None:
        return None
    ckpt = checkpoint.load(path)
    if "optimizer" not in ckpt or "history" not in ckpt:
        raise UsageError(f"{path} has no optimizer state: --resume takes a last.pth; "
                         "to start from a chosen epoch use --weights PATH (stage 1) or --init PATH (stage 2)")
    old = ckpt["args"]
    if not args.resume:
        differ = [k for k in RUN_DEFINING if k in old and str(old[k]) != str(vars(args).get(k))]
        if differ:
            raise UsageError(f"{stage_dir} holds a run made with other arguments ("
                             + ", ".join(f"{k}: {old[k]} -> {vars(args).get(k)}" for k in differ)
                             + "); pass --resume to continue it, or --fresh to start over (deletes its files)")
        if ckpt.get("finished") and (ckpt.get("stage", {}).get("stopped_early") or ckpt["epoch"] >= args.epochs):
            say(f"{stage_dir}: already finished (epoch {ckpt['epoch']}); nothing to do. "
                "Use --fresh to train again.")
            return "done"
    for k in RUN_DEFINING:  # a resumed run keeps the arguments that made it
        if k in old:
            setattr(args, k, old[k])
    return ckpt


def initial_model(args, classes):
    """Stage 1's starting model and a note for the banner: ImageNet, none, or one of our checkpoints."""
    if args.weights == "none":
        return build_model(args.arch, len(classes)), "from scratch (--weights none)"
    if args.weights == "imagenet":
        note = "ImageNet weights" + ("" if imagenet_available(args.arch) else " (downloading)")
        return build_model(args.arch, len(classes), "imagenet"), note
    ckpt = checkpoint.load(args.weights)
    if ckpt["arch"] != args.arch:
        raise UsageError(f"{args.weights} is a {ckpt['arch']} checkpoint, not {args.arch}; pass --arch {ckpt['arch']}")
    model = build_model(args.arch, len(classes))
    state = ckpt["model"]
    if ckpt["classes"] != list(classes):  # other classes: keep the body, start a fresh head
        head = {k for k, v in model.state_dict().items() if k in state and v.shape != state[k].shape}
        state = {k: v for k, v in state.items() if k not in head}
        checkpoint.load_weights(model, state, args.weights, args.arch, strict=False)
        return model, f"body of {args.weights} (other classes: new head)"
    checkpoint.load_weights(model, state, args.weights, args.arch)
    return model, f"weights of {args.weights} (epoch {ckpt['epoch']})"


def prepare_out(args, stage_name):
    """The stage folder, after refusing an --out inside --data and clearing a killed run's temporaries."""
    out = Path(args.out)
    if files.is_inside(out.resolve(), Path(args.data).resolve()):
        raise UsageError(f"--out {out} is inside --data {args.data}: the next run would read the checkpoints "
                         "folder as a class; choose an --out outside the data")
    files.remove_stale_temps(out)
    return out, out / stage_name


def stage1(args):
    """Train at lr 1e-4 and keep the divergence checkpoint; returns the exit code."""
    out, stage_dir = prepare_out(args, "1e-4")
    prev = previous_run(args, stage_dir)
    if prev == "done":
        restore_divergence_pth(out, stage_dir)
        return 0
    run = Run(args, stage_dir, f"stage 1: {args.arch} lr {args.lr:g}", keep_recent=args.gap_window + 1)
    img_size = prev["img_size"] if prev else args.img_size
    data = load_data(args, img_size, run.problems, prev["classes"] if prev else None)
    if prev:
        model, note = checkpoint.build_from(prev, args.resume or stage_dir / "last.pth"), "resumed"
    else:
        model, note = initial_model(args, data["classes"])
    run.build(model, args.arch, data["classes"], img_size, data)
    if prev:
        run.restore(prev)
    run.banner(note)
    say(f"divergence rule: gap grows by more than {args.gap_jump:g} points over {args.gap_window} epochs "
        f"while val_acc does not improve; then stop after {args.patience} more epoch(s)")

    def on_epoch(row, state):
        st = run.extra_state
        if best_epoch(run.history) == row["epoch"]:
            st["best_epoch"] = row["epoch"]
            run.save_weights(stage_dir / "best.pth", row["epoch"], state, row)
        if "divergence" not in st:
            found = find_divergence(run.history, args.gap_window, args.gap_jump)
            if found:
                chosen = found["chosen_epoch"]
                st.update(divergence=found, marked_epoch=chosen, marked_label=f"divergence: epoch {chosen}")
                weights = run.weights_of(chosen)
                if weights is None:
                    raise UsageError(f"the weights of epoch {chosen} are gone (its file was not written before "
                                     "an interruption); rerun with --fresh")
                run.save_weights(out / "divergence.pth", chosen, weights, _row(run.history, chosen))
                write_divergence_json(stage_dir, args, run.history, found)
                say(f"divergence rule fired at epoch {found['fired_at_epoch']}: gap grew "
                    f"{found['gap_growth']:.1f} points since epoch {chosen} with no val gain; "
                    f"kept epoch {chosen} as {out / 'divergence.pth'}")
        fired = st.get("divergence")
        st["stopped_early"] = bool(fired and row["epoch"] >= fired["fired_at_epoch"] + args.patience)
        return st["stopped_early"]

    def on_end():  # the rule never fired: the best-val epoch stands in (written before last.pth is finished)
        if "divergence" not in run.extra_state:
            chosen = run.extra_state["best_epoch"]
            files.copy_file(stage_dir / "best.pth", out / "divergence.pth")
            write_divergence_json(stage_dir, args, run.history, None, chosen)
            say(f"the divergence rule did not fire in {len(run.history)} epochs; kept the best-val epoch "
                f"{chosen} as {out / 'divergence.pth'}")

    run.fit(on_epoch, on_end=on_end)
    plots_note(stage_dir)
    run.problems.summary()
    return run.problems.exit_code()


def restore_divergence_pth(out, stage_dir):
    """A finished stage 1 whose divergence.pth is gone (deleted, or lost to a kill): write it again."""
    target = out / "divergence.pth"
    if target.exists():
        return
    state = checkpoint.load(stage_dir / "last.pth")["stage"]
    chosen = state["divergence"]["chosen_epoch"] if "divergence" in state else state["best_epoch"]
    for source in (stage_dir / "epochs" / f"epoch_{chosen:03d}.pth", stage_dir / "best.pth"):
        if source.exists() and checkpoint.load(source)["epoch"] == chosen:
            files.copy_file(source, target)
            say(f"{target} was missing; written again from {source} (epoch {chosen})")
            return
    raise UsageError(f"{target} is missing and the weights of its epoch ({chosen}) are no longer kept; "
                     "rerun with --fresh")


def _row(history, epoch):
    return next(r for r in history if r["epoch"] == epoch)


def write_divergence_json(stage_dir, args, history, found, fallback_epoch=None):
    chosen = found["chosen_epoch"] if found else fallback_epoch
    around = [{k: r[k] for k in ("epoch", "train_acc", "val_acc", "gap")}
              for r in history if abs(r["epoch"] - chosen) <= args.gap_window + 2]
    files.write_json(Path(stage_dir) / "divergence.json", {
        "chosen_epoch": chosen,
        "reason": ("divergence rule fired" if found else
                   "the divergence rule never fired: best val_acc epoch (ties: smaller gap)"),
        "rule": {"gap_jump_points": args.gap_jump, "gap_window_epochs": args.gap_window,
                 "patience": args.patience,
                 "text": "first epoch t where gap(t) - gap(t - window) > gap_jump and max val_acc over "
                         "epochs t-window+1..t <= val_acc(t - window); the chosen epoch is t - window"},
        "fired": found,
        "epochs_around": around,
        "checkpoint": str(Path(args.out) / "divergence.pth"),
    })


def stage2(args):
    """Fine-tune at lr 1e-7 from --init and keep the best epoch as final.pth; returns the exit code."""
    out, stage_dir = prepare_out(args, "1e-7")
    prev = previous_run(args, stage_dir)
    if prev == "done":
        return 0
    init = prev or checkpoint.load(args.init)
    run = Run(args, stage_dir, f"stage 2: {init['arch']} lr {args.lr:g} from {Path(args.init).name}")
    data = load_data(args, init["img_size"], run.problems, init["classes"])
    model = checkpoint.build_from(init, args.init)
    run.build(model, init["arch"], init["classes"], init["img_size"], data, init["mean"], init["std"])
    if prev:
        run.restore(prev)
    run.banner("resumed" if prev else f"weights of {args.init} (epoch {init['epoch']}), fresh Adam")

    def on_epoch(row, state):
        if best_epoch(run.history) == row["epoch"]:
            run.extra_state.update(best_epoch=row["epoch"], marked_epoch=row["epoch"],
                                   marked_label=f"final.pth: epoch {row['epoch']}")
            run.save_weights(out / "final.pth", row["epoch"], state, row)
        return False

    history = run.fit(on_epoch, eval_first=True)
    start, best = history[0], _row(history, run.extra_state["best_epoch"])
    say(f"\n{'':14}{'val_acc':>9}{'gap':>9}")
    say(f"{'start (ep 0)':14}{start['val_acc']:9.2f}{start['gap']:9.2f}")
    say(f"{'final (ep %d)' % best['epoch']:14}{best['val_acc']:9.2f}{best['gap']:9.2f}")
    say(f"final.pth: {out / 'final.pth'} (epoch {best['epoch']} of the 1e-7 run; epoch 0 is the start checkpoint)")
    plots_note(stage_dir)
    run.problems.summary()
    return run.problems.exit_code()


def plots_note(stage_dir):
    say(f"metrics: {Path(stage_dir) / 'metrics.csv'}   curves: {Path(stage_dir) / 'curves.png'}")
