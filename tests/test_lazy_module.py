"""LazyModule keeps classes and submodules after the first read, and nothing else."""

from __future__ import annotations

import json
import json.decoder

import pytest

from ckptvcs._lazy import LazyModule


def test_classes_and_submodules_are_kept_after_the_first_read() -> None:
    lazy = LazyModule("json")
    assert "JSONDecoder" not in vars(lazy)
    assert lazy.JSONDecoder is json.JSONDecoder
    assert lazy.decoder is json.decoder
    assert vars(lazy)["JSONDecoder"] is json.JSONDecoder  # later reads skip __getattr__
    assert vars(lazy)["decoder"] is json.decoder


def test_functions_are_looked_up_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = LazyModule("json")
    assert lazy.dumps is json.dumps
    assert "dumps" not in vars(lazy)

    def replacement(*args: object, **kwargs: object) -> str:
        return "patched"

    monkeypatch.setattr(json, "dumps", replacement)
    assert lazy.dumps({}) == "patched"


def test_missing_attributes_still_raise() -> None:
    with pytest.raises(AttributeError):
        LazyModule("json").no_such_thing  # noqa: B018
