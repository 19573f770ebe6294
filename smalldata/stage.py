"""A training stage, run from its spec (settings.StageSpec): the recipe's two stages are both this.

run_stage reads top to bottom: prepare the folder, find the run to continue, open the stage (data,
model, loop, keeper), train its epochs, finish (name the outputs). One epoch reads top to bottom in
train_epochs: train, measure, observe, keep, log.
"""
import math
import time
from dataclasses import dataclass, field

from . import cli, files, images, lock, memory, plots, report, rule as rules, runtime, start
from .cli import NonFiniteError, UsageError, say
from .data import load_training_data
from .keeper import Keeper
from .train import (fitting_bn_chunk, make_loop, measure, measure_average, restore_training_state, train_epoch,
                    rng_state, training_state)


def run_stage(spec):
    """Run a stage to its end (or continue it); returns the exit code. The stage folder is this run's
    alone while it runs (lock.one_writer): a second run on it is refused at once."""
    paths = spec.paths()
    images.set_max_pixels(spec.data.max_pixels)
    with lock.one_writer(paths.dir, "--out"):
        return run_held(spec, paths)


def run_held(spec, paths):
    start.prepare(spec, paths)
    device, amp = runtime.setup(spec.hardware.device, spec.optim.seed, spec.hardware.deterministic)
    check_workers(spec, device)
    stored = start.previous_run(spec, paths)
    runtime.same_everywhere(stored["epoch"] if stored else 0, f"the epoch each resumes after (--out {paths.out} "
                            "must be a folder every worker reads: a shared file system)")
    if start.finished(stored, spec, paths):
        return start.restore_outputs(stored, paths)
    spec, begin = start.opened(spec, stored)
    run = open_stage(spec, paths, stored, begin, (device, amp))
    decision = train_epochs(run)
    return finish(run, decision)


