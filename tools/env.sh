# Sourced by the quick-start scripts: keep every cache inside the environment folder, so a run
# writes nothing outside data/, checkpoints/ and .venv/. rembg's models: U2NET_HOME when you set it,
# else rembg's own folders (~/.u2net), else .venv/u2net where the set-up put u2netp.
VENV=${VENV:-.venv}
export TORCH_HOME=${TORCH_HOME:-$PWD/$VENV/torch}        # torchvision's ImageNet weights
export MPLCONFIGDIR=${MPLCONFIGDIR:-$PWD/$VENV/matplotlib}
export PYTHONPYCACHEPREFIX=$PWD/$VENV/pycache            # no __pycache__ beside the sources
export PYTHONUNBUFFERED=1
