"""How a training stage decides, read from its metric history: whether to stop, and which epoch it keeps.

Every number in the history is measured on a finite number of photos and carries sampling noise:
an accuracy the binomial standard error sqrt(p(1-p)/n) (about 5 points at p = 0.5 on 100 photos), a
mean cross-entropy the standard error of a mean (sd / sqrt(n) of the per-image losses, recorded as
train_loss_se and val_loss_se). A rule here counts a change only when it exceeds that noise, judges
trends over a window of epochs rather than two single epochs, and says what it looked at.

A rule is an object with observe(history) -> Decision. Stage 1 takes one from --rule; stage 2 keeps
its last epoch (LastEpoch), or its steady best-val epoch with --keep best (SteadyBest). History rows
are dicts: epoch, train_acc, val_acc (percent), train_loss, val_loss, train_loss_se, val_loss_se,
train_n, val_n. No rule reads watch_acc (model_1e-4.py --watch) or a weight average's columns.
"""
import math
from dataclasses import asdict, dataclass, field

from .cli import positive_float, positive_int


@dataclass(frozen=True)
class Decision:
    stop: bool  # end the stage after this epoch
    chosen: int  # the epoch the stage keeps, as the history stands
    needed: frozenset  # epochs whose weights a later decision may still choose (the keeper holds them)
    reason: str  # the choice in words
    evidence: dict = field(default_factory=dict)  # the numbers it looked at (JSON)


# ---------------------------------------------------------------- noise

def se_points(acc, n):
    """Binomial standard error, in points, of an accuracy (percent) measured on n photos.

    p is shrunk towards 1/2 by one success and one failure, so 0 % and 100 % are not noise-free.
    """
    p = (min(max(acc, 0.0), 100.0) / 100 * n + 1) / (n + 2)
    return 100 * math.sqrt(p * (1 - p) / n)


def gap_se(row):
    return math.hypot(se_points(row["train_acc"], row["train_n"]), se_points(row["val_acc"], row["val_n"]))


def loss_se(row, split, notes=None):
    """The standard error of a split's mean loss; for a metrics.csv written before it was recorded, an
    estimate (loss / sqrt(n): per-image cross-entropies spread about as widely as their mean), noted."""
    value = row.get(f"{split}_loss_se")
    if value is not None and value == value:
        return value
    if notes is not None:
        notes.add(f"{split}_loss_se was not recorded: estimated as {split}_loss / sqrt({split}_n)")
    return row[f"{split}_loss"] / math.sqrt(row[f"{split}_n"])


def growth(values, ses):
    """Least-squares growth over the window (slope x (len - 1)) and its standard error, for points one
    epoch apart with independent errors `ses`. Epochs measured on the same photos are positively
    correlated, so this over-states the noise of a change: tests built on it err towards not firing."""
    k = len(values)
    xs = [i - (k - 1) / 2 for i in range(k)]
    sxx = sum(x * x for x in xs)
    slope = sum(x * v for x, v in zip(xs, values)) / sxx
    slope_se = math.sqrt(sum((x * s) ** 2 for x, s in zip(xs, ses))) / sxx
    return slope * (k - 1), slope_se * (k - 1)


def smoothed(values, half):
    """Centred moving average over 2*half+1 points, shorter at the ends."""
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def near_chance(acc, n, num_classes, z=2.0):
    """True when an accuracy is within z standard errors of guessing."""
    chance = 100.0 / num_classes
    return acc - chance < z * se_points(chance, n)


# ---------------------------------------------------------------- the steady best

def qualifying(history, half):
    """Epochs whose smoothed val_acc is within one standard error of the best smoothed val_acc."""
    sv = smoothed([r["val_acc"] for r in history], half)
    best = max(sv)
    tolerance = se_points(best, history[sv.index(best)]["val_n"])
    return [r["epoch"] for r, v in zip(history, sv) if v >= best - tolerance], sv


