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
from dataclasses import asdict, dataclass, field, fields

import numpy as np

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

RULES = {}  # --rule NAME -> the rule's class: the one table of rules


def register(cls):
    """A class decorator: the rule becomes a choice of --rule, with its flags."""
    RULES[cls.name] = cls
    return cls


class Rule:
    """A frozen dataclass whose fields are its settings. `flags` maps each field to its command-line flag
    and the flag's argparse arguments (the default is the field's); `text` says the rule in full."""
    name = ""
    help = ""  # one line, for --rule's help
    text = ""
    flags = {}

    def observe(self, history, available=None):
        """The Decision on the history so far; `available`: the epochs whose weights are still held."""
        raise NotImplementedError

    def describe(self):
        """The rule and its settings in one line (the stage's banner)."""
        return f"{self.name}: {self.text}"

    def settings(self):
        return {"rule": self.name, **asdict(self), "text": self.text}

    @classmethod
    def add_flags(cls, group):
        for f in fields(cls):
            flag, kwargs = cls.flags[f.name]
            group.add_argument(flag, dest=f.name, default=f.default, **kwargs)

    @classmethod
    def from_flags(cls, values):
        """The rule with the settings in `values` (a namespace or a dict; missing ones take their defaults)."""
        values = values if isinstance(values, dict) else vars(values)
        return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})


@register
@dataclass(frozen=True)
class LastEpoch(Rule):
    """Train every epoch, keep the last (stage 2's rule: the recipe's "ep20")."""
    name = "last"
    help = "train every epoch, keep the last"
    text = "Train every epoch; keep the last."

    def observe(self, history, available=None):
        last = history[-1]["epoch"]
        return Decision(False, last, frozenset({last}), f"kept the last epoch, {last}")


@register
@dataclass(frozen=True)
class SteadyBest(Rule):
    """Train every epoch, keep the steady best-val epoch."""
    half: int = 2  # epochs each side in the centred mean of val_acc
    name = "steady-best"
    help = "train every epoch, keep the steady best-val epoch"
    flags = {"half": ("--smooth-half", dict(type=positive_int, help="steady-best rule: epochs each side in the "
                                                                      "centred mean of val_acc"))}
    text = ("Train every epoch; keep the latest epoch whose smoothed val_acc (centred mean over `half` epochs "
            "each side) is within one binomial standard error of the best smoothed val_acc.")

    def observe(self, history, available=None):
        chosen = steady_best(history, self.half, available)
        return Decision(False, chosen, frozenset(steady_needed(history, self.half)),
                        f"kept the steady best-val epoch {chosen} (the latest whose smoothed val_acc is within "
                        "one standard error of the best)")


