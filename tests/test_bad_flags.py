"""Every script, fed bad flag values: exit 2, one line on stderr that names the problem, no traceback,
and nothing written. The values are checked while parsing, before any photo is decoded."""
import argparse

import pytest

from conftest import REPO, run_here, run_script, write_photo_set

BR, OCM, S1, S2, SCORE = "make_remove_background.py", "make_cutmix.py", "model_1e-4.py", "model_1e-7_ep20.py", \
    "check_score.py"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_photo_set(root / "data" / "train", per_class=1, size=16, classes=["chelsea", "coffee"])
    write_photo_set(root / "data" / "val", per_class=1, size=16, classes=["chelsea", "coffee"])
    write_photo_set(root / "one" / "train", per_class=2, size=16, classes=["chelsea"])
    write_photo_set(root / "one" / "val", per_class=1, size=16, classes=["chelsea"])
    (root / "a_file").write_text("not a folder")
    return root


CASES = {  # script -> [(flags, words the message must hold)]; {root} is the fixture's folder
    S1: [(["--epochs", "0"], "--epochs"), (["--batch-size", "-3"], "--batch-size"), (["--lr", "fast"], "--lr"),
         (["--img-size", "0"], "--img-size"), (["--arch", "vgg13bn"], "vgg13_bn"),
         (["--data", "{root}/a_file"], "is a file"), (["--data", "{root}/nowhere"], "not found"),
         (["--out", "{root}/a_file"], "is a file"), (["--data", "{root}/one", "--weights", "none"], "at least two"),
         (["--patience", "0"], "--patience"), (["--noise-z", "nan"], "--noise-z"), (["--data-on", "gpu"], "--data-on"),
         (["--data", "{root}/data", "--weights", "none", "--sync-bn"], "--sync-bn")],
    S2: [(["--epochs", "-1"], "--epochs"), (["--init", "{root}/nowhere.pth"], "not found"),
         (["--data", "{root}/a_file"], "is a file"), (["--keep", "worst"], "--keep")],
    SCORE: [(["--batch-size", "0"], "--batch-size"), (["--data", "{root}/nowhere"], "not found"),
            (["--checkpoint", "{root}/nowhere.pth"], "not found"), (["--checkpoint", "{root}/data"], "not a file"),
            (["--mistakes", "x"], "--mistakes")],
    OCM: [(["--count", "0"], "--count"), (["--count", "100000"], "99999"), (["--alpha", "-1"], "--alpha"),
          (["--img-size", "4"], "--img-size"), (["--src", "{root}/nowhere"], "not found"),
          (["--src", "{root}/data/train", "--dst", "{root}/a_file"], "is a file")],
    BR: [(["--min-fg", "2"], "--min-fg"), (["--threads", "-1"], "--threads"), (["--preview-count", "0"], "preview"),
         (["--src", "{root}/data/train", "--dst", "{root}/a_file"], "is a file"),
         (["--src", "{root}/nowhere"], "not found"), (["--min-fg", "0.5", "--max-fg", "0.4"], "--min-fg"),
         (["--shard", "2/2"], "--shard"), (["--shard", "half"], "--shard"), (["--min-confidence", "1.5"], "--min-confidence")],
}


