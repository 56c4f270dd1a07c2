"""Adapters to training frameworks (Lightning, Hugging Face Trainer, torch.distributed.checkpoint).

Rules for every module here, checked by import-linter (pyproject.toml) and tests:
- the framework is imported lazily, inside the module that adapts it, never by ``import ckptvcs``;
  each framework is an optional extra (``pip install ckptvcs[lightning]``...);
- an adapter uses ckptvcs's public API only (``ckptvcs.Repo``, ``ckptvcs.training``, the errors),
  so that it can never bypass the store's guarantees.
"""
