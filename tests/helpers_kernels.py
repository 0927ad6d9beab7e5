"""What the kernel tests share: the comparison of a kernel's output with the reference."""

from __future__ import annotations

import torch


def check_close(y, r, dtype) -> None:
    """``y`` equals the reference ``r`` up to fp32 accumulation in another order and one
    rounding to the output dtype."""
    assert y.shape == r.shape and y.dtype == r.dtype
    y, r = y.float().cpu(), r.float().cpu()
    assert torch.isfinite(y).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    mag = max(r.abs().max().item(), 1e-3)
    torch.testing.assert_close(y, r, rtol=tol, atol=tol * mag)
