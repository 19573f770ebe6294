"""How a training stage starts: afresh (ImageNet weights, none, or a checkpoint of ours with --weights),
from the checkpoint stage 2 fine-tunes (--init), or continuing its own run (last.pth); and what a
finished stage does when it is asked again."""
import shutil

from . import IMAGENET_MEAN, IMAGENET_STD, checkpoint, cli, files, runtime, settings
from .cli import UsageError, say
from .folders import refuse_overlap
from .model import build_model, check_input, fetch_imagenet, imagenet_available


def prepare(spec, paths):
    """Refuse an --out or --cache-dir inside --data, clear a killed run's temporaries, open the log."""
    refuse_overlap(spec.checkpoints.out, spec.data.data, "--out", "--data", "the next run would read the "
                   "checkpoints folder as a class; choose an --out outside the data", both_ways=False)
    refuse_overlap(spec.data.cache_dir, spec.data.data, "--cache-dir", "--data", "the decode cache would be read "
                   "as photos; choose a folder outside the data", both_ways=False)
    if runtime.is_main():
        files.remove_stale_temps(spec.checkpoints.out)
    cli.log_to(paths.dir)
    if paths.old:
        say(f"continuing the run in {paths.dir} (the folder name an older version gave this stage; new runs go "
            f"to {paths.out / paths.stage})")


def previous_run(spec, paths):
    """The last.pth to continue, or None for a fresh start.

    --resume PATH continues that file. Without it, a last.pth in the stage folder is continued when it
    was made with the same run-defining settings (rerunning the same command after a crash picks up
    where it stopped), and refused when they differ, unless --fresh starts over.
    """
    if spec.checkpoints.fresh:
        if runtime.is_main():
            for path in paths.stage_files():
                path.unlink(missing_ok=True)
            shutil.rmtree(paths.epochs, ignore_errors=True)
        return None
    path = spec.checkpoints.resume or (paths.last if paths.last.exists() else None)
    if path is None:
        return None
    stored = checkpoint.load(path)
    if "history" not in stored:
        raise UsageError(f"{path} is not a last.pth (it has no training history): --resume takes a last.pth; "
                         "to start from a chosen epoch use --weights PATH (stage 1) or --init PATH (stage 2)")
    differ = settings.differences(spec, stored["args"])
    if differ and not spec.checkpoints.resume:
        raise UsageError(refusal(spec, paths, stored["args"], differ))
    changed = settings.rule_changes(spec, stored["args"])
    if changed:  # (not run-defining: the rule reads the whole history again with the new settings)
        say(f"continuing with other rule settings ({', '.join(changed)}): the rule judges the whole history again")
    return stored


def refusal(spec, paths, old, differ):
    if any(d.startswith(("init:", "init_id:")) for d in differ) and len(differ) <= 2:
        return (f"{paths.dir} holds a fine-tuning run of {old['init']} as it was when that run began; the "
                f"checkpoint it starts from has changed since (trained again?). To fine-tune the new one, rerun "
                f"with --fresh (deletes the old run's files); to finish the old run, pass --resume {paths.last}")
    return (f"{paths.dir} holds a run made with other arguments ({', '.join(differ)}); pass --resume to continue "
            "it, or --fresh to start over (deletes its files)")


def finished(stored, spec, paths):
    done = stored is not None and stored.get("finished") and not spec.checkpoints.resume and (
        stored["stage"].get("stopped_early") or stored["epoch"] >= spec.optim.epochs)
    if done:
        say(f"{paths.dir}: already finished (epoch {stored['epoch']}); nothing to do. Use --fresh to train again.")
    elif stored is not None and stored.get("finished"):
        say(f"extending the finished run in {paths.dir} from epoch {stored['epoch']} to {spec.optim.epochs}: a "
            "finished stage keeps no optimiser state, so Adam starts afresh (its first steps differ from an "
            "uninterrupted run's)")
    return done


def restore_outputs(stored, paths):
    """A finished stage whose named checkpoints are gone (deleted, or lost to a kill): link each again
    from the file it names (its epoch's, or a weight average's own)."""
    for name, held in stored["stage"].get("outputs", {}).items():
        target = paths.output(name)
        if target.exists() or not runtime.is_main():
            continue
        source = paths.own(name) if held.get("own") else paths.epoch(held["epoch"])
        if not source.exists():
            raise UsageError(f"{target} is missing and the weights it held are no longer kept; rerun with --fresh")
        files.link_or_copy(source, target)
        say(f"{target} was missing; written again from {source}")
    return cli.EXIT_OK


def opened(spec, stored):
    """The spec resolved (settings.resolve), and the checkpoint a fresh start begins from (--weights FILE
    or --init), opened safely and checked before any photo is decoded; None when there is none."""
    begin = None
    if stored is None and spec.model.init is not None:
        begin = checkpoint.load(spec.model.init)
    elif stored is None and spec.model.weights not in ("none", "imagenet"):
        begin = checkpoint.load(spec.model.weights)
        if begin["arch"] != spec.model.arch:
            raise UsageError(f"{spec.model.weights} is a {begin['arch']} checkpoint, not {spec.model.arch}; pass "
                             f"--arch {begin['arch']}")
    spec = settings.resolve(spec, stored, begin)
    problem = None if stored or spec.model.init else check_input(spec.model.arch, spec.model.img_size)
    if problem:
        raise UsageError(problem)
    if stored is None and spec.model.init is None and spec.model.weights == "imagenet":
        fetch_imagenet(spec.model.arch)  # (missing weights said now, not after every photo is decoded)
    return spec, begin


def classes_of(stored, begin, spec):
    """The classes the data must have: those of the run continued or of stage 2's --init (None: any)."""
    source = stored or (begin if spec.model.init is not None else None)
    return source and source["classes"]


def model(spec, classes, stored, begin):
    """(model, what a checkpoint must say of it, a note for the banner)."""
    source = stored or (begin if spec.model.init is not None else None)
    if source:
        model = checkpoint.build_from(source, spec.checkpoints.resume or spec.paths().last if stored else
                                      spec.model.init)
        note = "resumed" if stored else f"weights of {spec.model.init} (epoch {begin['epoch']}), fresh Adam"
        return model, {k: source[k] for k in ("arch", "classes", "img_size", "mean", "std")}, note
    meta = dict(arch=spec.model.arch, classes=classes, img_size=spec.model.img_size, mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD))
    fresh, note = fresh_model(spec.model, classes, begin)
    return fresh, meta, note


def fresh_model(m, classes, begin):
    """Stage 1's starting model and a note for the banner: ImageNet, none, or one of our checkpoints (`begin`)."""
    if m.weights == "none":
        return build_model(m.arch, len(classes)), "from scratch (--weights none)"
    if m.weights == "imagenet":
        note = "ImageNet weights" + ("" if imagenet_available(m.arch) else " (downloading)")
        return build_model(m.arch, len(classes), "imagenet"), note
    model = build_model(m.arch, len(classes))
    state = begin["model"]
    if begin["classes"] != list(classes):  # other classes: keep the body, start a fresh head
        head = {k for k, v in model.state_dict().items() if k in state and v.shape != state[k].shape}
        checkpoint.load_weights(model, {k: v for k, v in state.items() if k not in head}, m.weights, m.arch,
                                strict=False)
        return model, f"body of {m.weights} (other classes: new head)"
    checkpoint.load_weights(model, state, m.weights, m.arch)
    return model, f"weights of {m.weights} (epoch {begin['epoch']})"
