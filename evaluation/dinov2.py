"""DINOv2 ViT-L/14 feature extractor, loading the official `dinov2_vitl14_pretrain.pth` state dict
without torch.hub: returns the normalised CLS token (1024 features) for FD-DINOv2."""

import torch

class Attention(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):                                                     # [N, T, dim]
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)          # [N, heads, T, dim/heads]
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))

class LayerScale(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

class Mlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

class Block(torch.nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

class PatchEmbed(torch.nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                        # [N, patches, dim]

class VisionTransformer(torch.nn.Module):
    """ViT-L/14 with the key names of the official DINOv2 checkpoints (pos_embed for 518×518 inputs)."""

    def __init__(self, patch_size=14, dim=1024, depth=24, num_heads=16, pretrain_grid=37, interpolate_offset=0.1):
        super().__init__()
        self.patch_size = patch_size
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, pretrain_grid ** 2 + 1, dim))
        self.mask_token = torch.nn.Parameter(torch.zeros(1, dim))             # Unused here; present in the checkpoints.
        self.blocks = torch.nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, grid_h, grid_w):
        """Bicubic resize of the pretraining position grid, as DINOv2 does (offset 0.1, no antialias)."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(patch_pos.shape[1] ** 0.5)
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side)
        patch_pos = torch.nn.functional.interpolate(patch_pos, scale_factor=scale, mode='bicubic', antialias=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward(self, x):                                                     # [N, 3, H, W], ImageNet-normalised
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(grid_h, grid_w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]                                        # [N, dim]
