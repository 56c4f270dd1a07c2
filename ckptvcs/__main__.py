"""``python -m ckptvcs``: the same command-line interface as ``ckptvcs``."""

from .cli import main

if __name__ == "__main__":
    main()
