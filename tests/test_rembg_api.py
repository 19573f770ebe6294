"""smalldata/rembg_api.py is the one module that touches rembg: if a rembg release moves anything it uses,
this fails, naming what moved (requirements.txt keeps rembg below 3)."""
import inspect

from rembg import bg, new_session
from rembg.sessions import sessions, sessions_class

from conftest import REPO
from smalldata import rembg_api


def test_rembg_still_has_what_rembg_api_uses():
    assert "u2netp" in sessions and any(c.name() == "u2netp" for c in sessions_class)
    cls = sessions["u2netp"]
    for name in ("is_local", "resolve_existing", "download_models", "name"):
        assert callable(getattr(cls, name, None)), name
    assert "model_name" in inspect.signature(new_session).parameters  # new_session(model, sess_opts=, providers=)
    assert callable(bg.post_process) and callable(bg.alpha_matting_cutout)
    assert "pooch" in inspect.getsource(cls.download_models)  # what no_downloads() intercepts
    session = rembg_api.open_session("u2netp", ["CPUExecutionProvider"], 1, 1)
    assert hasattr(session, "inner_session") and rembg_api.providers_of(session) == ["CPUExecutionProvider"]


def test_models_are_found_where_rembg_looks_then_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # rembg's default folders (~/.u2net, ~/.rembg) are empty here
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("REMBG_HOME", raising=False)
    found = rembg_api.find_model("u2netp")  # the set-up's copy in the environment folder
    assert found and str(rembg_api.extra_home()) in found
    monkeypatch.delenv("U2NET_HOME", raising=False)
    mine = tmp_path / ".u2net" / "u2netp.onnx"  # a user's own copy in rembg's default place wins
    mine.parent.mkdir()
    mine.write_bytes((rembg_api.extra_home() / "u2netp.onnx").read_bytes())
    assert rembg_api.find_model("u2netp") == str(mine)


def test_without_alpha_matting_rembg_imports_without_compiling_pymatting():
    # pymatting compiles its numba kernels when rembg imports it (about 100 s in a new environment);
    # BR without --alpha-matting switches numba's compiler off first, and leaves it on when asked.
    import os
    import subprocess
    import sys

    code = ("import os, sys; from smalldata import rembg_api; rembg_api.skip_matting_compile({}); "
            "print(os.environ.get('NUMBA_DISABLE_JIT')); "
            "import rembg, numba; print(numba.config.DISABLE_JIT) if 'rembg' in sys.modules else None")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    off = subprocess.run([sys.executable, "-c", code.format(False)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["1", "1"]
    on = subprocess.run([sys.executable, "-c", "import os; from smalldata import rembg_api; "
                         "rembg_api.skip_matting_compile(True); print(os.environ.get('NUMBA_DISABLE_JIT'))"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert on.stdout.split() == ["None"]
