"""A small Vision Transformer in plain torch (random initialisation; for tests and examples).

By default it has no class token and classifies the mean of its patch tokens, so every block's
tokens are patches on a ``grid_size`` grid. ``class_token=True`` adds a CLS token (position 0,
``num_prefix_tokens = 1``) and classifies from it, like the original ViT.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["VisionTransformer", "vit_tiny"]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), row-major over the grid


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 num_classes: int = 10, class_token: bool = False, seed: int = 0):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(image_size, patch_size, dim)
        n = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n + self.num_prefix_tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    nn.init.trunc_normal_(p, std=0.02 if "embed" in name or "token" in name else 0.1, generator=g)
                elif "norm" not in name:
                    p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(pooled)


def vit_tiny(image_size: int = 32, num_classes: int = 10, class_token: bool = False, seed: int = 0) -> VisionTransformer:
    """A 4-block ViT (width 64, 4 heads, 4×4 patches), random initialisation from ``seed``."""
    return VisionTransformer(image_size=image_size, patch_size=4, dim=64, depth=4, heads=4,
                             num_classes=num_classes, class_token=class_token, seed=seed)
