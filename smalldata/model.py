"""Model builder: any torchvision classification model with its head sized to the classes."""
import argparse
import difflib
import os

import torch
import torchvision
from torch import nn

from .cli import UsageError


def classification_archs():
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_name(text):
    """An argparse type: a torchvision classification model name, checked before any photo is decoded."""
    if text not in classification_archs():
        close = difflib.get_close_matches(text, classification_archs(), n=3)
        raise argparse.ArgumentTypeError(f"unknown model {text!r}" + (f"; did you mean {', '.join(close)}?" if close
                                         else "; see torchvision.models.list_models()"))
    return text


def check_input(arch, img_size):
    """None when `arch` trains on img_size x img_size photos and returns one tensor of logits; else one
    line saying why not and what would work. Checked on PyTorch's meta device (shapes only, no memory,
    no compute), before any photo is decoded."""
    def logits(size):
        return meta_model(arch).train()(torch.empty(2, 3, size, size, device="meta"))

    anywhere = "vgg13_bn, resnet50, efficientnet_b0 and convnext_tiny take any size from 32 px"
    try:
        out = logits(img_size)
    except NotImplementedError:  # a model that cannot be built on the meta device: training will tell
        return None
    except Exception as e:  # noqa: BLE001 - any failure of the forward pass means: not at this size
        works = []
        for size in (224, 299, 256, 384):
            try:
                logits(size)
                works.append(size)
            except Exception:  # noqa: BLE001
                pass
        return (f"--arch {arch} does not run at --img-size {img_size} ({str(e).splitlines()[0][:120]}); "
                + (f"it does at --img-size {works[0]}" if works else f"choose another model ({anywhere})"))
    if not torch.is_tensor(out) or tuple(out.shape) != (2, 2):
        return (f"--arch {arch} returns {type(out).__name__} in training (auxiliary outputs), not one tensor of "
                f"logits, so it cannot be trained here; choose another model ({anywhere})")
    return None


def meta_model(arch):
    """`arch` with 2 classes on PyTorch's meta device: shapes only, no memory, no compute."""
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None, num_classes=2)


def imagenet_weights(arch):
    """torchvision's default ImageNet weights enum entry for `arch`."""
    return torchvision.models.get_model_weights(arch).DEFAULT


def imagenet_cache_path(arch):
    url = imagenet_weights(arch).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def imagenet_available(arch):
    """True when the ImageNet weights are in torch's cache (no network needed)."""
    return os.path.exists(imagenet_cache_path(arch))


def build_model(arch, num_classes, weights="none"):
    """torchvision `arch` with `num_classes` outputs; weights: 'none' or 'imagenet'.

    The state_dict keys are those of `torchvision.models.<arch>(num_classes=...)`, so a
    checkpoint loads into a plain torchvision model with no renaming.
    """
    if arch not in classification_archs():
        raise UsageError(f"unknown --arch {arch!r}; torchvision classification models: "
                         f"{', '.join(classification_archs())}")
    if weights == "none":
        return fp32_head(torchvision.models.get_model(arch, weights=None, num_classes=num_classes))
    if weights != "imagenet":
        raise ValueError(weights)
    fetch_imagenet(arch)
    model = torchvision.models.get_model(arch, weights=imagenet_weights(arch))
    replace_head(model, num_classes)
    return fp32_head(model)


def fetch_imagenet(arch):
    """Have torchvision's ImageNet weights for `arch` in torch's cache (downloaded when missing), or a
    UsageError that says where to put them: called before any photo is decoded."""
    try:
        imagenet_weights(arch).get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad cache file a RuntimeError
        raise UsageError(
            f"ImageNet weights for {arch} could not be loaded ({e}). Put "
            f"{os.path.basename(imagenet_weights(arch).url)} at {imagenet_cache_path(arch)} "
            "(from a machine with network access), or train from scratch with --weights none") from None


def replace_head(model, num_classes):
    """Swap the last classification layer (Linear, or a 1x1 Conv2d in SqueezeNet) for a fresh one."""
    name, old = last_layer(model)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, bias=old.bias is not None)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return model


def fp32_head(model):
    """Run the last classification layer in float32 even under bf16/fp16 autocast: logits rounded to
    bf16 flip argmaxes between close classes, and a loss change at lr 1e-7 drowns in bf16's rounding.
    The layer's class becomes a subclass with that forward (the state_dict keys stay torchvision's;
    a deep copy keeps it). The head is tiny, so this costs nothing measurable."""
    name, layer = last_layer(model)
    base = type(layer)
    if getattr(base, "FP32_HEAD", False):
        return model
    layer.__class__ = type(f"Float32{base.__name__}", (base,), {"forward": _float32_forward, "FP32_HEAD": True})
    return model


def _float32_forward(self, x):
    with torch.autocast(x.device.type, enabled=False):
        return super(type(self), self).forward(x.float())


def last_layer(model):
    """(name, module) of the last Linear or Conv2d: the classification head in torchvision's models."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = (name, module)
    return last


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