def steady_best(history, half=2, available=None):
    """The noise-aware best-val epoch: the latest whose smoothed val_acc is within one SE of the best.

    A single lucky spike does not win: smoothing averages it with its neighbours, and among
    epochs equal within noise the one trained longest is kept.
    """
    good, _ = qualifying(history, half)
    good = [e for e in good if available is None or e in available]
    rows = [r for r in history if available is None or r["epoch"] in available] or history
    return good[-1] if good else max(rows, key=lambda r: r["val_acc"])["epoch"]


def held(history, decision):
    """Epochs whose weights the keeper must hold after `decision`: what the rule may still choose, and
    what the steady best may still be, which every stage names whatever its rule (stage 1's best.pth,
    stage 2's summary and --keep best)."""
    return decision.needed | {decision.chosen} | steady_needed(history, 2)


def steady_needed(history, half):
    """Epochs a later steady_best may still pick: its present choice and the last `half` + 1 epochs
    (their smoothed values are not final). An older epoch never comes back: when the best rises, the
    epoch that raised it is newer than the present choice."""
    return {steady_best(history, half)} | {r["epoch"] for r in history[-(half + 1):]}


# ---------------------------------------------------------------- the rules

class Rule:
    name = ""
    text = ""

    def observe(self, history, available=None):
        raise NotImplementedError

    def settings(self):
        return {"rule": self.name, **asdict(self), "text": self.text}


@dataclass(frozen=True)
class LastEpoch(Rule):
    """Train every epoch, keep the last (stage 2's rule: the recipe's "ep20")."""
    name = "last"
    text = "Train every epoch; keep the last."

    def observe(self, history, available=None):
        last = history[-1]["epoch"]
        return Decision(False, last, frozenset({last}), f"kept the last epoch, {last}")


@dataclass(frozen=True)
class WeightAverage(Rule):
    """Train every epoch; keep the mean of the last quarter's epoch weights (SWA), not one epoch's."""
    name = "swa"
    text = ("Train every epoch; keep the plain mean of the weights at the end of each epoch of the last quarter "
            "of the epochs (stochastic weight averaging, SWA), with BatchNorm statistics recomputed for the mean.")

    def observe(self, history, available=None):
        last = history[-1]["epoch"]
        return Decision(False, last, frozenset({last}), "kept the mean of the weights of the last quarter's epochs "
                        f"(SWA), as it stands at epoch {last}", {"weights": "swa"})


@dataclass(frozen=True)
class SteadyBest(Rule):
    """Train every epoch, keep the steady best-val epoch."""
    half: int = 2  # epochs each side in the centred mean of val_acc
    name = "steady-best"
    text = ("Train every epoch; keep the latest epoch whose smoothed val_acc (centred mean over `half` epochs "
            "each side) is within one binomial standard error of the best smoothed val_acc.")

    def observe(self, history, available=None):
        chosen = steady_best(history, self.half, available)
        return Decision(False, chosen, frozenset(steady_needed(history, self.half)),
                        f"kept the steady best-val epoch {chosen} (the latest whose smoothed val_acc is within "
                        "one standard error of the best)")


