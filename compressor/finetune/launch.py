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
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import TrainingError
from ..record import StageRecord
from .config import FinetuneConfig

#: How a rank reports the error that stopped it (`runner.main`), one line.
ERROR = "compress: error: "
#: torchrun's own log lines (glog's ``[IWEF]MMDD hh:mm:ss``), left out of what the user sees.
TORCHRUN_LOG = re.compile(r"^(\[rank\d+\]:)?\[?[IWEF]\d{4} ")
#: A traceback's last line in a rank's output: ``[rank1]: RuntimeError: ...``.
RAISED = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:\w+\.)*\w*(?:Error|Exception): .+)$")


def launch(model: str | None, config: FinetuneConfig, output: str | Path, processes: int, *, resume: bool,
           overwrite: bool, progress: bool) -> StageRecord:
    """Run the fine-tune on ``processes`` processes under torchrun and return rank 0's record.

    Its processes' stderr (progress, errors) is passed through as it comes.

    Raises:
        TrainingError: a process failed (its last error line is the message).
    """
    from .stage import REPORT

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
        said, raised = None, None  # a rank's own error line; the last exception a rank's traceback named
        try:
            for line in proc.stderr:
                line = line.rstrip("\n")
                if ERROR in line:
                    said = said or line[line.index(ERROR) + len(ERROR):]
                elif (found := RAISED.search(line)) is not None:
                    raised = found.group(1)
                elif not TORCHRUN_LOG.match(line) and "torch/distributed" not in line:
                    sys.stderr.write(line + "\n")
        except KeyboardInterrupt:  # torchrun passes the Ctrl-C on: every rank finishes its step and saves
            pass
        code = proc.wait()
    report = output / REPORT
    record = StageRecord(**json.loads(report.read_text())) if report.is_file() else None
    if record is not None and (code == 0 or record.metrics.get("stopped_by") == "interrupted"):
        return record  # an interrupted run is handed back as one process hands it back
    if code != 0:
        raise TrainingError(f"the fine-tune on {processes} processes failed: {said or raised or f'exit {code}'}")
    return record


def _threads(processes: int) -> int:
    """CPU threads per process: the machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // processes)
