"""Set-up step: make rembg's u2netp model available offline (see smalldata/rembg_api.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata.rembg_api import fetch_u2netp  # noqa: E402

if __name__ == "__main__":
    fetch_u2netp()
