"""Storage backends: the only code that touches durable storage (see ``base.Backend``)."""

from ckptvcs.backends.base import Backend, Capabilities, ConcurrentUpdate, KeyMissing, ObjectWriter, RangeReader

__all__ = ["Backend", "Capabilities", "ConcurrentUpdate", "KeyMissing", "ObjectWriter", "RangeReader"]