@dataclass(frozen=True)
class Divergence(Rule):
    """The recipe's rule: stop where the train/validation gap starts to widen beyond noise."""
    window: int = 5  # epochs over which a trend is judged
    patience: int = 5  # epochs the widening must hold before the stage stops
    min_epochs: int = 10  # no decision before this epoch
    z: float = 2.0  # standard errors a change must exceed to count as real
    early_stop: bool = True  # stop when it fires (False: train on; the kept epoch is the same)
    name = "divergence"
    text = ("At each epoch t >= min_epochs, over the last `window` epochs: (A) the least-squares growth of the "
            "accuracy gap (train_acc - val_acc) exceeds z standard errors, or (L) the growth of the loss gap "
            "(val_loss - train_loss) exceeds z standard errors; (B) the mean accuracy gap is positive by more "
            "than z standard errors; (C) val_acc is not rising (its growth is below one standard error). The gap "
            "is widening at t when B and C hold and A or L does. The rule fires when it has widened at `patience` "
            "consecutive epochs. The widening started at the last epoch of the window where it was first seen "
            "whose accuracy gap was within one standard error of that window's smallest gap; the kept epoch is "
            "the latest up to that start whose smoothed val_acc is within one standard error of the best "
            "smoothed val_acc so far (else the best smoothed one up to that start). Until it fires, the steady "
            "best-val epoch is kept. Accuracy errors are binomial, loss errors those of a mean.")

    def widening_test(self, rows, notes=None):
        """The tests on the last `window` rows (the window ends at rows[-1])."""
        win = rows[-self.window:]
        ses = [gap_se(r) for r in win]
        acc_gap, acc_gap_se = growth([r["train_acc"] - r["val_acc"] for r in win], ses)
        loss_ses = [math.hypot(loss_se(r, "val", notes), loss_se(r, "train", notes)) for r in win]
        loss_gap, loss_gap_se = growth([r["val_loss"] - r["train_loss"] for r in win], loss_ses)
        mean_gap = sum(r["train_acc"] - r["val_acc"] for r in win) / len(win)
        mean_gap_se = math.sqrt(sum(s * s for s in ses)) / len(win)
        val, val_se = growth([r["val_acc"] for r in win], [se_points(r["val_acc"], r["val_n"]) for r in win])
        a, l_ = acc_gap > self.z * acc_gap_se, loss_gap > self.z * loss_gap_se
        b, c = mean_gap > self.z * mean_gap_se, val < val_se
        return {"epoch": win[-1]["epoch"], "acc_gap_growth": round(acc_gap, 3), "acc_gap_growth_se": round(acc_gap_se, 3),
                "loss_gap_growth": round(loss_gap, 5), "loss_gap_growth_se": round(loss_gap_se, 5),
                "mean_gap": round(mean_gap, 3), "mean_gap_se": round(mean_gap_se, 3),
                "val_growth": round(val, 3), "val_growth_se": round(val_se, 3),
                "A_acc_gap_grows": a, "L_loss_gap_grows": l_, "B_gap_positive": b, "C_val_not_rising": c,
                "widening": bool(b and c and (a or l_))}

    def replay(self, history, notes=None):
        """The tests over the history, and whether and where the rule fired."""
        tests, streak = [], 0
        for i in range(len(history)):
            if history[i]["epoch"] < self.min_epochs or i + 1 < self.window:
                continue
            test = self.widening_test(history[:i + 1], notes)
            tests.append(test)
            streak = streak + 1 if test["widening"] else 0
            if streak >= self.patience:
                first = i - streak + 1  # the streak's first epoch
                start = widening_start(history[first - self.window + 1:first + 1])
                return {"fired": True, "fired_at": history[i]["epoch"], "streak_start": history[first]["epoch"],
                        "widening_start": start, "tests": tests}
        return {"fired": False, "streak": streak, "tests": tests}

    def observe(self, history, available=None):
        notes = set()
        found = self.replay(history, notes)
        half = self.window // 2
        if not found["fired"]:
            chosen = steady_best(history, half, available)
            why = (f"the gap did not widen beyond noise in {len(history)} epochs" if history[-1]["epoch"] >= self.min_epochs
                   else f"no decision before epoch {self.min_epochs} (the run has {len(history)} epochs)")
            reason = f"{why}; kept the steady best-val epoch {chosen}"
            needed = still_needed(history, self, found)
        else:
            upto = [r for r in history if r["epoch"] <= found["fired_at"]]
            good, sv = qualifying(upto, half)
            start = found["widening_start"]
            before = [e for e in good if e <= start and (available is None or e in available)]
            if before:
                chosen, how = before[-1], "the latest up to the widening's start with val_acc at its best level"
            else:  # val was still lower before the widening: its best smoothed value there
                chosen, how = max((v, r["epoch"]) for r, v in zip(upto, sv) if r["epoch"] <= start and (
                    available is None or r["epoch"] in available))[1], "the best smoothed val_acc up to its start"
            reason = (f"the gap widened beyond noise after epoch {start} (seen from epoch {found['streak_start']}) "
                      f"and kept widening for {self.patience} epochs, to epoch {found['fired_at']}; kept epoch "
                      f"{chosen}, {how}")
            needed = {chosen}
        evidence = {k: v for k, v in found.items() if k != "tests"} | {"tests": found["tests"]}
        if notes:
            reason += " (" + "; ".join(sorted(notes)) + ")"
        return Decision(found["fired"] and self.early_stop, chosen, frozenset(needed), reason, evidence)


