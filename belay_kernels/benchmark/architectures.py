"""Real architectures, built locally with random initialisation (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class GPT2SmallLike(nn.Module):
    """GPT-2 small's parameter shapes from torch.nn: 12 pre-norm blocks of width 768 with
    12 heads and a 3072 MLP, 50257-token and 1024-position embeddings, a final LayerNorm
    and an output head tied to the token embedding (124M parameters)."""

    def __init__(self, vocab=50257, context=1024, width=768, depth=12, heads=12):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(
            tokens.shape[1], device=tokens.device
        )
        x = self.final_norm(self.blocks(x, mask=causal, is_causal=True))
        return x @ self.token_embedding.weight.T


def _timm(name):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    return build


ARCHITECTURES = {
    "resnet50": _timm("resnet50"),
    "vit_b16": _timm("vit_base_patch16_224"),
    "gpt2_small_like": GPT2SmallLike,
}


def build(name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name]().to(device=device, dtype=dtype).train()
