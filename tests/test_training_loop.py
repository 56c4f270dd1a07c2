"""The documented training loop: the README's CheckpointManager snippet run twice (a
re-queued job that already finished), idempotent saves and tags, and step order."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptvcs import CheckpointManager, InvalidInputError, RefExistsError, Repo, StepOrderError

README = Path(__file__).resolve().parents[1] / "README.md"

# What the README snippet leaves to the reader: a model, its optimizer, a scheduler, a
# scaler, train_step(), evaluate() and max_steps. max_steps is a multiple of the
# snippet's every_steps=1000, so the loop's last step() saves the final step itself.
PRELUDE = '''
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
scaler = torch.amp.GradScaler("cpu", enabled=False)
max_steps = 1000

def train_step():
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()

def evaluate():
    with torch.no_grad():
        return model(torch.randn(8, 4)).pow(2).mean().item()
'''


def readme_manager_snippet(doc: Path = README, heading: str = "## Training loop: CheckpointManager") -> str:
    """The first python block of the README's CheckpointManager section (or ``doc``'s), verbatim."""
    text = doc.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block in {doc.name}'s CheckpointManager section"
    return match.group(1)


def test_the_training_guide_shows_the_readme_loop() -> None:
    """docs/training.md opens with the same loop the README shows (and the next test runs)."""
    guide = README.parent / "docs" / "training.md"
    assert readme_manager_snippet(guide, "# Training loop: CheckpointManager") == readme_manager_snippet()


def history(store: Path) -> tuple[list[tuple[str, int]], dict[str, str]]:
    with Repo.open(store) as repo:
        return [(c.id, c.step) for c in repo.log("main")], {n: t.object for n, t in repo.tags().items()}


def test_the_readme_loop_runs_again_after_it_finished(tmp_path: Path) -> None:
    script = tmp_path / "readme_loop.py"
    script.write_text(PRELUDE + readme_manager_snippet())
    runs = []
    for _ in range(2):  # the second run: a re-queued job that had already finished
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(history(tmp_path / "checkpoints"))
    (log, tags), (log_again, tags_again) = runs
    assert [step for _, step in log].count(1000) == 1  # the final step is saved once
    assert tags == {"v1.0": log[0][0]} and log[0][1] == 1000
    assert (log_again, tags_again) == (log, tags)  # the re-run added nothing


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(3, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saving_the_saved_head_again_is_a_no_op(repo: Repo, async_save: bool) -> None:
    model, opt = make_model()
    with CheckpointManager(repo, {"model": model, "optimizer": opt}, every_steps=5, async_save=async_save,
                           code_version=None) as mgr:
        for step in range(1, 6):
            train(model, opt)
            mgr.step(step)
        first = mgr.save(5, message="final", tag="release")  # step 5 was just saved by the trigger
        again = mgr.save(5, message="final", tag="release")
        if async_save:
            assert isinstance(first, Future) and isinstance(again, Future)
            first, again = first.result(), again.result()
    assert first == again == repo.resolve("main")
    assert [c.step for c in repo.log()] == [5]
    assert repo.tags()["release"].object == first


def test_a_tag_naming_another_commit_is_refused_before_saving(repo: Repo) -> None:
    model, opt = make_model()
    with CheckpointManager(repo, {"model": model}, code_version=None) as mgr:
        tagged = mgr.save(1, tag="v1")
        train(model, opt)
        with pytest.raises(RefExistsError, match="v1.*already names commit"):
            mgr.save(2, tag="v1")
    assert [c.id for c in repo.log()] == [tagged]  # nothing committed
    assert repo.tags()["v1"].object == tagged


def test_a_save_at_the_same_step_after_changes_elsewhere_still_commits(repo: Repo) -> None:
    """Only the head this manager saved or restored counts: another writer's commit does not."""
    model, opt = make_model()
    with CheckpointManager(repo, {"model": model}, code_version=None) as mgr:
        mgr.save(3)
        repo.commit({"model": model.state_dict()}, "someone else", step=3, code_version=None)
        mgr.save(3)
    assert [c.step for c in repo.log()] == [3, 3, 3]


# -- step order (steps never go backwards on a branch) ---------------------------------------


def run_to(repo: Repo, steps: range, **kwargs) -> CheckpointManager:
    model, opt = make_model()
    mgr = CheckpointManager(repo, {"model": model, "optimizer": opt}, code_version=None, **kwargs)
    for step in steps:
        train(model, opt)
        mgr.step(step)
    return mgr


def test_a_step_lower_than_the_last_saved_one_is_refused(repo: Repo) -> None:
    with run_to(repo, range(1, 9), every_steps=5) as mgr:
        mgr.step(7)  # below the last step reported (8) but not below the last save (5): a trigger decides
        with pytest.raises(StepOrderError, match="step 4 is lower than step 5") as err:
            mgr.step(4)
        assert (err.value.step, err.value.last_step) == (4, 5)
        mgr.save(10)
        with pytest.raises(StepOrderError, match="step 9 is lower than step 10"):
            mgr.save(9)
    assert [c.step for c in repo.log()] == [10, 5]
    assert isinstance(err.value, InvalidInputError) and err.value.exit_code == 9


def test_a_new_run_that_forgot_restore_is_refused(repo: Repo) -> None:
    run_to(repo, range(1, 11), every_steps=5).close()
    with run_to(repo, range(0), every_steps=5) as mgr:
        with pytest.raises(StepOrderError, match="step 1 is lower than step 10.*branch 'main'.*restore"):
            mgr.step(1)
    assert [c.step for c in repo.log()] == [10, 5]


def test_after_restoring_an_earlier_commit_the_steps_continue_from_there(repo: Repo) -> None:
    run_to(repo, range(1, 11), every_steps=5).close()
    head = repo.resolve("main")
    with run_to(repo, range(0), every_steps=5) as mgr:
        assert mgr.restore("main~1") == 5
        for step in range(6, 9):
            mgr.step(step)
        rewound = mgr.save(8)
        with pytest.raises(StepOrderError, match="step 7 is lower than step 8"):
            mgr.step(7)
    # The branch keeps its history: the rewound run's commit goes on top of the old head.
    assert [c.step for c in repo.log()] == [8, 10, 5]
    assert repo.show(rewound).parents == (head,)


# -- data loaders -----------------------------------------------------------------------------


def test_a_plain_dataloader_in_state_is_refused_naming_the_fix(repo: Repo) -> None:
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
    with pytest.raises(InvalidInputError, match="'loader'.*no state_dict.*StatefulDataLoader"):
        CheckpointManager(repo, {"model": nn.Linear(2, 2), "loader": loader}, code_version=None)
