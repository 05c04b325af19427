"""Networks that look trained, for comparing the toolkit's forward with a library's own.

A freshly initialised ResNet has BatchNorm statistics 0/1 and (timm, torchvision's zero_init_residual)
zero scales on each block's last BatchNorm, so every residual branch is switched off and two networks
that wire their blocks differently still agree. Perturbing the statistics and scales turns every
branch on, so a comparison of logits sees every tensor.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def perturb_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running mean/var, scale and shift in every BatchNorm (in place); `model`, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
    return model.eval()
