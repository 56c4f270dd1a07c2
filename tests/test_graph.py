"""The ASCII history graph drawn by `ckptvcs log --graph`."""

from ckptvcs.graph import graph_lines


def _draw(commits):
    return graph_lines(commits, [[cid] for cid, _ in commits])


def test_linear_history_is_one_rail():
    assert _draw([("c", ["b"]), ("b", ["a"]), ("a", [])]) == ["* c", "* b", "* a"]


def test_branch_point_draws_a_join():
    lines = _draw([("main2", ["base"]), ("ft1", ["base"]), ("base", [])])
    assert lines == ["* main2", "| * ft1", "|/", "* base"]


def test_two_branches_from_one_base_join_in_turn():
    lines = _draw([("x", ["base"]), ("y", ["base"]), ("z", ["base"]), ("base", [])])
    assert lines == ["* x", "| * y", "|/", "| * z", "|/", "* base"]


def test_unrelated_roots_keep_separate_rails():
    lines = _draw([("b1", ["b0"]), ("a1", ["a0"]), ("b0", []), ("a0", [])])
    assert lines == ["* b1", "| * a1", "* | b0", " /", "* a0"]


def test_root_between_rails_shifts_only_the_rails_to_its_right():
    commits = [("c1", ["c0"]), ("b1", ["b0"]), ("a1", ["a0"]), ("b0", []), ("c0", []), ("a0", [])]
    lines = _draw(commits)
    assert lines[3:] == ["| * | b0", "|  /", "* | c0", " /", "* a0"]


def test_multi_line_text_continues_the_rails():
    lines = graph_lines([("b", ["a"]), ("a", [])], [["b", "  message"], ["a"]])
    assert lines == ["* b", "|   message", "* a"]
