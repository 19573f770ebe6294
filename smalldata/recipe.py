"""The recipe's decisions, read from a stage's metric history: when stage 1 stops, which epoch each stage keeps.

Every accuracy is measured on a finite number of photos and carries sampling noise: the binomial
standard error sqrt(p(1-p)/n), about 5 points at p = 0.5 with 100 validation photos. A decision
here counts a change only when it is larger than that noise explains, judges trends over a window
of epochs rather than two single epochs, and records the numbers it looked at.

History rows are dicts with epoch, train_acc, val_acc (percent), train_loss, val_loss, train_n
and val_n (photo counts). No decision reads watch_acc (see model_1e-4.py --watch).
"""
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rule:
    window: int = 5  # epochs over which a trend is judged
    patience: int = 5  # epochs the widening must hold before the stage stops
    min_epochs: int = 10  # no decision before this epoch
    z: float = 2.0  # standard errors a change must exceed to count as real


RULE_TEXT = (
    "At each epoch t >= min_epochs, over the last `window` epochs: (A) the least-squares growth of "
    "gap = train_acc - val_acc exceeds z standard errors; (B) the mean gap is positive by more than z "
    "standard errors (train above val); (C) val_acc is not rising (its least-squares growth is below one "
    "standard error); (D, second witness) val_loss rises while train_loss falls. The gap is widening at t "
    "when B and C hold and A or D does. The rule fires when it has widened at `patience` consecutive "
    "epochs. The widening started at the last epoch of the window where it was first seen whose gap was "
    "within one standard error of that window's smallest gap. The kept epoch is the latest epoch up to "
    "that start whose smoothed val_acc (centred mean over window//2 epochs each side) is within one standard "
    "error of the best smoothed val_acc so far; if none is, the one with the best smoothed val_acc up to "
    "that start. Standard errors are binomial, from each accuracy's photo count.")


def se_points(acc, n):
    """Binomial standard error, in points, of an accuracy (percent) measured on n photos.

    p is shrunk towards 1/2 by one success and one failure, so 0 % and 100 % are not noise-free.
    """
    p = (min(max(acc, 0.0), 100.0) / 100 * n + 1) / (n + 2)
    return 100 * math.sqrt(p * (1 - p) / n)


def gap_se(row):
    return math.hypot(se_points(row["train_acc"], row["train_n"]), se_points(row["val_acc"], row["val_n"]))


def growth(values, ses):
    """Least-squares growth over the window (slope x (len - 1)) and its standard error,
    for points one epoch apart with independent errors `ses`."""
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


def widening_test(rows, rule):
    """The four tests on the last `rule.window` rows (the window ends at rows[-1])."""
    win = rows[-rule.window:]
    ses = [gap_se(r) for r in win]
    gap_growth, gap_growth_se = growth([r["train_acc"] - r["val_acc"] for r in win], ses)
    mean_gap = sum(r["train_acc"] - r["val_acc"] for r in win) / len(win)
    mean_gap_se = math.sqrt(sum(s * s for s in ses)) / len(win)
    val_growth, val_growth_se = growth([r["val_acc"] for r in win], [se_points(r["val_acc"], r["val_n"]) for r in win])
    val_loss_growth = growth([r["val_loss"] for r in win], [1.0] * len(win))[0]
    train_loss_growth = growth([r["train_loss"] for r in win], [1.0] * len(win))[0]
    a = gap_growth > rule.z * gap_growth_se
    b = mean_gap > rule.z * mean_gap_se
    c = val_growth < val_growth_se
    d = val_loss_growth > 0 > train_loss_growth
    return {"epoch": win[-1]["epoch"], "mean_gap": round(mean_gap, 3), "mean_gap_se": round(mean_gap_se, 3),
            "gap_growth": round(gap_growth, 3), "gap_growth_se": round(gap_growth_se, 3),
            "val_growth": round(val_growth, 3), "val_growth_se": round(val_growth_se, 3),
            "val_loss_growth": round(val_loss_growth, 5), "train_loss_growth": round(train_loss_growth, 5),
            "A_gap_grows": a, "B_gap_positive": b, "C_val_not_rising": c, "D_loss_witness": d,
            "widening": bool(b and c and (a or d))}


