"""A tiny deterministic transformer LM for multi-layout tests, and its synthetic batches.

Dimensions are chosen so that FSDP sharding (dim 0) is uneven at world sizes 2, 3 and 4
(vocabulary 61, MLP width 50), while the tensor-parallel splits by 2 divide evenly (hidden 24 =
4 heads of 6, MLP width 50 = 2 x 25). The attention works out its head count from the width of
its projections, so it runs unchanged when q/k/v are column-sharded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 61
HIDDEN = 24
HEAD_DIM = 6
FFN = 50
LAYERS = 2
SEQ = 8
BATCH = 4


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(seed: int) -> TinyTransformer:
    """The model with a deterministic initialisation: equal seeds give equal parameters."""
    with torch.random.fork_rng():  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = TinyTransformer()
        with torch.no_grad():  # LayerNorm starts at ones/zeros: perturb it to make it real state
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param), alpha=0.1)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and next-token targets for training step ``step``, the same on every rank."""
    gen = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    inputs, targets = batch(step)
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
