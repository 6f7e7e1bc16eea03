"""A fine-tune on several processes of this machine, started for the user: `launch` runs
``torchrun --standalone --nproc-per-node N`` on `compressor.finetune.runner`, which reads the run
from a JSON file and calls `run_finetune` in every process (each then a rank of
`distributed.World`).

This is how ``--processes N`` and a batch job that declares ``num_gpus: N`` run their
fine-tune; several machines start ``compress finetune`` under ``torchrun`` themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from ..errors import TrainingError
from ..record import StageRecord
from .config import FinetuneConfig

REPORT = "finetune_report.json"
#: How a rank reports the error that stopped it (`runner.main`), one line.
ERROR = "compress: error: "


def launch(model: str | None, config: FinetuneConfig, output: str | Path, processes: int, *, resume: bool,
           overwrite: bool, progress: bool) -> StageRecord:
    """Run the fine-tune on ``processes`` processes under torchrun and return rank 0's record.

    Its processes' stderr (progress, errors) is passed through as it comes.

    Raises:
        TrainingError: a process failed (its last error line is the message).
    """
    output = Path(output)
    run = {"model": model, "config": config.to_dict(), "output": str(output), "resume": resume,
           "overwrite": overwrite, "progress": progress}
    with tempfile.TemporaryDirectory(prefix="compress-launch-") as tmp:
        spec = Path(tmp) / "run.json"
        spec.write_text(json.dumps(run))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "compressor.finetune.runner", str(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads(processes)))}
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        tail: deque[str] = deque(maxlen=40)
        said = None  # the first error line a rank wrote (each rank may write the same one)
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail.append(line)
            if ERROR in line:
                said = said or line[line.index(ERROR) + len(ERROR):]
            elif not line.startswith(("W1", "I1", "E1")) and "torch/distributed" not in line:  # torchrun's own log
                sys.stderr.write(line + "\n")
        code = proc.wait()
    if code != 0:
        last = next((line for line in reversed(tail) if line.strip() and not line.strip().startswith("=")), "")
        raise TrainingError(f"the fine-tune on {processes} processes failed: {said or last or f'exit {code}'}")
    return StageRecord(**json.loads((output / REPORT).read_text()))


def _threads(processes: int) -> int:
    """CPU threads per process: the machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // processes)