def divergence(history, rule):
    """Replay the rule over `history`. Returns the tests made, and whether and where it fired."""
    tests, streak = [], 0
    for i in range(len(history)):
        if history[i]["epoch"] < rule.min_epochs or i + 1 < rule.window:
            continue
        test = widening_test(history[:i + 1], rule)
        tests.append(test)
        streak = streak + 1 if test["widening"] else 0
        if streak >= rule.patience:
            first = i - streak + 1  # the streak's first epoch
            return {"fired": True, "fired_at": history[i]["epoch"], "streak_start": history[first]["epoch"],
                    "widening_start": widening_start(history[first - rule.window + 1:first + 1]), "tests": tests}
    return {"fired": False, "streak": streak, "tests": tests}


def widening_start(window_rows):
    """The last epoch of the window (which ends where the widening was first seen) whose gap was still
    within one standard error of the window's smallest gap: after it, the gap rose beyond noise."""
    low = min(r["train_acc"] - r["val_acc"] for r in window_rows)
    return [r["epoch"] for r in window_rows if r["train_acc"] - r["val_acc"] <= low + gap_se(r)][-1]


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
    return good[-1] if good else max(history, key=lambda r: r["val_acc"])["epoch"]


def choose(history, rule, available=None):
    """Stage 1's decision on the history so far: {fired, chosen_epoch, reason, ...} (see RULE_TEXT)."""
    found = divergence(history, rule)
    half = rule.window // 2
    if not found["fired"]:
        chosen = steady_best(history, half, available)
        why = (f"the divergence rule did not fire in {len(history)} epochs" if history[-1]["epoch"] >= rule.min_epochs
               else f"no decision before --min-epochs {rule.min_epochs} (the run has {len(history)} epochs)")
        return {**found, "chosen_epoch": chosen,
                "reason": f"{why}; kept the steady best-val epoch {chosen} (the latest epoch whose smoothed "
                          "val_acc is within one SE of the best)"}
    upto = [r for r in history if r["epoch"] <= found["fired_at"]]
    good, sv = qualifying(upto, half)
    start = found["widening_start"]
    before = [e for e in good if e <= start and (available is None or e in available)]
    if before:
        chosen, how = before[-1], "the latest up to the widening's start with val_acc at its best level"
    else:  # val was still lower before the widening: its best smoothed value there
        candidates = [(v, r["epoch"]) for r, v in zip(upto, sv)
                      if r["epoch"] <= start and (available is None or r["epoch"] in available)]
        chosen, how = max(candidates)[1], "the best smoothed val_acc up to the widening's start"
    reason = (f"the gap widened beyond noise after epoch {start} (seen from epoch {found['streak_start']}) and "
              f"kept widening for {rule.patience} epochs, to epoch {found['fired_at']}; kept epoch {chosen}, {how}")
    return {**found, "chosen_epoch": chosen, "reason": reason}


def still_needed(history, rule):
    """Epochs whose weights a later decision of `choose` or `steady_best` may still pick.

    The rule keeps an epoch at or before the start of a widening that is still going on, or that
    has not begun: epochs from that start on, plus the latest qualifying epoch before it, plus the
    steady best-val epoch. Older epochs can be dropped.
    """
    if not history:
        return set()
    found = divergence(history, rule)
    last = len(history) - 1
    streak = 0 if found["fired"] else found["streak"]
    first = max(0, last - streak + 1 - rule.window + 1 - 1)  # index of the earliest widening start still possible
    recent = {r["epoch"] for r in history[first:]}
    good, _ = qualifying(history, rule.window // 2)
    older = [e for e in good if e < history[first]["epoch"]]
    return recent | set(older[-1:]) | {good[-1]}


def near_chance(acc, n, num_classes, z=2.0):
    """True when an accuracy is within z standard errors of guessing."""
    chance = 100.0 / num_classes
    return acc - chance < z * se_points(chance, n)


def rule_dict(rule):
    return {**asdict(rule), "text": RULE_TEXT}