def check_training(spec, device, amp):
    """One training step at this worker's share of --batch-size must fit the training device's memory."""
    memory.check_training(spec.model.arch, spec.optim.batch_size // runtime.world()[1], spec.model.img_size, device, amp)


@dataclass
class StageRun:
    """One stage's run: its spec and files, the data, the loop, the keeper and the history so far."""
    spec: object
    paths: object
    data: dict
    loop: object
    keeper: Keeper
    meta: dict
    problems: cli.Problems
    history: list = field(default_factory=list)
    state: dict = field(default_factory=dict)  # what the stage's last.pth carries besides the loop (decision, marks)
    first_epoch: int = 1

    @property
    def main(self):
        return self.keeper.writes


def open_stage(spec, paths, stored, begin, device_amp):
    """Decode the data, build the model (fresh, from --init, or as the run continued left it), its loop
    and keeper; write args.json; say the banner."""
    problems, (device, amp) = cli.Problems(), device_amp
    d = spec.data
    with runtime.main_first():  # rank 0 writes the decode cache, the other workers read it
        data = load_training_data(d.data, spec.model.img_size, problems, start.classes_of(stored, begin, spec),
                                  not d.no_br, not d.no_ocm, d.watch, None if d.no_cache else d.cache_dir, device,
                                  d.data_on, d.allow_missing_val_classes, lambda: check_training(spec, device, amp))
    model, meta, note = start.model(spec, data["classes"], stored, begin)
    runtime.all_arrive()  # every worker has its data before DDP's first NCCL collective
    loop = make_loop(model, spec.optim, device, amp, meta["mean"], meta["std"], compile=spec.hardware.compile,
                     sync_bn=spec.hardware.sync_bn, candidates=spec.candidates)
    keeper = Keeper(paths, {**meta, "args": spec.to_json()}, spec.checkpoints.keep_all, writes=runtime.is_main())
    run = StageRun(spec, paths, data, loop, keeper, meta, problems)
    if run.main:
        paths.dir.mkdir(parents=True, exist_ok=True)
        files.write_json(paths.args, spec.to_json())
    if stored:
        restore_training_state(loop, stored)
        keeper.restore(stored)
        run.history, run.state, run.first_epoch = list(stored["history"]), dict(stored["stage"]), stored["epoch"] + 1
        say(f"resuming after epoch {stored['epoch']} ({len(run.history)} epochs of history)")
    loop.bn_chunk = run.state.setdefault("bn_chunk", fitting_bn_chunk(loop, data["orig"][0]))
    report.banner(run, note)
    return run


MIN_PER_GPU = 16  # images per GPU and step below which BatchNorm's batch statistics need --sync-bn


def check_workers(spec, device):
    """The global batch against the torchrun workers: it must divide among them, and on GPUs give each at
    least MIN_PER_GPU images unless --sync-bn (BatchNorm's statistics of 2 images are noise)."""
    workers, batch = runtime.world()[1], spec.optim.batch_size
    if batch % workers:
        raise UsageError(f"--batch-size {batch} is the global batch; it must divide among the {workers} torchrun "
                         f"workers (try {batch - batch % workers or workers})")
    if spec.hardware.sync_bn and (workers == 1 or device.type != "cuda"):
        raise UsageError("--sync-bn is for torchrun runs on GPUs (PyTorch's SyncBatchNorm has no CPU version)")
    if device.type == "cuda" and batch // workers < MIN_PER_GPU and not spec.hardware.sync_bn:
        raise UsageError(f"--batch-size {batch} is the global batch: on {workers} GPUs each gets {batch // workers} "
                         f"images a step, and BatchNorm normalises with the statistics of those alone; give "
                         f"--batch-size {MIN_PER_GPU * workers} or more (and raise --lr with it), or --sync-bn")


# ---------------------------------------------------------------- the epochs

def train_epochs(run):
    """The stage's epochs: train, measure, observe, keep, log. Returns the last decision."""
    loop, data, spec = run.loop, run.data, run.spec
    if spec.measure_start and run.first_epoch == 1:  # the starting weights, as epoch 0
        run.history.append(measure(loop, data, 0, 0.0, (math.nan, math.nan, 0.0)))
        keep(run, observe(run))
    decision = None
    for epoch in range(run.first_epoch, spec.optim.epochs + 1):
        t0 = time.perf_counter()
        try:
            aug = train_epoch(loop, *data["train"], desc=f"epoch {epoch}/{spec.optim.epochs}")  # train
        except NonFiniteError as e:
            raise NonFiniteError(stopped(run, epoch, e)) from None
        row = measure(loop, data, epoch, time.perf_counter() - t0, aug)  # measure
        if spec.candidates.candidates_each_epoch:
            row.update(measure_candidates(run, epoch))
        run.history.append(row)
        decision = observe(run)  # observe
        keep(run, decision)  # keep
        report.epoch_done(run, decision)  # log
        if decision.stop:
            break
    return decision or observe(run)


def stopped(run, epoch, error):
    """One line for a stage that went non-finite: nothing more is written; the last finite state stays."""
    run.keeper.close()  # (a last.pth being written lands whole: it holds finite weights)
    plots.stop_helper()
    last = f"{run.paths.last} (epoch {run.keeper.last_epoch})" if run.keeper.last_epoch is not None else None
    lr = run.spec.optim.lr
    return (f"epoch {epoch}: {error}; training stopped and nothing was written under a kept name; "
            + (f"the last finite state is {last}" if last else "no checkpoint had been written yet")
            + f". Try a lower --lr (now {lr:g}; e.g. {lr / 10:g})" + (" with --fresh" if last else ""))


def measure_candidates(run, epoch):
    """The weight averages' columns, as they stand after `epoch`."""
    row = {}
    for average in run.loop.averages.values():
        average.prepare(run.keeper.weights(epoch, run.loop.model), epoch)
        row.update(measure_average(run.loop, run.data, average))
    return row


def observe(run):
    return run.spec.rule.observe(run.history, set(run.keeper.kept) | {run.history[-1]["epoch"]})


def held(run, decision):
    """The epochs whose weights must stay: what the rule may still choose, the steady best, the averages'."""
    epoch = run.history[-1]["epoch"]
    return rules.held(run.history, decision).union(*(a.held(epoch) for a in run.loop.averages.values()))


def keep(run, decision):
    run.keeper.snapshot(run.loop.model, run.history[-1], held(run, decision))


# ---------------------------------------------------------------- the end

def finish(run, decision):
    """Name the outputs (each with the decision or the average it holds), say what each scored, write
    last.pth as finished; returns the exit code."""
    history, epoch = run.history, run.history[-1]["epoch"]
    if run.loop.averages and not run.spec.candidates.candidates_each_epoch:
        history[-1].update(measure_candidates(run, epoch))
    steady = rules.steady_best(history, 2, set(run.keeper.kept))
    replayed = [r.observe(history) for r in run.spec.replayed]
    outputs = {name: output(run, what, decision, steady) for name, what in run.spec.outputs if what_exists(run, what)}
    report.summary(run, decision, outputs, replayed)
    run.keeper.writer.flush()  # the last periodic last.pth lands whole before the final one replaces it
    # held to the end: the named epochs, and the averages' (an extended run's SWA averages the same window)
    named = {e for e, _, averaged in outputs.values() if averaged is None}
    named |= set().union(*(a.held(epoch) for a in run.loop.averages.values()))
    run.keeper.kept = {e: v for e, v in run.keeper.kept.items() if e in named}
    run.state["outputs"] = {name: {"epoch": e, "own": averaged is not None} for name, (e, _, averaged) in outputs.items()}
    ranks = runtime.gather(rng_state(run.loop))
    run.keeper.save_last(epoch, lambda optimizer: training_state(run.loop, history, run.state, optimizer, ranks),
                         finished=True)
    for name, (e, chosen, averaged) in outputs.items():
        run.keeper.name(run.paths.output(name), e, {"file": run.paths.output(name).name, "stage": run.spec.stage,
                                                    **chosen}, averaged)
    report.write_progress(run)
    run.keeper.close()
    plots.stop_helper()
    runtime.teardown()
    say(f"metrics: {run.paths.metrics}   curves: {run.paths.curves}   log: {run.paths.dir / 'log.txt'}")
    run.problems.summary(run.paths.dir if run.main else None)
    return run.problems.exit_code()


def what_exists(run, what):
    return what in ("rule", "steady") or what in run.loop.averages


def output(run, what, decision, steady):
    """(epoch, the decision that named it, averaged weights or None) of an output holding `what`."""
    history = run.history
    if what == "rule":
        return decision.chosen, {"rule": run.spec.rule.name, **report.compact(decision)}, None
    if what == "steady":
        return steady, {"rule": rules.SteadyBest.name, "chosen_epoch": steady,
                        "reason": rules.SteadyBest().observe(history).reason}, None
    average, row = run.loop.averages[what], history[-1]
    metrics = {k: row[k] for k in ("epoch", "train_n", "val_n")} | {
        k[len(what) + 1:]: v for k, v in row.items() if k.startswith(what + "_") and not k.endswith("_correct")}
    return row["epoch"], {"chosen_epoch": row["epoch"], "reason": average.describe()}, {
        "state": average.model.state_dict(), "metrics": metrics, "weights": average.describe(),
        "own": run.paths.own(what)}