@register
@dataclass(frozen=True)
class Divergence(Rule):
    """The recipe's rule: stop where the train/validation gap starts to widen beyond noise."""
    min_epochs: int = 10  # no decision before this epoch
    z: float = 5.0  # standard errors the val loss's rise must exceed (calibrated: bench/divergence.py, tuning part)
    gap_z: float = 2.0  # standard errors the gap's widening must exceed (the train loss does not rise alike)
    reach: int = 15  # how many epochs back the widening may have begun
    early_stop: bool = True  # stop when it fires (False: train on; the kept epoch is the same)
    name = "divergence"
    help = "stop where the train/val gap starts to widen beyond noise, keep the epoch where it began (the recipe's)"
    flags = {
        "min_epochs": ("--min-epochs", dict(type=positive_int, help="divergence rule: no decision before this epoch")),
        "z": ("--noise-z", dict(type=positive_float, help="divergence rule: standard errors the val loss's rise "
                                                          "must exceed")),
        "gap_z": ("--gap-z", dict(type=positive_float, help="divergence rule: standard errors the val-train loss "
                                                             "gap's widening must exceed")),
        "reach": ("--gap-reach", dict(type=positive_int, help="divergence rule: epochs back that the widening may "
                                                               "have begun")),
        "early_stop": ("--no-early-stop", dict(action="store_false", help="divergence rule: train every epoch even "
                                                                          "after it fired (the kept epoch is the "
                                                                          "same)%(default).0s")),
    }
    text = ("At each epoch t >= min_epochs, for every epoch b up to `reach` epochs back, a broken line is fitted "
            "to the val loss from BEFORE epochs before b to t: flat up to b, then rising at a rate r (and alike to "
            "the gap, val loss minus train loss). The widening began when the val loss's rate exceeds z standard "
            "errors and the gap's gap_z (the train loss does not rise alike); the rule fires at the first t where "
            "this holds at t and at t - 1 (CONFIRM epochs). Where the rise began is weighed over the last reach "
            "epochs: each b by its broken line's marginal likelihood on the val loss of the last reach + BEFORE "
            "epochs (from where the loss settled, if that is later), the line's level and rate integrated out: "
            "exp(-SSE / 2 noise^2) / sqrt(det(X'X)); the rule keeps the "
            "held epoch most likely within 3 epochs of the onset (NEAR). The val loss judged is a weighted "
            "mean of the per-photo losses, with the weights that see a rise best through the photos' noise: the "
            "photos' recent mean losses (an overfitting model's val loss rises in the photos it gets wrong or is "
            "unsure of) times the inverse covariance of their epoch-to-epoch changes (photos that jitter together "
            "count as such; correlations shrunk towards zero, Schafer-Strimmer), negative weights set to 0. The "
            "plain mean val loss must rise too (a positive rate on the same broken line), so a few photos rising "
            "while the val loss falls is not a widening. A standard error comes from the epoch-to-epoch noise, "
            "the larger of what that covariance gives the judged loss and the series' own scatter (its second "
            "differences). Until it fires, the steady best-val epoch is kept. Without per-photo losses (an older "
            "metrics.csv), the mean val loss and its scatter alone.")

    def describe(self):
        return (f"divergence: from epoch {self.min_epochs}, the val loss (photos weighted by signal over noise, "
                f"their joint jitter included; the plain mean rising too) must rise and the val-train loss gap "
                f"widen from a flat level, by more than {self.z:g} and {self.gap_z:g} standard errors of their "
                f"epoch-to-epoch noise, the rise begun at most {self.reach} epochs back; the held epoch most likely "
                f"within {NEAR} epochs of where it began is kept"
                + ("" if self.early_stop else "; --no-early-stop: training goes on after it fires"))

    def test(self, rows, notes):
        """The best broken line ending at rows[-1]: where the rise began, its rates and their z (JSON), and the
        odds of each onset (onset_odds)."""
        val, noise_val = judged_val(rows, notes)
        gap = [v - r["train_loss"] for v, r in zip(val, rows)]
        noise_gap = max(math.hypot(noise_val, noise(rows, "train", notes)), scatter(gap[-SCATTER_EPOCHS:]), 1e-9)
        noise_val = max(noise_val, 1e-9)  # (a constant series: no noise)
        best = None
        for k in range(max(1, len(rows) - 1 - self.reach), len(rows) - 2):  # k: the index of the flat level's end
            start = max(0, k - BEFORE)
            r_val, f = hinge(val[start:], k - start)
            r_gap, _ = hinge(gap[start:], k - start)
            z_val, z_gap = r_val / (noise_val * f), r_gap / (noise_gap * f)
            if best is None or min(z_val / self.z, z_gap / self.gap_z) > min(best[1] / self.z, best[2] / self.gap_z):
                best = (k, z_val, z_gap, r_val, r_gap)
        k, z_val, z_gap, r_val, r_gap = best
        start = max(0, k - BEFORE)
        r_mean, _ = hinge([r["val_loss"] for r in rows[start:]], k - start)  # (the plain mean, on the best line)
        odds = self.onset_odds(rows, val, noise_val)
        return {"epoch": rows[-1]["epoch"], "began": max(odds, key=odds.get), "val_rate": round(r_val, 5),
                "val_z": round(z_val, 2), "gap_rate": round(r_gap, 5), "gap_z": round(z_gap, 2),
                "val_noise": round(noise_val, 5), "mean_rate": round(r_mean, 5),
                "widening": bool(z_val > self.z and z_gap > self.gap_z and r_mean > 0)}, odds

    def onset_odds(self, rows, val, noise_val):
        """{epoch b: the probability that the rise began after b}, over the last `reach` epochs but two: each b
        weighed by the marginal likelihood of its broken line (flat up to b, then linear) on the judged val
        loss since it settled, the line's level and rate integrated out under flat priors:
        exp(-SSE / 2 noise^2) / sqrt(det(X'X)), X the line's two columns (a flat prior over b). The best fit
        alone (SSE) does not count how many epochs pin each line's rate, and keeps early; the determinant,
        which grows with the epochs after the onset, does."""
        y = np.asarray(val[settled(val, noise_val, self.reach):], dtype=float)
        log_likelihood = {}
        for k in range(max(1, len(y) - 1 - self.reach), len(y) - 2):  # (every b judged on the same epochs)
            u = np.maximum(0, np.arange(len(y)) - k).astype(float)
            x = np.stack([np.ones_like(u), u], 1)
            residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
            log_likelihood[rows[len(rows) - len(y) + k]["epoch"]] = (
                -float(residual @ residual) / (2 * noise_val ** 2) - 0.5 * math.log(np.linalg.det(x.T @ x)))
        top = max(log_likelihood.values())
        likelihood = {b: math.exp(v - top) for b, v in log_likelihood.items()}
        total = sum(likelihood.values())
        return {b: v / total for b, v in likelihood.items()}

    def replay(self, history, notes=None):
        """The tests over the history, and whether and where the rule fired."""
        notes = set() if notes is None else notes
        history = [dict(r, **{k: np.asarray(r[k], dtype=float) for k in ("val_losses", "train_losses")
                          if r.get(k) is not None})
                   for r in history]  # (once: every test below reads them)
        tests = []
        for i in range(len(history)):
            if history[i]["epoch"] < self.min_epochs or i < 4:
                continue
            result, odds = self.test(history[:i + 1], notes)
            tests.append(result)
            if len(tests) >= CONFIRM and all(t["widening"] for t in tests[-CONFIRM:]):  # (one odd epoch is not enough)
                return {"fired": True, "fired_at": history[i]["epoch"], "widening_start": tests[-1]["began"],
                        "onset_odds": [[b, round(p, 4)] for b, p in odds.items()], "tests": tests}
        return {"fired": False, "tests": tests}

    def observe(self, history, available=None):
        notes = set()
        found = self.replay(history, notes)
        if found["fired"]:
            began, upto = found["widening_start"], [r for r in history if r["epoch"] <= found["fired_at"]]
            held = self.candidates(upto[:-1]) | {found["fired_at"]} if len(upto) > 1 else {found["fired_at"]}
            losses = dict(zip((r["epoch"] for r in upto), smoothed([r["val_loss"] for r in upto], 1)))
            near = {e: sum(p for b, p in found["onset_odds"] if abs(b - e) <= NEAR) for e in held}
            chosen = max(held, key=lambda e: (round(near[e], 6), -abs(e - began), -losses[e], -e))
            reason = (f"the gap widened beyond noise: from epoch {began} (the likeliest onset) the val loss rose and "
                      f"the val-train loss gap widened, beyond {self.z:g} and {self.gap_z:g} standard errors by epoch "
                      f"{found['fired_at']}; kept epoch {chosen}, of the epochs held the one most likely within "
                      f"{NEAR} epochs of the onset ({100 * near[chosen]:.0f} %)")
            needed = {chosen}
        else:
            chosen = steady_best(history, 2, available)
            why = (f"the gap did not widen beyond noise in {len(history)} epochs" if history[-1]["epoch"] >= self.min_epochs
                   else f"no decision before epoch {self.min_epochs} (the run has {len(history)} epochs)")
            reason = f"{why}; kept the steady best-val epoch {chosen} instead"
            needed = self.candidates(history)
        if notes:
            reason += " (" + "; ".join(sorted(notes)) + ")"
        return Decision(found["fired"] and self.early_stop, chosen, frozenset(needed), reason, found)


    def candidates(self, history):
        """The epochs a later firing may keep, few enough to hold in memory: in every block of BLOCK epochs
        (counted from epoch 1) that a widening found later may reach, the one of lowest smoothed val loss
        whose mean is final (the val loss is lowest where a rise begins), and the newest epoch (whose mean
        is not). Each epoch where a widening may begin has a candidate within BLOCK - 1 epochs: its block's."""
        last = history[-1]["epoch"]
        losses = dict(zip((r["epoch"] for r in history), smoothed([r["val_loss"] for r in history], 1)))
        blocks = {}
        for e in (e for e in losses if last - self.reach - 3 <= e < last):
            blocks.setdefault((e - 1) // BLOCK, []).append(e)
        return {last} | {min(block, key=lambda e: (losses[e], e)) for block in blocks.values()}


BEFORE = 8  # epochs of the flat level before a rise, in the broken-line fit
CONFIRM = 2  # consecutive epochs whose tests must all find the widening (a single noisy epoch is not one)
BLOCK = 2  # the divergence rule holds one candidate epoch per this many epochs
NEAR = 3  # the kept epoch is the held one most likely within this many epochs of the onset
SCATTER_EPOCHS = 30  # the epoch-to-epoch noise is measured over the last this many epochs


def hinge(values, k):
    """The rise per epoch after index k of a broken line fitted to `values` (flat up to k, then linear),
    and its standard error per unit noise."""
    u = np.maximum(0, np.arange(len(values)) - k).astype(float)
    du = u - u.mean()
    sxx = float(du @ du)
    return float(du @ np.asarray(values, dtype=float)) / sxx, 1 / math.sqrt(sxx)


def settled(val, noise_val, reach):
    """Where the onset's fit starts: the last reach + BEFORE epochs, or later, from the first epoch whose
    smoothed val loss is within two noise units of the lowest (a loss still falling from training is
    not a flat level, and would pull the fitted onset back into the fall)."""
    level = smoothed(val, 1)
    low = min(level)
    first = next(i for i, v in enumerate(level) if v <= low + 2 * noise_val)
    return max(len(val) - (reach + BEFORE + 1), min(first, len(val) - 5))


def per_photo(rows, split):
    """(epochs, photos) array of the rows' per-photo `split` losses, or None where any row lacks them or
    the photo count changed."""
    photos = [r.get(f"{split}_losses") for r in rows]
    if any(p is None for p in photos) or len({len(p) for p in photos}) != 1 or len(photos[0]) < 2:
        return None
    return np.asarray(photos, dtype=float)


def noise(rows, split, notes):
    """The epoch-to-epoch noise (standard deviation) of the mean `split` loss over the last SCATTER_EPOCHS:
    the larger of the paired per-photo estimate (the spread of each photo's change from one epoch to the
    next, over the square root of the photo count and of 2) and the series' own scatter."""
    recent = rows[-SCATTER_EPOCHS:]
    series = scatter([r[f"{split}_loss"] for r in recent])
    losses = per_photo(recent, split)
    if losses is None:
        notes.add(f"per-photo {split} losses were not recorded: the noise is the mean {split} loss's own "
                  "epoch-to-epoch scatter")
        return series
    changes = np.diff(losses, axis=0)  # each photo against itself
    paired = float(np.sqrt(np.mean(changes.var(axis=1, ddof=1)) / changes.shape[1] / 2))
    return max(paired, series)


def judged_val(rows, notes):
    """The val loss series the divergence rule judges, and its epoch-to-epoch noise. With per-photo losses:
    a weighted mean of each epoch's photo losses, with the weights that see a rise best through the noise
    (generalised least squares: the noise's inverse covariance applied to the signal), those below 0 set
    to 0 so that it stays a mean of losses. The signal is each photo's mean loss over the last
    SCATTER_EPOCHS: when a model overfits, the val loss rises in the photos it gets wrong or is unsure of.
    The noise is the photos' epoch-to-epoch changes there, photos that jitter together included
    (shrunk_covariance). The series' noise is the larger of what that covariance gives the weighted loss
    and the weighted series' own scatter. Without per-photo losses, the mean val loss and noise()."""
    losses = per_photo(rows, "val")
    if losses is not None and len(rows) >= 3:
        recent = losses[-SCATTER_EPOCHS:]
        diagonal, factor = shrunk_covariance(np.diff(recent, axis=0) / math.sqrt(2))
        weights = np.maximum(solve(diagonal, factor, recent.mean(axis=0)), 0.0)
        if weights.sum() > 0:  # (else every photo is at loss 0: the mean)
            weights /= weights.sum()
            val = (losses @ weights).tolist()
            spread = math.sqrt(max(float(weights ** 2 @ diagonal + np.sum((factor.T @ weights) ** 2)), 0.0))
            return val, max(spread, scatter(val[-SCATTER_EPOCHS:]))
    spread = noise(rows, "val", notes)
    if losses is None and not any(n.startswith("per-photo val") for n in notes):
        notes.add("per-photo val losses were not recorded at every epoch: the mean val loss is judged")
    return [r["val_loss"] for r in rows], spread


def shrunk_covariance(changes):
    """The covariance of the photos' epoch-to-epoch noise from `changes` (epochs x photos), as
    diag(diagonal) + factor @ factor.T. With fewer epochs than photos the sample covariance cannot be
    inverted, so its correlations are shrunk towards zero by the Schafer-Strimmer intensity (the
    correlations' estimated sampling variance over their squares; Schafer & Strimmer 2005, sums over
    photo pairs i != j), the variances kept; a variance below the median photo's is raised to it (a photo
    always right, near loss 0 with no noise, must not weigh without bound). Every sum is taken in the
    epochs x epochs space, so any number of photos costs little."""
    x = changes - changes.mean(axis=0)
    n = len(x)
    variance = (x ** 2).sum(axis=0) / max(n - 1, 1)
    floor = max(float(np.median(variance)), 1e-12)
    if n < 3:
        return np.maximum(variance, floor), np.zeros((len(variance), 0))
    y = x / np.sqrt(np.where(variance > 0, variance, 1.0))  # standardised (a photo that never moved stays 0)
    # w[k,i,j] = y[k,i] y[k,j]; over pairs i != j: sum of mean(w)^2, and sum over k of w^2
    per_photo_squares = (y ** 2).sum(axis=0) / n
    mean_w_squared = float(np.sum((y @ y.T) ** 2)) / n ** 2 - float(per_photo_squares @ per_photo_squares)
    per_epoch_squares = (y ** 2).sum(axis=1)
    w_squared = float(per_epoch_squares @ per_epoch_squares) - float((y ** 4).sum())
    correlation_squares = mean_w_squared * n ** 2 / (n - 1) ** 2
    sampling_variance = n / (n - 1) ** 3 * (w_squared - n * mean_w_squared)
    shrink = min(1.0, max(0.0, sampling_variance / correlation_squares)) if correlation_squares > 0 else 1.0
    shrink = max(shrink, 1e-3)  # (some shrinking keeps the covariance invertible)
    diagonal = np.maximum(shrink * variance + np.maximum(floor - variance, 0.0), 1e-3 * floor)
    return diagonal, x.T * math.sqrt((1 - shrink) / (n - 1))


def solve(diagonal, factor, signal):
    """(diag(diagonal) + factor @ factor.T)^-1 @ signal, by the Woodbury identity (an epochs x epochs solve)."""
    scaled = factor / diagonal[:, None]
    inner = np.eye(factor.shape[1]) + factor.T @ scaled
    return signal / diagonal - scaled @ np.linalg.solve(inner, scaled.T @ signal)


def scatter(values):
    """The epoch-to-epoch noise (standard deviation) of a series, from its second differences, which a
    straight line leaves at zero (each has variance 6 sigma^2 for independent noise): their root mean
    square, so that the occasional jump counts in full."""
    d2 = np.diff(np.asarray(values, dtype=float), 2)
    return float(np.sqrt(np.mean(d2 ** 2) / 6)) if len(d2) else math.inf


def lowest_loss(rows, available=None):
    """The epoch of the lowest val loss, as a centred mean over it and its neighbours (a single lucky epoch
    does not win), among `available` epochs."""
    losses = smoothed([r["val_loss"] for r in rows], 1)
    pairs = [(v, r["epoch"]) for v, r in zip(losses, rows) if available is None or r["epoch"] in available]
    return min(pairs or list(zip(losses, (r["epoch"] for r in rows))))[1]


def outcome(decision):
    """What a rule decided, as JSON: fired (the divergence rule), where, the chosen epoch and why."""
    return {"fired": decision.evidence.get("fired", False), "fired_at": decision.evidence.get("fired_at"),
            "chosen_epoch": decision.chosen, "reason": decision.reason}


# ---------------------------------------------------------------- the flags

DEFAULT = "divergence"  # the recipe's rule
KEEP = {"last": LastEpoch, "best": SteadyBest}  # stage 2's --keep


def add_args(group):
    """--rule and every registered rule's flags."""
    group.add_argument("--rule", choices=list(RULES), default=DEFAULT,
                       help="what the stage keeps and when it stops: " + "; ".join(
                           f"{name} ({cls.help})" for name, cls in RULES.items()))
    for cls in RULES.values():
        cls.add_flags(group)


def add_keep_arg(group):
    group.add_argument("--keep", choices=list(KEEP), default="last",
                       help="which epoch becomes final.pth: the last (the recipe's 20th), or the steady best-val "
                            "epoch (chosen on val, so val flatters it)")


def from_args(values, name=None):
    """The rule `name` (default: values' "rule", else DEFAULT) with the settings in `values` (a namespace or a
    dict of flags); an unknown name is an error."""
    values = values if isinstance(values, dict) else vars(values)
    name = name or values.get("rule") or DEFAULT
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; the rules are {', '.join(RULES)}")
    return RULES[name].from_flags(values)


def keep_rule(values):
    """Stage 2's rule from --keep."""
    values = values if isinstance(values, dict) else vars(values)
    return KEEP[values.get("keep") or "last"]()


def flag_values(rule):
    """The flags that make `rule`, by their names in args.json."""
    return {"rule": rule.name, **asdict(rule)}


def default_rule():
    return from_args({})
