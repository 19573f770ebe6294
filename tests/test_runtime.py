"""The GPU-facing choices, checked on the CPU: number format, determinism, batch shapes, host syncs,
optimizer state layout on resume, model names and CJK class names in pictures."""
import os
import socket

import pytest
import torch
from torch import nn

from conftest import fake_nvidia_smi, run_here
from smalldata import runtime
from smalldata.cli import UsageError
from smalldata.data import batch_order
from smalldata.settings import Optimiser
from smalldata.train import make_loop, restore_training_state, train_epoch, training_state


def tiny_model(classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


def tiny_loop(model=None, batch_size=4):
    return make_loop(model or tiny_model(), Optimiser(lr=1e-3, batch_size=batch_size), torch.device("cpu"), None,
                     [0.5] * 3, [0.25] * 3)


def tiny_data(n=10, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def test_gpus_that_only_emulate_bf16_get_fp16(monkeypatch):
    def is_bf16_supported(including_emulation=True):  # a T4 or V100: bf16 only through emulation
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert runtime.amp_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an H100
    assert runtime.amp_dtype(torch.device("cuda")) == torch.bfloat16
    assert runtime.amp_dtype(torch.device("cpu")) is None


def test_deterministic_mode_sets_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    state = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        runtime.setup("cpu", seed=0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])


def test_every_training_batch_has_one_shape():
    sizes = {len(b) for b in batch_order(10, 4, torch.Generator().manual_seed(0), drop_last=True)}
    assert sizes == {4}  # the last partial batch (2) is left out: torch.compile never recompiles
    assert [len(b) for b in batch_order(3, 4, drop_last=True)] == [3]  # fewer photos than a batch: one batch


def test_a_training_step_makes_no_host_tensors_and_reads_the_device_once_per_epoch(monkeypatch):
    loop = tiny_loop()
    x, y = tiny_data(n=12)
    calls = {"tensor": 0, "item": 0, "tolist": 0}
    real_tensor, real_item, real_tolist = torch.tensor, torch.Tensor.item, torch.Tensor.tolist

    def counting_tensor(*args, **kwargs):
        calls["tensor"] += 1
        return real_tensor(*args, **kwargs)

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)

    def counting_tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    train_epoch(loop, x, y)  # three steps, well under a second
    assert calls["tensor"] == 0  # normalisation constants live on the device already
    assert calls["item"] == 0 and calls["tolist"] == 1  # loss, accuracy and finiteness, read once at the epoch's end


def test_resumed_optimizer_state_takes_each_parameters_memory_layout():
    loop = tiny_loop()
    x, y = tiny_data()
    train_epoch(loop, x, y)  # Adam state made in NCHW, as on a CPU
    state = training_state(loop, [], {})
    state["model"] = None
    nhwc = tiny_model().to(memory_format=torch.channels_last)  # as the GPU run lays the parameters out
    resumed = tiny_loop(nhwc)
    restore_training_state(resumed, state)
    conv = nhwc[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for key in ("exp_avg", "exp_avg_sq"):
        assert resumed.optimizer.state[conv][key].stride() == conv.stride(), key
    train_epoch(resumed, x, y)  # and the fused step runs


@pytest.mark.parametrize("name", ["vgg13_bn", "resnet18"])
def test_model_names_are_checked_while_parsing(name):
    from smalldata.model import arch_name

    assert arch_name(name) == name
    with pytest.raises(Exception, match="did you mean vgg13_bn"):
        arch_name("vgg13bn")


def test_korean_class_names_draw_with_real_glyphs_and_no_warnings(tmp_path):
    import warnings

    from matplotlib import ft2font
    from PIL import Image

    from smalldata import plots

    path = plots.cjk_font_path()
    assert path, "the CJK font package is part of requirements.txt"
    font = ft2font.FT2Font(path)
    assert all(font.get_char_index(ord(ch)) for ch in "사과배귤林檎りんご")  # Hangul, Han and kana glyphs exist
    classes = ["사과", "배", "귤", "apple"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.confusion(torch.eye(4, dtype=torch.long) * 3, classes, tmp_path / "confusion.png", "점수: 사과")
        plots.image_grid([[(Image.new("RGB", (32, 32), "white"), ["사과", ("예측: 배", (200, 0, 0))])]],
                         tmp_path / "grid.png")
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_the_gpu_settings_train_on_the_cpu_bf16_autocast_channels_last_and_compiled_once():
    # The CUDA branches' settings, executed where CI can: bf16 autocast, NHWC weights and inputs,
    # torch.compile (inductor, CPU) -- one compilation for every full batch of two epochs.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    loop = make_loop(tiny_model(), Optimiser(lr=1e-3, batch_size=4), torch.device("cpu"), torch.bfloat16,
                     [0.5] * 3, [0.25] * 3, compile=True)
    loop.model.to(memory_format=torch.channels_last)
    loop.norm.channels_last = True
    x, y = tiny_data(n=10)
    first, second = train_epoch(loop, x, y), train_epoch(loop, x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in (*first, *second))
    assert loop.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert counters["stats"]["unique_graphs"] == 1  # the last partial batch (2 of 10) never reaches the model


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch uses this machine's GPU: auto is the GPU")
def test_auto_device_on_a_gpu_torch_cannot_use_stops_with_the_fix(tmp_path, monkeypatch, tiny_data):
    """nvidia-smi lists a GPU, torch sees none: --device auto is an error naming the fix (exit 2, one line,
    before any photo is decoded); --device cpu still trains; a GPU hidden on purpose means the CPU."""
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'gpu')}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(UsageError, match="nvidia-smi lists GPU 0: NVIDIA H200, but torch .* cannot use it"):
        runtime.resolve_device("auto")
    out = tmp_path / "out"
    proc = run_here("model_1e-4.py", "--data", tiny_data, "--out", out, "--weights", "none", "--epochs", "1",
                    "--arch", "resnet18", "--img-size", "32", "--batch-size", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "--device cpu" in proc.stderr and "tools/setup.sh" in proc.stderr
    assert not (out / "cache").exists(), "nothing decoded"
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.resolve_device("auto") == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'none', gpu=False)}{os.pathsep}{os.environ['PATH']}")
    assert runtime.resolve_device("auto") == torch.device("cpu")  # nvidia-smi finds no GPU: the CPU, silently


def test_several_machines_need_a_gloo_interface_they_can_reach():
    """gloo binds to the hostname's address: on several machines a loopback one (127.0.1.1 on many Ubuntu
    hosts) is refused with the interfaces to choose from; a named interface must exist; one machine
    needs nothing."""
    interfaces = [name for _, name in socket.if_nameindex()]
    two_nodes = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    problem = runtime.gloo_interface_problem(two_nodes, hostname="localhost")
    assert "loopback" in problem and "GLOO_SOCKET_IFNAME" in problem and interfaces[0] in problem, problem
    assert runtime.gloo_interface_problem({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, hostname="localhost") is None
    assert runtime.gloo_interface_problem({}, hostname="localhost") is None
    assert runtime.gloo_interface_problem({**two_nodes, "GLOO_SOCKET_IFNAME": interfaces[0]}, "localhost") is None
    problem = runtime.gloo_interface_problem({**two_nodes, "GLOO_SOCKET_IFNAME": "nosuch9"}, hostname="localhost")
    assert problem.startswith("GLOO_SOCKET_IFNAME names nosuch9, which this machine lacks"), problem