@pytest.mark.parametrize("script,flags,words", [(s, f, w) for s, cases in CASES.items() for f, w in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_a_bad_value_is_one_line_and_exit_2(script, flags, words, places, tmp_path):
    flags = [f.replace("{root}", str(places)) for f in flags]
    defaults = [] if script in (BR, OCM, SCORE) else ["--out", str(tmp_path / "ck")]
    r = run_here(script, *defaults, *flags)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert words in lines[0], lines[0]
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("where", ["empty folder", "only data/train"])
def test_every_script_with_no_arguments_ends_cleanly(where, tmp_path):
    """The defaults taken, not only the flags given: in a folder with nothing, or with only data/train,
    every script finishes or says in one line what is missing; never a traceback, never exit 70."""
    if where == "only data/train":
        write_photo_set(tmp_path / "data" / "train", per_class=2, size=16, classes=["chelsea", "coffee"])
    for script in (BR, OCM, S1, S2, SCORE, "inspect_checkpoint.py"):
        r = run_script(script, cwd=tmp_path, timeout=600)
        assert r.returncode in (0, 1, 2), (script, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "bug" not in r.stderr, (script, r.stderr[-2000:])
        if r.returncode == 2:
            assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, (script, r.stderr)


# ------------------------------------------------------------------------------------------ the fuzz test

FUZZ = ["0", "-1", "inf", "nan"]  # and a huge value: 1e30 for a flag that takes fractions, 10**12 for counts
SCRIPTS = (BR, OCM, S1, S2, SCORE, "inspect_checkpoint.py")


def numeric_flags(script):
    """Every flag of the script's parser that takes one number (found, not listed: a new flag is fuzzed
    too), with whether it takes fractions."""
    import runpy

    parser = runpy.run_path(str(REPO / script), run_name="fuzz")["build_parser"]()
    found = []
    for action in parser._actions:
        if not action.option_strings or action.type is None or action.nargs not in (None, 1):
            continue
        try:
            value = action.type("1")
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                fractions = isinstance(action.type("0.5"), float)
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                fractions = False
            found.append((action.option_strings[-1], fractions))
    return found


CASES_FUZZ = [(script, flag, value) for script in SCRIPTS for flag, fractions in numeric_flags(script)
              for value in FUZZ + ["1e30" if fractions else "1000000000000"]]
CASES_FUZZ += [(S1, "--measure-averages", f"ema{v}") for v in FUZZ + ["1e30"]]  # a number inside a spec


@pytest.fixture(scope="module")
def fuzz_places(tmp_path_factory):
    """Tiny real data, a seeded checkpoint of its classes, and the base arguments of each script."""
    from test_reliability import small_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    write_photo_set(data / "train", per_class=2, size=32, classes=["chelsea", "coffee"])
    write_photo_set(data / "val", per_class=1, size=32, classes=["chelsea", "coffee"])
    ckpt = small_checkpoint(root / "m.pth", ["chelsea", "coffee"])
    train = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--weights", "none"]
    common = ["--device", "cpu", "--no-br", "--no-ocm", "--data", data]
    return {BR: ["--src", data / "train", "--model", "u2netp", "--min-confidence", "0", "--fallback", "copy"],
            OCM: ["--src", data / "train", "--count", "4", "--img-size", "16"],
            S1: [*common, *train], S2: [*common, "--init", ckpt, "--epochs", "1", "--batch-size", "2"],
            SCORE: ["--checkpoint", ckpt, "--data", data / "val", "--device", "cpu"],
            "inspect_checkpoint.py": [ckpt]}


def with_flag(args, flag, value):
    """The base arguments with `flag` set to `value` (replacing the base's own value of it)."""
    args = list(args)
    if flag in args:
        del args[args.index(flag):args.index(flag) + 2]
    return [*args, flag, value]


@pytest.mark.parametrize("script,flag,value", CASES_FUZZ, ids=lambda v: str(v))
def test_fuzz_every_numeric_flag_at_0_minus_1_inf_nan_and_huge_is_never_a_bug_or_a_kill(script, flag, value,
                                                                                        fuzz_places, tmp_path):
    """Every number flag of every script at 0, -1, inf, nan and a huge value: refused in one line while
    parsing (exit 2), or a run that ends as runs end (0, 1, 2), never exit 70 (a bug) or 137 (killed for
    memory). Most values stop at the parser; the others run on two photos per class."""
    import torch

    out = ["--dst", tmp_path / "out"] if script in (BR, OCM) else [] if script == "inspect_checkpoint.py" else \
        ["--out", tmp_path / "out"]
    det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        r = run_here(script, *with_flag([*fuzz_places[script], *out], flag, value))
    finally:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
    assert r.returncode in (0, 1, 2, 3), (r.returncode, r.stderr[-3000:])  # (3: training went non-finite, said)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if r.returncode == 2:
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr[-3000:]
    if r.returncode == 3:  # (after decoding: its progress bars, then the one line)
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1, r.stderr[-3000:]
