"""A small GPT and a synthetic token stream for the unickpt demo.

The model is a plain pre-LayerNorm decoder-only transformer: token + position embeddings,
``n_layer`` blocks of causal self-attention and an MLP, a final LayerNorm and an (untied) LM head.
It is deliberately ordinary, so that ``fully_shard`` can wrap each block and the root as in any
real FSDP2 training script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. The defaults give ~14M parameters, fast enough to train on two CPU cores."""

    vocab_size: int = 4096
    seq_len: int = 64
    d_model: int = 384
    n_head: int = 6
    n_layer: int = 6


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = (
            t.view(batch, seq, self.n_head, d_model // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(d_model, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    """One transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, seq)`` token ids to ``(batch, seq, vocab)`` logits."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over a ``(batch, seq + 1)`` window of tokens."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def synthetic_batch(
    cfg: GPTConfig,
    step: int,
    batch_size: int,
    seed: int = 0,
    n_phrases: int = 16,
    phrase_len: int = 8,
) -> torch.Tensor:
    """The global batch for ``step``: ``(batch_size, seq_len + 1)`` tokens.

    The "language" has ``n_phrases`` fixed random phrases of ``phrase_len`` tokens; each row
    strings random phrases together. Inside a phrase the next token is determined, so the loss
    falls from ln(vocab_size) towards ln(n_phrases) / phrase_len as the model learns them.

    The batch depends only on ``(seed, step)``: every rank, in any world size, sees the same
    global batch at the same step, which is what makes a resumed run comparable with the original.
    """
    phrase_gen = torch.Generator().manual_seed(seed)
    phrases = torch.randint(cfg.vocab_size, (n_phrases, phrase_len), generator=phrase_gen)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    per_row = cfg.seq_len // phrase_len + 2
    rows = phrases[torch.randint(n_phrases, (batch_size, per_row), generator=gen)].flatten(1)
    start = int(torch.randint(phrase_len, (1,), generator=gen))
    return rows[:, start : start + cfg.seq_len + 1]
