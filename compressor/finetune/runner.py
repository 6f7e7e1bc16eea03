"""The fine-tuning stage on folders: a compressed model in, a fine-tuned checkpoint out.

`compress finetune` and a recipe's ``finetune`` stage both run `run_finetune`; `STAGE` declares the
stage (its command, with ``--resume`` and ``--quiet``, is written in ``cli/finetune.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..contract import StageRun, Stage
from ..errors import ConfigError
from ..io import check_writable
from ..record import StageRecord
from .config import FinetuneConfig


def run_finetune(student, config: FinetuneConfig, output: str | Path, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = False, devices: int = 0) -> StageRecord:
    """Distil into ``student`` and write the checkpoint to ``output`` (every ``save_every`` steps
    and at the end). With ``resume``, continue the run ``output`` holds from its last saved step.
    With ``config.processes`` (or, when it is not set, ``devices``: a batch job's GPUs) above
    one, the run is launched on that many processes of this machine under torchrun.

    Raises:
        ConfigError: ``resume`` with nothing to resume in ``output``; several processes asked
            for a student that is not a folder.
        OutputExistsError: ``output`` exists and neither ``overwrite`` nor ``resume`` is set.
    """
    from ..models import as_loaded
    from .stage import check_resumable, finetune

    if not resume and restarted() and _same_run(Path(output)):
        resume = True  # torchrun restarted the processes after one died: continue from the last checkpoint
    if resume:
        check_resumable(output)
    else:
        check_writable(output, overwrite=overwrite, folder=True)
    processes = _processes(config, devices)
    if processes > 1 and not launched():
        if student is not None and not isinstance(student, (str, os.PathLike)):
            raise ConfigError("--processes starts new processes, which read the student from a folder; "
                              "save it first (save_checkpoint) and pass its path")
        from .launch import launch

        return launch(None if student is None else str(student), config, output, processes, resume=resume,
                      overwrite=overwrite, progress=progress)
    _, record = finetune(as_loaded(output if resume else student), config, output=output, resume=resume,
                         overwrite=overwrite, progress=progress)
    return record


def _processes(config: FinetuneConfig, devices: int) -> int:
    """How many processes to launch: ``--processes``, else a job's GPUs when several, where the
    run can be split (`distributed.why_not_split`); a job's GPUs that cannot split it leave it
    in one process, with a line saying why.

    Raises:
        ConfigError: ``--processes N`` for a run N processes cannot split.
    """
    import sys

    from .distributed import why_not_split

    wanted = config.processes or (devices if devices > 1 else 1)
    why = why_not_split(config, wanted)
    if why is None:
        return wanted
    if config.processes:
        raise ConfigError(f"--processes {wanted}: {why}; drop --processes", option="processes")
    sys.stderr.write(f"compress: finetune in one process, not on the job's {devices} GPUs: {why}\n")
    return 1


def _same_run(output: Path) -> bool:
    """``output`` holds a checkpoint of the run torchrun is restarting (its ``TORCHELASTIC_RUN_ID``),
    not one an earlier run left there."""
    import json

    from .stage import REPORT, STATE

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or not (output / STATE).is_file():
        return False
    try:
        saved = json.loads((output / REPORT).read_text())["metrics"]["distributed"].get("run_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return saved == run_id


def restarted() -> bool:
    """Whether torchrun (``--max-restarts``) started these processes again after one failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def launched() -> bool:
    """Whether this process is one of several a launcher (torchrun, accelerate) started."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def run(run: StageRun) -> StageRecord:
    """A compressed checkpoint, as ``compress finetune`` writes it; an unfinished run continues
    from its last saved step (``--resume``). The teacher is the original the student records."""
    from .stage import STATE

    resume = run.resume and (run.output / STATE).is_file()
    record = run_finetune(run.model, run.config, run.output, resume=resume, overwrite=run.overwrite,
                          progress=run.progress, devices=run.devices)
    if record.metrics["stopped_by"] == "interrupted":
        # Ctrl-C: the checkpoint is saved and resumable, but the stage is not done.
        raise KeyboardInterrupt
    return record


STAGE = Stage("finetune", FinetuneConfig, run, writes="model", resumable=True,
                  key_metrics=("metrics.steps", "metrics.loss_last"), own_command=True)


def main(spec: str) -> int:
    """One rank of a run `launch.launch` started: the run its JSON file describes, with one error
    line on failure (which `launch` reads back)."""
    import json
    import sys

    from ..errors import CompressError
    from .launch import ERROR

    run = json.loads(Path(spec).read_text())
    try:
        run_finetune(run["model"], FinetuneConfig.from_dict(run["config"]), run["output"], resume=run["resume"],
                     overwrite=run["overwrite"], progress=run["progress"])
    except CompressError as e:
        sys.stderr.write(f"{ERROR}{e}\n")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1]))
