"""The resumable part of a fine-tuning run: what trains, the optimizer, the step, the random state.

``TrainingState.save(folder)`` writes ``trainer_state.pt``; ``load(folder)`` restores it, so a
resumed run takes the same steps, on the same batches, as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..errors import ConfigError, TrainingError
from ..models import LoadedModel
from ..models.sharing_manifest import is_lora_parameter
from .config import SUITE_KEYS, FinetuneConfig

STATE = "trainer_state.pt"
#: Options a resumed run must share with the run it continues (the rest, budgets included, may change).
RESUME_KEYS = ("data", "holdout", "text_column", "label_column", "train", "lr", "weight_decay", "warmup_steps",
               "batch_size", "max_length", "max_samples", "group_by_length", "seed", "quantize_aware", "int8_aware", "embedding_bits", "block_size",
               "lr_schedule", "precision")


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """The learning rate at ``step`` (0-based) as a share of ``config.lr``: a linear warm-up over
    ``warmup_steps``, then ``lr_schedule``: ``constant``, or ``linear`` / ``cosine`` decay to 0
    at ``max_steps``."""
    warmup = max(1, config.warmup_steps)
    if step < warmup or config.lr_schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    left = max(0.0, (config.max_steps - step) / max(1, config.max_steps - warmup))
    return left if config.lr_schedule == "linear" else 0.5 * (1 - math.cos(math.pi * left))


def check_resumable(output: str | Path) -> None:
    """``--resume`` needs the trainer state an earlier run left in ``output``."""
    if not (Path(output) / STATE).is_file():
        raise ConfigError(f"nothing to resume: {Path(output) / STATE} does not exist")


def select_trainable(loaded, mode: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for the chosen mode and return the trainable parameters.

    ``lora+norms`` trains the norms the adapter names (in the blocks, in the heads, outside).
    """
    chosen = []
    model = loaded.model
    norm_params = {id(p) for m in loaded.adapter.norm_modules(model) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        train = mode == "all" or is_lora_parameter(name) or (mode == "lora+norms" and id(p) in norm_params)
        p.requires_grad_(train)
        if train:
            chosen.append(p)
    if mode != "all" and not any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        raise ConfigError(f"--train {mode}: the student has no LoRA deltas (share it with --lora-rank R, or use --train all)")
    return chosen


@dataclass
class TrainingState:
    """The parameters being trained and everything a resumed run needs to continue them.

    Attributes:
        config: The run's options; saved so a resume can refuse changed ones (`RESUME_KEYS`).
        trainable: The parameters the optimizer updates (`select_trainable`).
        optimizer: AdamW over ``trainable``.
        scheduler: The learning rate over the steps (`lr_factor`).
        step: Optimizer steps taken, over all runs.
        history: One entry per step: ``step``, ``loss`` and each loss term.
        start_step: The step this run started from (not saved: a loaded state starts at its step).
        masters: Save the trained parameters themselves too: a mixed-precision run's float32
            values, which its 16-bit checkpoint rounds.
    """

    config: FinetuneConfig
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    history: list[dict] = field(default_factory=list)
    start_step: int = 0
    masters: bool = False

    @classmethod
    def start(cls, student: LoadedModel, config: FinetuneConfig) -> TrainingState:
        """A state at step 0: choose what trains (``config.train``) and build its optimizer.

        Raises:
            ConfigError: ``--train lora`` or ``lora+norms`` on a student without LoRA deltas.
        """
        trainable = select_trainable(student, config.train)
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config))
        return cls(config, trainable, optimizer, scheduler)

    def seed(self) -> None:
        """Seed the global random state for a fresh run (a loaded state restores it instead)."""
        torch.manual_seed(self.config.seed)

    def take_step(self, loss: torch.Tensor, parts: dict[str, float], *, before_update=None, value: float | None = None,
                  scale: float = 1.0) -> None:
        """One optimizer step down ``loss``, recorded in the history with each term in ``parts``;
        ``before_update`` is called between the backward pass and the update (a quantization-
        aware run puts the float weights back there). Under several processes ``loss`` is this
        rank's share, ``value`` the whole batch's loss and ``scale`` the world size (the
        gradients' averaging over ranks then gives the whole batch's gradient).

        Raises:
            TrainingError: the loss is not finite (the learning rate is too high).
        """
        value = float(loss.detach()) if value is None else value
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {self.step + 1}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        (loss * scale if scale != 1 else loss).backward()
        if before_update is not None:
            before_update()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.history.append({"step": self.step, "loss": value, **parts})

    def snapshot(self, model, distributed: bool = False) -> dict:
        """What ``trainer_state.pt`` holds: step, optimizer, scheduler, random state, history,
        options. The optimizer's state is whole and keyed by parameter name (torch's
        distributed-checkpoint form), so a run resumes on any number of processes; under
        several processes every rank calls this (it gathers the shards) and rank 0 writes it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from .distributed import full_value

        options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
        masters = {"masters": [full_value(p) for p in self.trainable]} if self.masters else {}
        return {"step": self.step, "optimizer": get_optimizer_state_dict(model, self.optimizer, options=options),
                "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(), "history": self.history,
                "config": self.config.to_dict(), **masters}

    def save(self, folder: Path, snapshot: dict) -> None:
        """Write ``folder/trainer_state.pt``: a `snapshot` (taken on every rank, written by one)."""
        torch.save(snapshot, Path(folder) / STATE)

    def load(self, folder: Path, model, distributed: bool = False) -> None:
        """Continue from ``folder/trainer_state.pt``, restoring the global random state too,
        whatever number of processes wrote it.

        Raises:
            ConfigError: an option in `RESUME_KEYS` differs from the saved run's.
        """
        saved = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=False)
        keys = RESUME_KEYS + (SUITE_KEYS if self.config.holdout == "suite" else ())
        # an option a run saved before it existed had its default
        defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
        if self.config.lr_schedule != "constant":  # the decay ends at max_steps: another would jump the rate
            keys += ("max_steps",)
        changed = [k for k in keys if saved["config"].get(k, defaults.get(k)) != getattr(self.config, k)]
        if changed:
            raise ConfigError(
                "--resume continues the same run; these options differ from it: "
                + ", ".join(f"--{k.replace('_', '-')} (was {saved['config'].get(k, defaults.get(k))!r})" for k in changed)
            )
        masters = saved.get("masters")
        if masters is not None:  # the float32 values the 16-bit checkpoint rounded
            if [tuple(m.shape) for m in masters] != [tuple(p.shape) for p in self.trainable]:
                raise ConfigError(f"--resume: {Path(folder) / STATE} trains other parameters than this student has")
            from .distributed import set_full_value

            for p, m in zip(self.trainable, masters):
                set_full_value(p, m)
        optimizer = saved["optimizer"]
        if all(isinstance(i, int) for g in optimizer["param_groups"] for i in g["params"]):  # before the named form
            if distributed:
                raise ConfigError(f"--resume: {Path(folder) / STATE} was written by an older compress, whose state "
                                  "one process alone can read; resume it in one process for a step first")
            self.optimizer.load_state_dict(optimizer)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
            foreign = [n for g in optimizer["param_groups"] for n in g["params"] if n not in names]
            if foreign:
                raise ConfigError(f"--resume: {Path(folder) / STATE} trains {foreign[0]}, which this student does not "
                                  "train: it belongs to another model")

            set_optimizer_state_dict(model, self.optimizer, optimizer,
                                     options=StateDictOptions(full_state_dict=distributed, strict=False))
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = self.start_step = saved["step"]
        self.history = saved["history"]
        torch.set_rng_state(saved["rng"])
