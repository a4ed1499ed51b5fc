"""Device and precision decisions, GPU-only branches included: ``torch.cuda`` is mocked, so a CPU
machine checks what a GPU machine would do (LOCAL_RANK -> cuda:N, the device-count check, the
GradScaler decision, the autocast dtype). ``benchmarks/gpu_check.sh`` runs the real thing."""
import pytest
import torch

from distill.engine import device as device_module
from distill.engine.device import autocast, grad_scaler, make_runtime, resolve_device
from distill.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """A machine with ``n`` visible CUDA devices (0: none)."""

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return set_count


def test_auto_is_cuda_when_there_is_one_and_the_cpu_otherwise(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda") and make_runtime("auto").device == "cuda"


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda:3") and resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # an explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_one_line(gpus, monkeypatch):
    gpus(2)
    with pytest.raises(ConfigError, match=r"--device cuda:2: only 2 CUDA device\(s\) visible"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "5")  # more ranks than GPUs
    with pytest.raises(ConfigError, match=r"cuda:5: only 2"):
        resolve_device("auto")
    gpus(0)
    with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_fp16_gets_a_grad_scaler_on_cuda_only_and_bf16_none(gpus):
    gpus(1)
    fp16 = make_runtime("cuda", "fp16")
    assert fp16.amp == "fp16" and isinstance(grad_scaler(fp16), torch.amp.GradScaler)
    assert grad_scaler(make_runtime("cuda", "bf16")) is None and grad_scaler(make_runtime("cuda", "off")) is None
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        make_runtime("cpu", "fp16")
    with pytest.raises(ConfigError, match="a reference run is fp64 throughout"):
        make_runtime("cuda", "bf16", "float64")


def test_autocast_dtype_follows_amp_and_device(gpus, monkeypatch):
    gpus(1)
    seen = []
    monkeypatch.setattr(device_module.torch, "autocast", lambda device_type, dtype: seen.append((device_type, dtype)) or "ctx")
    assert autocast(make_runtime("cuda", "fp16")) == "ctx" and autocast(make_runtime("cuda", "bf16")) == "ctx"
    assert autocast(make_runtime("cpu", "bf16")) == "ctx"
    assert seen == [("cuda", torch.float16), ("cuda", torch.bfloat16), ("cpu", torch.bfloat16)]
    with autocast(make_runtime("cpu", "off")):  # off: a null context, nothing autocast
        assert seen == [("cuda", torch.float16), ("cuda", torch.bfloat16), ("cpu", torch.bfloat16)]


def test_dataloader_workers_by_device_world_and_cores(monkeypatch):
    from distill.engine.device import auto_workers

    monkeypatch.setattr(device_module.os, "cpu_count", lambda: 16)
    assert auto_workers(None, torch.device("cuda")) == 4 and auto_workers(None, torch.device("cuda"), world=8) == 2
    assert auto_workers(None, torch.device("cuda"), world=32) == 1 and auto_workers(None, torch.device("cpu")) == 0
    assert auto_workers(2, torch.device("cuda")) == 2
