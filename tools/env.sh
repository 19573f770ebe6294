# Sourced by the quick-start scripts: keep every cache inside the environment folder, so a run
# writes nothing outside data/, checkpoints/ and .venv/.
VENV=${VENV:-.venv}
export U2NET_HOME=${U2NET_HOME:-$PWD/$VENV/u2net}        # rembg models
export TORCH_HOME=${TORCH_HOME:-$PWD/$VENV/torch}        # torchvision's ImageNet weights
export MPLCONFIGDIR=${MPLCONFIGDIR:-$PWD/$VENV/matplotlib}
export PYTHONPYCACHEPREFIX=$PWD/$VENV/pycache            # no __pycache__ beside the sources
export PYTHONUNBUFFERED=1
