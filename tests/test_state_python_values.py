"""The state format's Python value nodes (docs/format.md 4.2): enums, paths, argparse
Namespaces and plain dict subclasses, as training configs and Lightning's hyper-parameters
hold them. Loading finds classes among the modules already imported and never imports one."""

from __future__ import annotations

import argparse
import collections
import enum
import pathlib
import sys
import types
from typing import Any

import pytest

from ckptvcs import CorruptObjectError, Repo, UnsupportedValueError
from ckptvcs.state import decode_state, encode_state, validate_tree


class Color(enum.Enum):
    RED = "red"
    BLUE = ("b", 2)


class Size(enum.IntEnum):
    S = 1
    L = 3


class Perm(enum.Flag):
    R = 1
    W = 2


class Named(dict):
    """A dict with a name and nothing else (like Lightning's AttributeDict)."""


class WithAttrs(dict):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = 1


def _local_enum_member() -> enum.Enum:
    class Local(enum.Enum):
        A = 1

    return Local.A


VALUES = {
    "enum": Color.BLUE,
    "int_enum": Size.L,
    "flag": Perm.R | Perm.W,
    "posix_path": pathlib.Path("/data/x.bin"),
    "relative_path": pathlib.Path("runs") / "a",
    "pure_windows_path": pathlib.PureWindowsPath("C:/data"),
    "namespace": argparse.Namespace(lr=0.1, layers=(1, 2), out=pathlib.Path("o"), nested=argparse.Namespace(k=Size.S)),
    "dict_subclass": Named(a=1, b=Named(c=[Color.RED])),
}


@pytest.mark.parametrize("name", list(VALUES))
def test_python_values_round_trip_with_their_types(repo: Repo, name: str) -> None:
    value = VALUES[name]
    cid = repo.commit({"v": value, "list": [value]}, code_version=None)
    loaded = repo.load(cid)
    assert loaded["v"] == value and type(loaded["v"]) is type(value)
    assert type(loaded["list"][0]) is type(value)
    assert repo.fsck().ok


def test_int_enum_keeps_its_class_not_just_its_int(repo: Repo) -> None:
    loaded = repo.load(repo.commit({"s": Size.S}, code_version=None))["s"]
    assert loaded is Size.S


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (collections.defaultdict(int, a=1), "holds state besides its items"),
        (WithAttrs(a=1), "holds state besides its items"),
        (_local_enum_member(), "defined inside a function"),
    ],
)
def test_values_that_would_not_come_back_equal_are_refused_with_their_path(repo: Repo, value: Any, why: str) -> None:
    with pytest.raises(UnsupportedValueError, match=why) as caught:
        repo.commit({"cfg": {"x": value}}, code_version=None)
    assert caught.value.path == "cfg/x"


def test_subclasses_of_path_and_namespace_are_refused(repo: Repo) -> None:
    class MyPath(type(pathlib.Path())):  # type: ignore[misc]
        pass

    class MyNamespace(argparse.Namespace):
        pass

    for value in (MyPath("/x"), MyNamespace(a=1)):
        with pytest.raises(UnsupportedValueError, match="cfg"):
            repo.commit({"cfg": value}, code_version=None)


def test_loading_never_imports_a_module_the_manifest_names() -> None:
    root = {"enum": {"type": "ckptvcs_never_imported_module:Mode", "value": "fast"}}
    with pytest.warns(RuntimeWarning, match="not imported"):
        assert decode_state(root, {}) == "fast"
    assert "ckptvcs_never_imported_module" not in sys.modules
    body = {"type": "ckptvcs_never_imported_module:D", "items": [["a", 1]]}
    with pytest.warns(RuntimeWarning):
        assert decode_state({"dictsub": body}, {}) == {"a": 1}


def test_a_manifest_naming_something_that_is_not_such_a_class_is_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    module = types.ModuleType("ckptvcs_test_hostile")
    module.run = lambda *a: called.append(a)  # type: ignore[attr-defined]
    module.Plain = type("Plain", (), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ckptvcs_test_hostile", module)
    for node in (
        {"enum": {"type": "ckptvcs_test_hostile:run", "value": "x"}},
        {"enum": {"type": "ckptvcs_test_hostile:Plain", "value": "x"}},
        {"dictsub": {"type": "ckptvcs_test_hostile:Plain", "items": []}},
        {"enum": {"type": f"{__name__}:Color", "value": "green"}},
        {"path": {"type": "Popen", "value": "x"}},
        {"namespace": [[1, 2]]},
    ):
        with pytest.raises(CorruptObjectError):
            decode_state(node, {})
    assert not called


def test_fsck_checks_the_structure_without_looking_classes_up() -> None:
    encoded = encode_state({"c": Color.RED, "n": argparse.Namespace(p=pathlib.Path("x")), "d": Named(a=1)})
    validate_tree(encoded.root, [len(b.data) for b in encoded.blobs])
    with pytest.raises(CorruptObjectError):
        validate_tree({"enum": {"type": "no-colon", "value": 1}}, [])
