"""A pre-LN decoder-only character transformer trained on the Python standard library's own sources.

The text ships with every Python installation (``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded: the
top-level ``*.py`` files of the standard library, in sorted order, concatenated up to ``max_bytes``. Tokens are
bytes (a vocabulary of 256, no tokenizer). The text, and therefore every number measured on it, is fixed for a
given Python version.
"""

from __future__ import annotations

import functools
import math
import sysconfig
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardMixin

VOCAB = 256
#: bytes of standard-library source read (the first files in sorted order; about 40 modules on Python 3.11)
TEXT_BYTES = 2 * 1024 * 1024
#: the last fraction of the text is held out for validation (whole files of it are never seen in training)
VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=4)
def stdlib_text(max_bytes: int = TEXT_BYTES) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, sorted by name; read once.

    Args:
        max_bytes: how much text to read.

    Returns:
        The concatenated bytes (files separated by a blank line).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes() + b"\n\n"
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"".join(parts)[:max_bytes]
    if len(text) < 64 * 1024:
        raise RuntimeError(f"found only {len(text)} bytes of standard-library source under {root}")
    return text


@functools.lru_cache(maxsize=4)
def _tokens(max_bytes: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8).long()


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = tokens[idx]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def char_lm_loaders(
    seq_len: int = 64,
    batch_size: int = 16,
    n_train_batches: int = 40,
    n_val_batches: int = 8,
    seed: int = 0,
    max_bytes: int = TEXT_BYTES,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of ``(input, target)`` byte windows, targets shifted by one.

    Training windows start at random offsets of the first 90% of the text, drawn once with ``seed`` (pre-shuffled:
    the loader itself has no ``torch.Generator`` and ``shuffle=False``, so it pickles for ``ddp_spawn`` and every
    epoch sees the same batches in the same order). Validation windows are evenly spaced over the held-out last 10%
    and do not depend on ``seed``, so runs with different seeds are scored on the same text.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch.
        n_train_batches: training batches per epoch.
        n_val_batches: validation batches.
        seed: seed of the training windows' offsets.
        max_bytes: text read from the standard library.

    Returns:
        ``(train_loader, val_loader)``, each yielding two ``(batch, seq_len)`` int64 tensors.
    """
    tokens = _tokens(max_bytes)
    split = int(len(tokens) * (1 - VAL_FRACTION))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    g = torch.Generator().manual_seed(seed)
    n_train = n_train_batches * batch_size
    starts = torch.randint(0, len(train_tokens) - seq_len - 1, (n_train,), generator=g)
    n_val = n_val_batches * batch_size
    if n_val * (seq_len + 1) > len(val_tokens):
        raise ValueError(f"{n_val} validation windows of {seq_len + 1} tokens do not fit in {len(val_tokens)} tokens")
    val_starts = torch.linspace(0, len(val_tokens) - seq_len - 1, n_val).long()
    train = DataLoader(TensorDataset(*_windows(train_tokens, starts, seq_len)), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(*_windows(val_tokens, val_starts, seq_len)), batch_size=batch_size)
    return train, val


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(y), p, self.training)
        return x + F.dropout(self.fc_out(F.gelu(self.fc(self.ln2(x)))), p, self.training)


class CharLM(GuardMixin, pl.LightningModule):
    """A pre-LN decoder-only (GPT-style) byte-level transformer language model.

    Token and learned position embeddings, ``n_layer`` pre-LN blocks (causal self-attention through
    ``scaled_dot_product_attention``, a 4x GELU MLP), a final LayerNorm and an untied output head over 256 bytes.
    GPT-2 initialisation (normal, std 0.02; residual projections scaled by ``1/sqrt(2 n_layer)``). AdamW with
    ``betas=(0.9, 0.95)`` and weight decay on matrices only. The loss is cross-entropy in fp32
    (``logits.float()``), so the model trains under ``bf16-mixed`` and ``16-mixed``. Logs ``train_loss`` and
    ``val_loss`` (nats per byte; a uniform guess scores ``log(256) = 5.545``).

    The default (4 layers, ``d_model=128``, 4 heads, 128-byte context) is the realistic configuration; the CI
    configuration is 2 layers, ``d_model=64``, 64-byte context.

    Args:
        n_layer: transformer blocks. Default ``4``.
        d_model: width. Default ``128``.
        n_head: attention heads (must divide ``d_model``). Default ``4``.
        seq_len: context length (size of the position embedding). Default ``128``.
        lr: AdamW learning rate. Default ``3e-3``.
        weight_decay: AdamW weight decay of the weight matrices. Default ``0.1``.
        dropout: dropout on attention and residual branches. Default ``0.0``.

    Example:
        >>> model = CharLM(n_layer=1, d_model=32, n_head=2, seq_len=16)
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(
        self,
        n_layer: int = 4,
        d_model: int = 128,
        n_head: int = 4,
        seq_len: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"`n_head` must divide `d_model`, got n_head={n_head}, d_model={d_model}")
        self.save_hyperparameters()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, batch: Any) -> torch.Tensor:
        """Mean next-byte cross-entropy of a batch, in fp32."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.95))
