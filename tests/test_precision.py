"""precision.py: bfloat16 autocast on GPUs that have it, float16 with loss scaling on older ones, float32 on the CPU.
No GPU here: the GPU's answer to "bfloat16?" is set by the test, and the scaler's construction is recorded."""

import pytest
import torch

import precision

GPU = torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.parametrize(("has_bf16", "dtype", "scaled"), [(True, torch.bfloat16, False), (False, torch.float16, True)])
def test_a_gpu_gets_bfloat16_without_scaling_where_it_can_else_float16_with(monkeypatch, has_bf16, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: has_bf16)
    assert precision.amp_dtype(GPU) == dtype
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append((device, enabled)))
    precision.grad_scaler(GPU, enabled=True)
    precision.grad_scaler(GPU, enabled=False)  # amp=False in a script's configuration: never scaled
    assert made == [("cuda", scaled), ("cuda", False)]


def test_the_cpu_computes_in_float32_and_never_scales():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with precision.autocast(torch.device("cpu"), enabled=True):
        assert (a @ b).dtype == torch.float32  # autocast is off on the CPU, whatever the setting
    assert not precision.grad_scaler(torch.device("cpu"), enabled=True).is_enabled()
