"""A Trainer run in its own process, for tests/test_hf.py's kill-and-resume test.

    python tests/hf_worker.py STORE OUT [--resume REV] [--hang-after STEP]

Trains the tests' tiny BERT for 10 steps, saving every 2 into STORE through CkptvcsCallback.
``--resume REV`` resumes from that revision through ``resume_path``. ``--hang-after STEP``
prints ``committed STEP`` once that step's commit is durable and then blocks, for the parent
to SIGKILL it mid-training. At the end it writes OUT/losses.json and OUT/model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from test_hf import CkptvcsCallback, resume_path, train  # the script's folder (tests/) is first on sys.path


class HangAfter(CkptvcsCallback):
    def __init__(self, store: str, step: int) -> None:
        super().__init__(store)
        self.hang_step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_save(args, state, control, **kwargs)
        if state.global_step == self.hang_step:
            print(f"committed {state.global_step}", flush=True)
            threading.Event().wait()  # until SIGKILL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--resume")
    parser.add_argument("--hang-after", type=int)
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    callback = HangAfter(opts.store, opts.hang_after) if opts.hang_after else CkptvcsCallback(opts.store)
    resume = resume_path(opts.store, opts.resume, out / "resume") if opts.resume else None
    run = train(out, opts.store, callback=callback, resume=resume)
    (out / "losses.json").write_text(json.dumps(run["losses"]))
    save_file({k: v.detach().clone().contiguous() for k, v in run["model"].state_dict().items()},
              str(out / "model.safetensors"))


if __name__ == "__main__":
    main()
