"""Run the ``xception`` CLI with test hooks in the training loop (the library has none of its own).

    python tests/hooked_train.py [--samples DIR] [--sigterm-at STEP] [--sigkill-after STEP] -- train ARGS...
    python tests/hooked_train.py [...] -- segment train ARGS...

``--samples DIR``: every rank appends ``{"epoch", "indices"}`` per batch to ``DIR/rank{RANK}.jsonl``.
``--sigterm-at STEP``: the process sends itself SIGTERM after optimizer step STEP.
``--sigkill-after STEP``: the process kills itself (SIGKILL: no handler, no save) when the batch
after optimizer step STEP arrives, i.e. after whatever the run saved at that step.
Works under ``torchrun`` (each worker runs this script).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from xception.cli import main
from xception.segmentation import train as segment_trainer
from xception.training import trainer
from xception.training.engine import StepHooks


def hooks(samples: str | None, sigterm_at: int | None, sigkill_after: int | None = None) -> StepHooks:
    path = Path(samples) / f"rank{os.environ.get('RANK', '0')}.jsonl" if samples else None
    done = {"step": None}

    def on_batch(epoch: int, indices) -> None:
        if sigkill_after is not None and done["step"] == sigkill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "indices": indices.tolist()}) + "\n")

    def after_step(step: int) -> None:
        done["step"] = step
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    return StepHooks(on_batch=on_batch, after_step=after_step)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples")
    parser.add_argument("--sigterm-at", type=int)
    parser.add_argument("--sigkill-after", type=int)
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    step_hooks = hooks(args.samples, args.sigterm_at, args.sigkill_after)
    fit, segment_fit = trainer.fit, segment_trainer.fit
    trainer.fit = lambda cfg, hooks=None: fit(cfg, step_hooks)
    segment_trainer.fit = lambda cfg, hooks=None: segment_fit(cfg, step_hooks)
    sys.exit(main(cli_args))
