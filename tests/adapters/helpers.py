"""A small decoder-block-shaped module for the adapter tests: attention and MLP linears, a norm, an activation."""

from __future__ import annotations

from torch import nn


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.xq_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = nn.Sequential()
        self.mlp.add_module("down_proj", nn.Linear(4, 4))
        self.act = nn.GELU()
