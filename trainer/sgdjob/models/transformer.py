"""The built-in causal Transformer language model: token embedding, pre-norm blocks of
causal self-attention and a GELU feed-forward network, a final LayerNorm and an output head
tied to the embedding. Positions are learned embeddings or rotary (RoPE, Su et al. 2021)
applied to queries and keys. Input: (batch, T) int64 tokens; output: (batch, T, vocab) logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def rotary_tables(t: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, rotary: bool) -> None:
        super().__init__()
        self.heads, self.rotary, self.dropout = heads, rotary, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, hd)
        if self.rotary:
            cos, sin = rotary_tables(t, d // self.heads)
            cos, sin = cos.to(x.device, q.dtype), sin.to(x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mult: int, dropout: float, rotary: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout, rotary)
        self.ffn = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TransformerLM(nn.Module):
    def __init__(
        self,
        *,
        vocab: int,
        context: int,
        d_model: int,
        layers: int,
        heads: int,
        ffn_mult: int,
        positions: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model) if positions == "learned" else None
        rotary = positions == "rotary"
        blocks = [Block(d_model, heads, ffn_mult, dropout, rotary) for _ in range(layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        for blk in blocks:  # GPT-2's scaled init of the residual projections
            for proj in (blk.attn.proj, blk.ffn[2]):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens, the model's context is {self.context}")
        h = self.embed(tokens)
        if self.pos is not None:
            h = h + self.pos(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h) @ self.embed.weight.t()  # tied output head


def transformer(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    d_model: int,
    layers: int,
    heads: int,
    ffn_mult: int,
    positions: str,
    dropout: float,
    **_: Any,
) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(
            f"model.builtin `transformer` needs token sequences (T,); the data gives {input_shape}"
        )
    return TransformerLM(
        vocab=num_classes,
        context=input_shape[0],
        d_model=d_model,
        layers=layers,
        heads=heads,
        ffn_mult=ffn_mult,
        positions=positions,
        dropout=dropout,
    )
