"""Weight averages kept beside the trained weights, as candidates for what a stage hands on: SWA and an EMA.

Each is measured like the trained weights (its own exact BatchNorm statistics, then val and --watch),
and saved under its own name (swa.pth, ema.pth). No rule reads them: they are candidates a person (or
the next stage's --init) may prefer, with their scores beside the rule's choice.

* SWA (Izmailov et al. 2018): the plain mean of the weights at the end of the last W epochs. A trailing
  window, so that it is defined wherever the stage ends (the divergence rule stops it early), and W is
  stored with the run: a resume or an extension averages the same window. Its epochs' weights are the
  keeper's (held to the end, restored from their files on a resume), not copies of its own.
* EMA: an exponential moving average updated after every step, with a time constant of T epochs (decay
  1 - 1/(T x steps per epoch), warmed up as timm's ModelEmaV3 does: min(decay, (1 + n) / (10 + n)) at
  update n). Its weights travel in last.pth.
"""
import copy

import torch

from . import checkpoint


class Average:
    name = ""

    def __init__(self, model, epochs):
        self.epochs = epochs
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def after_step(self, model, steps_per_epoch):
        """After each optimiser step."""

    def held(self, epoch):
        """Epochs whose weights the keeper must hold after `epoch` for this average."""
        return set()

    def prepare(self, kept, epoch):
        """Make self.model the average as it stands after `epoch` (kept: {epoch: weights} the keeper holds)."""

    def describe(self):
        """What the average holds, as it stands."""
        raise NotImplementedError

    def definition(self):
        """What the average is, before any epoch (the banner)."""
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class SWA(Average):
    name = "swa"

    def held(self, epoch):
        return set(range(max(1, epoch - self.epochs + 1), epoch + 1))

    @torch.no_grad()
    def prepare(self, kept, epoch):
        self.averaged = sorted(e for e in self.held(epoch) if e in kept)
        states = [kept[e] for e in self.averaged]
        mine = self.model.state_dict()
        for key, tensor in mine.items():  # the plain mean, summed in epoch order
            parts = [s[key].to(tensor.device) for s in states]
            tensor.copy_(torch.stack(parts).sum(0) / len(parts) if tensor.is_floating_point() else parts[-1])

    def definition(self):
        return f"the mean of the weights at the end of the last {self.epochs} epochs the stage trains (SWA)"

    def describe(self):
        first, last = self.averaged[0], self.averaged[-1]
        window = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        short = f" (the run had {len(self.averaged)} of the window's {self.epochs})" if len(self.averaged) < self.epochs \
            else ""
        return f"SWA: the mean of the weights at the end of {window}{short}, BatchNorm statistics recomputed"


class EMA(Average):
    name = "ema"

    def __init__(self, model, epochs):
        super().__init__(model, epochs)
        self.updates = 0

    @torch.no_grad()
    def after_step(self, model, steps_per_epoch):
        decay = min(1 - 1 / (self.epochs * steps_per_epoch), (1 + self.updates) / (10 + self.updates))
        mine = list(self.model.parameters()) + list(self.model.buffers())
        theirs = [t.detach() for t in list(model.parameters()) + list(model.buffers())]
        floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)
        for a, b in zip(mine, theirs):
            if not a.is_floating_point():
                a.copy_(b)
        self.updates += 1

    def definition(self):
        return f"an exponential moving average of the weights after every step, time constant {self.epochs:g} epochs"

    def describe(self):
        return (f"EMA: an exponential moving average of the weights after every step ({self.updates} steps), "
                f"time constant {self.epochs:g} epochs, BatchNorm statistics recomputed")

    def state_dict(self):
        return {"model": checkpoint.snapshot(self.model.state_dict()), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def make(model, swa_epochs, ema_epochs):
    """The averages a stage keeps beside its weights, by name (none where its setting is 0)."""
    out = {}
    if swa_epochs:
        out[SWA.name] = SWA(model, swa_epochs)
    if ema_epochs:
        out[EMA.name] = EMA(model, ema_epochs)
    return out
