"""Mixed precision (AMP) on GPUs: shared by the five scripts.

Under autocast a GPU runs matrix products and convolutions in 16-bit floats (about twice as fast, half the memory)
while reductions, losses and the weights stay in float32. bfloat16, on GPUs that have it (NVIDIA Ampere and
later), has float32's range: gradients cannot underflow, so the loss needs no scaling and nothing checks the
gradients for infinities at every step (a check that makes the CPU wait for the GPU). Older GPUs get float16, whose
small gradients would underflow to 0 unless the loss is scaled up first (torch.amp.GradScaler). On the CPU nothing
changes: float32 throughout, as the tests run.

    with autocast(device, cfg.amp):
        loss = loss_fn(model(img), seg)
    scaler = grad_scaler(device, cfg.amp)  # once; then scaler.scale(loss).backward(), scaler.step(optimizer), ...
"""

import torch


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that has it, else float16 (the dtype autocast computes in on `device`)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on a GPU (`enabled`: the scripts' `amp` setting); nothing on the CPU."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled and device.type == "cuda")


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaling where float16 needs it; a scaler that does nothing with bfloat16 and on the CPU (its calls stay
    in the training loop either way, so the loop reads the same on every machine)."""
    needed = enabled and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=needed)