def widening_start(window_rows):
    """The last epoch of the window (which ends where the widening was first seen) whose gap was still
    within one standard error of the window's smallest gap: after it, the gap rose beyond noise."""
    low = min(r["train_acc"] - r["val_acc"] for r in window_rows)
    return [r["epoch"] for r in window_rows if r["train_acc"] - r["val_acc"] <= low + gap_se(r)][-1]


def still_needed(history, rule, found):
    """Epochs whose weights a later Divergence decision may still pick, while it has not fired: those from
    the earliest widening start still possible on, the latest qualifying epoch before it, and the steady
    best's candidates. Older epochs can be dropped."""
    last = len(history) - 1
    first = max(0, last - found["streak"] + 1 - rule.window)  # index of the earliest widening start still possible
    recent = {r["epoch"] for r in history[first:]}
    good, _ = qualifying(history, rule.window // 2)
    older = [e for e in good if e < history[first]["epoch"]]
    return recent | set(older[-1:]) | steady_needed(history, rule.window // 2)


def outcome(decision):
    """What a rule decided, as JSON: fired (the divergence rule), where, the chosen epoch and why."""
    return {"fired": decision.evidence.get("fired", False), "fired_at": decision.evidence.get("fired_at"),
            "chosen_epoch": decision.chosen, "reason": decision.reason}


# ---------------------------------------------------------------- stage 1's flags

RULES = {"divergence": Divergence, "steady-best": SteadyBest, "last": LastEpoch, "swa": WeightAverage}
DEFAULT = "swa"  # chosen on the tuning part of the evidence in docs/measurements.md (bench/stopping.py)


def add_args(p):
    d = Divergence()
    p.add_argument("--rule", choices=list(RULES), default=DEFAULT,
                   help="what stage 1 keeps as divergence.pth: divergence (stop where the train/val gap widens "
                        "beyond noise, keep the epoch before), steady-best (train every epoch, keep the steady "
                        "best-val epoch), last (train every epoch, keep the last) or swa (train every epoch, keep "
                        "the mean of the last quarter's epoch weights)")
    p.add_argument("--gap-window", type=positive_int, default=d.window,
                   help="divergence rule: epochs over which the trend of the gap is judged")
    p.add_argument("--patience", type=positive_int, default=d.patience,
                   help="divergence rule: epochs in a row the gap must widen before the stage stops")
    p.add_argument("--min-epochs", type=positive_int, default=d.min_epochs,
                   help="divergence rule: no decision before this epoch")
    p.add_argument("--noise-z", type=positive_float, default=d.z,
                   help="divergence rule: standard errors a change must exceed to count")
    p.add_argument("--no-early-stop", action="store_true",
                   help="divergence rule: train every epoch even after it fired (the kept epoch is the same)")


RULE_FLAGS = ("rule", "gap_window", "patience", "min_epochs", "noise_z", "no_early_stop", "keep")  # (keep: stage 2)


def from_args(args):
    """The stage-1 rule the flags describe (`args`: a namespace or a dict)."""
    a = args if isinstance(args, dict) else vars(args)
    return from_settings(a.get("rule", DEFAULT), a)


def from_settings(name, a):
    if name == "divergence":
        return Divergence(a.get("gap_window", 5), a.get("patience", 5), a.get("min_epochs", 10),
                          a.get("noise_z", 2.0), not a.get("no_early_stop", False))
    return {"steady-best": SteadyBest, "swa": WeightAverage}.get(name, LastEpoch)()


def default_rule():
    return from_settings(DEFAULT, {})
