"""Recovery fine-tuning: ``model, record = finetune(student, FinetuneConfig(...), output=...)``.

Knowledge distillation from the original (teacher) into the compressed model (student):

* hidden-state loss: per layer, ``||h_s - h_t||^2 / ||h_t||^2`` over real tokens, averaged;
* embedding loss (encoders): ``1 - cos`` of the pooled sentence embeddings;
* KL(teacher || student) on logits (causal LMs per token, classifiers per text);
* cross-entropy on labels (classifiers, when the data has labels).

The output folder is a compressed checkpoint at every moment that matters: every
``save_every`` steps, at the end, and on Ctrl-C (the first Ctrl-C finishes the current step and
saves; a second one stops at once). ``trainer_state.pt`` beside it lets ``--resume`` continue
from the step it stopped at, with the same data order and random state. Dropout is off during
training: the student learns the teacher's eval-mode function.

After a vocabulary cut (`compress prune --vocab-from`) teacher and student each read the text
with their own tokenizer: the pooled-embedding term compares every text, the token-level terms
(hidden states, per-token KL over the kept vocabulary) the texts both split into the same tokens.

The training texts and their batches are in ``data.py``; what a resume restores (trainable
parameters, optimizer, scheduler, step, random state) is the ``TrainingState`` of ``state.py``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..fidelity import check_teacher, same_tokens, teacher_ids
from ..models import LoadedModel, unique_parameters
from ..models.heads import is_sequence_classifier, output_heads
from ..models.pooling import pool
from ..record import StageRecord
from .config import FinetuneConfig
from .data import TrainingData, load_training_data
from .distributed import World
from .state import STATE, TrainingState, check_resumable, select_trainable

# STATE, check_resumable and select_trainable live in state.py; older callers import them from here.
__all__ = ["STATE", "check_resumable", "check_teacher", "distillation_loss", "finetune", "layer_pairs", "same_tokens",
           "select_trainable", "teacher_ids", "common_width"]

REPORT = "finetune_report.json"


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from (hidden-state indices, 1-based).

    The same count pairs layer with layer; a student with fewer layers (after `prune
    --drop-layers`) maps its layers evenly onto the teacher's, last onto last (TinyBERT's
    uniform mapping).
    """
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


#: Temperature of `neighbour_loss`'s softmax over cosine similarities.
NEIGHBOUR_TEMPERATURE = 0.05


def neighbour_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each text's softmax over its cosine similarities to the other
    texts of the batch (its own left out): zero when the student ranks and spaces every text's
    neighbours as the teacher does, whatever the embeddings' scale."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    own = torch.eye(len(s), dtype=torch.bool, device=s.device)
    logits_s = (s @ s.T / NEIGHBOUR_TEMPERATURE).masked_fill(own, float("-inf"))
    logits_t = (t @ t.T / NEIGHBOUR_TEMPERATURE).masked_fill(own, float("-inf"))
    log_s = F.log_softmax(logits_s, -1).masked_fill(own, 0.0)
    log_t = F.log_softmax(logits_t, -1).masked_fill(own, 0.0)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def distillation_loss(student_out, teacher_out, mask, config: FinetuneConfig, pooling: str, *, labels=None,
                      is_encoder: bool, teacher_mask=None, rows=None,
                      vocab_map: torch.Tensor | None = None, total=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the distillation terms, and each term's value.

    Every term is a sum over the batch divided by a count (tokens, texts) or norm of the whole
    batch; ``total`` gives that whole (the sum over the processes of a distributed run, each
    holding some rows), so the processes' losses add up to the loss of the batch in one.

    ``teacher_mask``, ``rows`` and ``vocab_map`` are for a student with a cut vocabulary, which
    reads the batch with its own tokenizer: the teacher's attention mask, the texts (a boolean
    per row) both split into the same tokens, which alone enter the token-level terms, and the
    teacher id of each student id, which picks the teacher's logits of the kept tokens.
    """
    total = total or (lambda value: value)
    real = mask.bool()
    t_real = real if teacher_mask is None else teacher_mask.bool()
    if rows is not None:  # token-level terms on the texts both models split alike
        real, t_real = real & rows[:, None], t_real & rows[:, None]
    parts: dict[str, torch.Tensor] = {}
    token_level = rows is None or bool(rows.any())
    if config.hidden_weight and token_level:
        terms = []
        for i, j in layer_pairs(len(student_out.hidden_states) - 1, len(teacher_out.hidden_states) - 1):
            hs, ht = student_out.hidden_states[i][real].float(), teacher_out.hidden_states[j][t_real].float()
            terms.append(((hs - ht) ** 2).sum() / total((ht**2).sum()).clamp(min=1e-12))
        parts["hidden"] = torch.stack(terms).mean()
    if (config.embedding_weight or config.similarity_weight) and is_encoder:
        es = pool(student_out.hidden_states[-1].float(), mask, pooling)
        et = pool(teacher_out.hidden_states[-1].float(), mask if teacher_mask is None else teacher_mask, pooling)
        if config.embedding_weight:
            parts["embedding"] = (1 - F.cosine_similarity(es, et, dim=-1)).sum() / total(_count(es))
        if config.similarity_weight and len(es) > 2:
            parts["similarity"] = neighbour_loss(es, et)
    logits_s, logits_t = getattr(student_out, "logits", None), getattr(teacher_out, "logits", None)
    if config.kl_weight and logits_s is not None and logits_t is not None and (logits_s.dim() == 2 or token_level):
        if logits_s.dim() == 3:  # causal LM: per real token
            logits_s, logits_t = logits_s[real], logits_t[t_real]
            if vocab_map is not None:  # the teacher's distribution over the tokens the student kept
                logits_t = logits_t[:, vocab_map]
        # (a cut head with rows past its tokenizer's ids has no teacher column to match: no KL)
        if vocab_map is None or logits_s.shape == logits_t.shape:
            parts["kl"] = F.kl_div(F.log_softmax(logits_s.float(), -1), F.log_softmax(logits_t.float(), -1),
                                   log_target=True, reduction="sum") / total(_count(logits_s)).clamp(min=1)
    if config.label_weight and labels is not None and logits_s is not None and getattr(student_out, "logits", None).dim() == 2:
        parts["label"] = F.cross_entropy(student_out.logits.float(), labels, reduction="sum") / total(_count(labels))
    weights = {"hidden": config.hidden_weight, "embedding": config.embedding_weight, "kl": config.kl_weight,
               "label": config.label_weight, "similarity": config.similarity_weight}
    if not parts and rows is not None:  # a batch of texts split differently, and token-level terms alone
        return student_out.hidden_states[-1].sum() * 0.0, {}
    if not parts:
        raise ConfigError("every loss term is switched off or does not apply to this model")
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _count(rows: torch.Tensor) -> torch.Tensor:
    """How many rows (texts, tokens) a tensor holds, as a float tensor on its device."""
    return torch.tensor(float(len(rows)), device=rows.device)


def finetune(
    student: LoadedModel,
    config: FinetuneConfig,
    *,
    output: str | Path,
    teacher: LoadedModel | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[LoadedModel, StageRecord]:
    """Distil ``teacher`` into ``student`` for a short budget and write a compressed checkpoint.

    Args:
        student: The compressed model (shared, with LoRA deltas for ``--train lora``).
        config: Data, budget, what trains, loss weights.
        output: Checkpoint folder; rewritten every ``save_every`` steps and at the end.
        teacher: The original; loaded from ``config.teacher`` (or the student's recorded
            source) when ``None``.
        resume: Continue from ``output/trainer_state.pt`` (``student`` should be loaded from
            ``output``).
        overwrite: Replace an existing ``output`` when not resuming.
        progress: Show a progress bar with loss and time left.

    Returns:
        The trained student and a record (steps, losses, seconds per step, device, why it stopped).

    Raises:
        ConfigError / DataError: a mismatched teacher, unusable data, an empty split, a missing
            trainer state for ``resume``.
    """
    from ..io import check_writable

    start_time = time.perf_counter()
    output = Path(output)
    if resume:
        check_resumable(output)
    else:
        check_writable(output, overwrite=overwrite, folder=True)
    from .distributed import check_rows, check_world, resolve_strategy

    world = World.from_env(config.backend, config.device)
    check_world(world, config)
    device = world.device(config.resolved_device())
    loaded_dtype = _weights_dtype(student.model)
    precision = resolve_precision(config, loaded_dtype)
    # float32: AdamW's small steps vanish in a bf16 weight (its 8-bit mantissa), so every weight
    # trains in float32, the teacher too. mixed: only the deltas train, so the frozen base and the
    # teacher stay in bf16 and the trained parameters alone are float32 (a 1.7 B pair in 6 GiB
    # rather than 13); bf16 whatever the checkpoint's 16 bits: fp16's narrow exponent flushes the
    # small gradients of the hidden-state loss to zero without loss scaling
    compute = torch.float32 if precision == "float32" else torch.bfloat16
    trainable = select_trainable(student, config.train)
    if teacher is None:
        source = config.teacher or _recorded_source(student)
        if source is None:
            raise ConfigError("name the original model with --teacher")
        check_distillation_fits(student, source, precision, compute, trainable)
        from ..models import load_model

        teacher = load_model(source, dtype=compute)
    check_teacher(student, teacher)
    vocab_map = teacher_ids(student.tokenizer, teacher.tokenizer, device)
    if vocab_map is not None and world.distributed:
        raise ConfigError(f"{student.name} has a cut vocabulary, whose texts the teacher splits its own way; "
                          "distil it in one process (without torchrun)")
    data = load_training_data(student, config)
    check_rows(world, len(data.texts), config.batch_size)

    _cast_parameters(student.model, compute)  # parameters only: buffers such as RoPE's inv_freq stay float32
    for p in trainable:  # mixed: float32 master copies of what trains, the base left in 16 bits
        p.data = p.data.float()
    _cast_parameters(teacher.model, compute)
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    sizes = unique_parameters(student.model), unique_parameters(teacher.model)
    strategy = resolve_strategy(config, sizes[0][0], world)
    if strategy != "fsdp":  # FSDP2 moves each unit to the device as it shards it: never the whole model there
        student.model.to(device)
        teacher.model.to(device)
    forward, teacher_forward = student.model, teacher.model
    if strategy is not None:  # wrapped before the optimizer exists: FSDP2 swaps the parameters for shards
        from .distributed import wrap_student, wrap_teacher

        forward, teacher_forward = wrap_student(student, strategy, device), wrap_teacher(teacher, strategy)
    if strategy == "fsdp":  # what no unit holds (buffers) follows; a no-op for the shards
        student.model.to(device)
        teacher.model.to(device)
    state = TrainingState.start(student, config)
    state.masters = precision == "mixed"
    aware = _quantization_aware(student, config, output if resume else None)
    if resume:
        state.load(output, student.model, distributed=world.distributed)
    else:
        state.seed()

    run = _Run(student, teacher_forward, data, state, output, device, start_time, teacher.tokenizer,
               vocab_map, aware,
               loaded_dtype=loaded_dtype, precision=precision, compute=compute, sizes=sizes, world=world,
               strategy=strategy, forward=forward)
    try:
        reason = _train(run, progress=progress and world.is_main)
        run.save(reason)
        record = run.record(reason)
    finally:
        world.close()
    if aware is not None:
        aware.commit()  # the student returned is the checkpoint written, not the float weights behind it
    for p in state.trainable:  # and a mixed run's deltas in the base's dtype, as the checkpoint reloads
        p.data = p.data.to(compute)
    return student, record


def resolve_precision(config: FinetuneConfig, loaded: torch.dtype) -> str:
    """``float32`` or ``mixed`` (`FinetuneConfig.precision`): ``auto`` is ``mixed`` for a 16-bit
    student whose deltas alone train (and no rounded weights behind them)."""
    if config.precision != "auto":
        return config.precision
    rounded = config.quantize_aware or config.int8_aware or config.embedding_bits
    low = loaded in (torch.bfloat16, torch.float16)
    return "mixed" if low and config.train != "all" and not rounded else "float32"


def check_distillation_fits(student: LoadedModel, source: str, precision: str, compute: torch.dtype,
                            trainable: list[torch.nn.Parameter]) -> None:
    """Refuse, before the teacher is read, a run whose teacher, float32 student and optimizer
    would not fit the memory left; name ``--precision mixed`` where it would.

    What is counted: the teacher's weights in ``compute``, the student's growth to float32 (the
    float32 path) or its trained parameters' float32 copies (mixed), and AdamW's gradient and two
    moments per trained number; activations come on top (`MEMORY_SHARE` leaves room for them).

    Raises:
        ConfigError: it does not fit.
    """
    from ..io import available_memory_bytes
    from ..models.memory import GIB, MEMORY_SHARE, weights_numel

    available = available_memory_bytes()
    folder = Path(source)
    teacher_numel = weights_numel(folder, source) if folder.is_dir() else None
    if available is None or teacher_numel is None:
        return
    student_numel, student_bytes = unique_parameters(student.model)
    trained = sum(p.numel() for p in trainable)

    def needed(precision: str, compute: torch.dtype) -> int:
        size = torch.empty((), dtype=compute).element_size()
        grown = student_numel * 4 - student_bytes if precision == "float32" else trained * (4 - size)
        return teacher_numel * size + max(0, grown) + trained * 12

    need = needed(precision, compute)
    if need <= MEMORY_SHARE * available:
        return
    mixed = needed("mixed", torch.bfloat16) if trained < student_numel else None
    hint = (f"; --precision mixed (the deltas in float32 on a frozen bf16 base, a bf16 teacher) needs "
            f"{mixed / GIB:.1f} GiB" if precision == "float32" and mixed is not None and mixed < need
            else "; free memory, or run it on a machine with more")
    raise ConfigError(f"distilling into {student.name} needs {need / GIB:.1f} GiB more (the teacher, "
                      f"{'the student in float32' if precision == 'float32' else 'the float32 deltas'} and "
                      f"AdamW's state) and this machine has {available / GIB:.1f} GiB available{hint}",
                      option="precision")


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in ``dtype``; buffers keep theirs (transformers keeps RoPE's
    ``inv_freq`` in float32 on purpose: in bf16 the angles drift by a tenth of a radian by
    position 64)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP2, else the whole)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_dtype(model) -> torch.dtype:
    """The dtype of the model's floating weights (the first one's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _quantization_aware(student: LoadedModel, config: FinetuneConfig, resumed: Path | None):
    """The rounded weights ``--quantize-aware`` (int4 blocks), ``--int8-aware`` (int8 per channel,
    inputs as dynamic int8) and ``--embedding-bits`` (the tables) train on (the output head left
    out), with the float weights a resumed run left; ``None`` without any of them.

    Raises:
        ConfigError: the model has no projection a block wide, or a resume lacks its float weights.
    """
    if not (config.quantize_aware or config.int8_aware or config.embedding_bits):
        return None
    from ..grids.aware import LATENT, QuantizationAware

    model = student.model
    aware = QuantizationAware(model, config.block_size, skip=output_heads(model),
                              projections=config.quantize_aware, table_bits=config.embedding_bits,
                              int8=config.int8_aware)
    if (config.quantize_aware or config.int8_aware) and not aware.projections:
        if config.int8_aware:
            raise ConfigError(f"--int8-aware: {student.name} has no projection outside its output head")
        raise ConfigError(f"--quantize-aware: {student.name} has no projection at least --block-size "
                          f"{config.block_size} wide to train for int4")
    if config.embedding_bits and not aware.tables:
        raise ConfigError(f"--embedding-bits: {student.name} has no embedding table whose width is whole "
                          f"--block-size {config.block_size} blocks")
    if resumed is not None:
        if not (resumed / LATENT).is_file():
            raise ConfigError(f"--resume of a quantization-aware run needs {resumed / LATENT}, which the run "
                              "being resumed did not write")
        try:
            aware.load(resumed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return aware


def _recorded_source(student: LoadedModel) -> str | None:
    """The original dense model the student was made from, if it is not the student itself."""
    origin = student.origin
    if not origin or Path(origin) == Path(student.source):
        return None
    return origin


@dataclass
class _Run:
    """One call of `finetune`: the models, the data, the state, and where and since when it saves."""

    student: LoadedModel
    teacher: torch.nn.Module  # on the device, in eval mode, frozen
    data: TrainingData
    state: TrainingState
    output: Path
    device: str
    start_time: float  # the run's seconds include loading; its time budget does not
    teacher_tokenizer: object
    vocab_map: torch.Tensor | None  # teacher id of each student id after a vocabulary cut, else None
    aware: object | None = None  # grids.aware.QuantizationAware with --quantize-aware
    loaded_dtype: torch.dtype = torch.float32  # the student's checkpoint's dtype
    precision: str = "float32"  # `resolve_precision`'s: float32, or mixed (a frozen 16-bit base)
    compute: torch.dtype = torch.float32  # the base's and the teacher's dtype while training
    sizes: tuple = ((0, 0), (0, 0))  # (parameters, bytes) of the student and the teacher, whole
    world: World = field(default_factory=World)  # the processes training together
    strategy: str | None = None  # ddp or fsdp under torchrun, None in one process
    forward: torch.nn.Module | None = None  # what runs the student: itself, or its DDP wrapper

    def record(self, reason: str) -> StageRecord:
        """The stage record as it stands: steps, losses, seconds per step, why it stopped."""
        state = self.state
        history = state.history
        done = history[state.start_step :]
        window = max(1, min(10, len(history) // 4 or 1))
        seconds = time.perf_counter() - self.start_time
        metrics = {
            "steps": state.step,
            "steps_this_run": state.step - state.start_step,
            "stopped_by": reason,
            "device": self.device,
            "trainable_params": sum(p.numel() for p in state.trainable),
            "precision": self.precision,
            "dtype": {"loaded": _name(self.loaded_dtype), "trained": "float32", "base": _name(self.compute),
                      "teacher": _name(self.compute)},
            "gradient_checkpointing": state.config.gradient_checkpointing,
            "distributed": self.how_distributed(),
            "memory": self.memory(),
            "texts": len(self.data.texts),
            "held_out": self.data.held_out,
            **({"quantize_aware": {"bits": self.aware.bits, "block_size": self.aware.block_size,
                                   "weights": self.aware.projections,
                                   **({"table_bits": self.aware.table_bits, "tables": self.aware.tables}
                                      if self.aware.table_bits else {})}}
               if self.aware is not None else {}),
            "loss_first": sum(h["loss"] for h in history[:window]) / window if history else None,
            "loss_last": sum(h["loss"] for h in history[-window:]) / window if history else None,
            "seconds_per_step": seconds / len(done) if done else None,
            "history": history,
        }
        return StageRecord.build("finetune", state.config, before=self.sizes[0], metrics=metrics,
                                 started=self.start_time)

    def how_distributed(self) -> dict:
        """How many processes trained and how each model was held on them."""
        world = self.world
        run_id = {"run_id": os.environ["TORCHELASTIC_RUN_ID"]} if os.environ.get("TORCHELASTIC_RUN_ID") else {}
        if not world.distributed:
            return {"world_size": 1, **run_id}
        sharded = self.strategy == "fsdp"
        return {"world_size": world.size, **run_id, "backend": world.backend, "strategy": self.strategy,
                "batch_per_rank": self.state.config.batch_size // world.size,
                "student": "sharded (FSDP2 fully_shard: a unit per sharing group and per other block)" if sharded
                else "replicated (DistributedDataParallel)",
                "teacher": "sharded (FSDP2 fully_shard per block, no optimizer)" if sharded
                else "replicated (no optimizer)"}

    def memory(self) -> dict[str, float]:
        """What the run holds (MiB): the student's and the teacher's weights, the trained
        parameters' gradients and AdamW moments (whole, and on this rank: a shard under FSDP2),
        and the process's peak resident set so far."""
        from ..io import peak_rss_mib

        trained = sum(_local(p).numel() for p in self.state.trainable)
        whole = sum(p.numel() for p in self.state.trainable)
        return {"student_weights_mib": round(self.sizes[0][1] / 2**20, 1),
                "teacher_weights_mib": round(self.sizes[1][1] / 2**20, 1),
                "gradients_and_optimizer_mib": round(whole * 12 / 2**20, 1),
                "rank_parameters_mib": round(sum(_local(p).numel() * p.element_size()
                                                 for p in self.student.model.parameters()) / 2**20, 1),
                "rank_gradients_and_optimizer_mib": round(trained * 12 / 2**20, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1)}

    def save(self, reason: str) -> None:
        """Rewrite ``output`` as a checkpoint, with the trainer state and the report beside it
        (under several processes: every rank gathers, rank 0 writes, the others wait)."""
        from ..models.checkpoint import save_checkpoint
        from .distributed import full_parameters

        world = self.world
        distributed = world.distributed
        snapshot = self.state.snapshot(self.student.model, distributed)
        report = json.dumps(self.record(reason).to_dict(), indent=2)

        def extras(staged: Path) -> None:  # written into the staged folder, so all land together
            self.state.save(staged, snapshot)
            if self.aware is not None:
                self.aware.save(staged)  # the float weights behind the rounded ones, for --resume
            (staged / REPORT).write_text(report)

        with full_parameters(self.student.model, world), \
                self.aware.as_stored() if self.aware is not None else nullcontext():  # the checkpoint: the rounded model
            if world.is_main:
                save_checkpoint(self.student, self.output, overwrite=True, extra_files=extras)
        if distributed:
            world.barrier()


def _train(run: _Run, *, progress: bool) -> str:
    """Take steps until the step or time budget, or a Ctrl-C, stops them; return which stopped them."""
    state, config, student = run.state, run.state.config, run.student
    # the pooled-embedding loss is for sentence encoders; a classifier is judged by its head (KL, labels)
    is_encoder = not student.adapter.is_decoder and not is_sequence_classifier(student.model)
    kind = "cuda" if run.device.startswith("cuda") else "cpu"
    # mixed: the forward pass in the frozen base's 16 bits (the float32 deltas cast per matmul);
    # float32 on a GPU: bf16 autocast as ever; float32 on the CPU: float32 throughout
    autocast = (torch.autocast(kind, dtype=run.compute) if run.precision == "mixed"
                else torch.autocast("cuda", dtype=torch.bfloat16) if kind == "cuda" else nullcontext())
    bar = _progress(config, state.step) if progress else None
    loop_start = time.perf_counter()  # the time budget is training time, not loading time
    # Dropout stays off: the student is taught to compute what the teacher computes in eval
    # mode, and the run is deterministic on CPU.
    student.model.eval()
    checkpointing = _checkpointed_blocks(student) if config.gradient_checkpointing else nullcontext()
    try:
        with _StopFlag() as stop, checkpointing:
            while (reason := _agreed(run.world, _stop_reason(config, state.step, loop_start, stop))) is None:
                enc, labels = run.data.batch(state.step, config, student.tokenizer, run.device)
                if run.world.distributed:  # the global batch, one padded width; this rank's rows of it
                    rows = run.world.rows(config.batch_size)
                    enc = {k: v[rows] for k, v in enc.items()}
                    labels = labels[rows] if labels is not None else None
                t_enc = None
                if run.vocab_map is not None:  # the same texts in the teacher's own tokens
                    t_enc, _ = run.data.batch(state.step, config, run.teacher_tokenizer, run.device)
                    enc, t_enc = common_width(enc, student.tokenizer, t_enc, run.teacher_tokenizer)
                with run.aware.rounded() if run.aware is not None else nullcontext():
                    # forward and backward on the int4 weights, the update on the float ones
                    with autocast:
                        loss, parts = _batch_loss(run, enc, labels, is_encoder=is_encoder, t_enc=t_enc)
                    value = None
                    if run.world.distributed:  # this rank's share; the batch's loss is their sum
                        summed = run.world.total(torch.tensor([float(loss.detach()), *parts.values()],
                                                              dtype=torch.float64, device=loss.device)).tolist()
                        value, parts = summed[0], dict(zip(parts, summed[1:]))
                    state.take_step(loss, parts, before_update=run.aware.restore if run.aware is not None else None,
                                    value=value, scale=run.world.size)
                if bar is not None:
                    _show_progress(bar, state.history[-1]["loss"], config, loop_start)
                if config.save_every and state.step % config.save_every == 0:
                    run.save("checkpoint")
    finally:
        if bar is not None:
            bar.close()
    return reason


@contextmanager
def _checkpointed_blocks(student: LoadedModel):
    """Gradient checkpointing per block: each block's forward runs under
    ``torch.utils.checkpoint`` (non-reentrant, so keyword inputs pass and autocast is replayed),
    keeping its input alone and recomputing it in the backward pass. transformers' own
    ``gradient_checkpointing_enable`` acts in training mode only, and the student trains in eval
    mode (no dropout)."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(student.adapter.blocks(student.model))
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def _agreed(world, reason: str | None) -> str | None:
    """Rank 0's reason to stop, on every rank (a time budget or a Ctrl-C seen a moment apart
    must not leave one rank waiting in a collective the others skipped)."""
    if not world.distributed:
        return reason
    import torch.distributed as dist

    shared = [reason]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _stop_reason(config: FinetuneConfig, step: int, loop_start: float, stop: _StopFlag) -> str | None:
    """Why training stops before the next step (``max_steps``, ``max_minutes``, ``interrupted``), or ``None``."""
    if config.max_steps is not None and step >= config.max_steps:
        return "max_steps"
    if config.max_minutes is not None and time.perf_counter() - loop_start >= 60 * config.max_minutes:
        return "max_minutes"
    if stop.requested:
        return "interrupted"
    return None


def _batch_loss(run: _Run, enc, labels: torch.Tensor | None, *, is_encoder: bool, t_enc=None):
    """Teacher and student on one tokenized batch (``t_enc``: the teacher's own tokens of it,
    after a vocabulary cut), and the distillation loss between them."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t_ids, t_mask = (ids, mask) if t_enc is None else (t_enc["input_ids"], t_enc["attention_mask"])
    # a decoder keeps no key/value cache: nothing generates, and it would hold every layer's keys
    no_cache = {"use_cache": False} if run.student.adapter.is_decoder else {}
    with torch.no_grad():
        t_out = run.teacher(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True, **no_cache)
    s_out = run.forward(input_ids=ids, attention_mask=mask, output_hidden_states=True, **no_cache)
    extra = {}
    if t_enc is not None:
        extra = dict(teacher_mask=t_mask, rows=same_tokens(ids, mask, t_ids, t_mask, run.vocab_map),
                     vocab_map=run.vocab_map)
    return distillation_loss(s_out, t_out, mask, run.state.config, run.student.pooling, labels=labels,
                             is_encoder=is_encoder, total=run.world.total, **extra)


def common_width(enc, tokenizer, t_enc, t_tokenizer):
    """Both batches padded to one width, each on its tokenizer's padding side: a text both split
    alike then sits at the same positions in both (left padding moves the positions of models
    that do not derive them from the mask, such as GPT-2)."""
    width = max(enc["input_ids"].shape[1], t_enc["input_ids"].shape[1])
    return _padded(enc, width, tokenizer), _padded(t_enc, width, t_tokenizer)


def _padded(enc, width: int, tokenizer) -> dict:
    extra = width - enc["input_ids"].shape[1]
    if extra == 0:
        return enc
    pad = (extra, 0) if tokenizer.padding_side == "left" else (0, extra)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": F.pad(enc["input_ids"], pad, value=pad_id), "attention_mask": F.pad(enc["attention_mask"], pad, value=0)}


class _StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step; the second stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _progress(config: FinetuneConfig, start_step: int):
    """On a terminal, a tqdm bar over the step budget (from the resumed step) with the loss;
    elsewhere, `compressor.progress`'s lines (or jsonl events) with the time left."""
    from tqdm.auto import tqdm

    from ..progress import Progress, shows_bar

    if not shows_bar():
        left = config.max_steps - start_step if config.max_steps is not None else 0  # 0: a time budget
        line = Progress(f"finetune from step {start_step}" if start_step else "finetune", left, "steps")
        line.update(0)  # "0/N steps" now if loading the models left stderr quiet: the first step may be long
        return line
    total = config.max_steps
    bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, desc="finetune")
    if config.max_minutes is not None and total is None:
        bar.set_description(f"finetune (<= {config.max_minutes:g} min)")
    return bar


def _show_progress(bar, loss: float, config: FinetuneConfig, loop_start: float) -> None:
    """Advance the bar by one step and show the step's loss (and the time left of a time budget)."""
    from ..progress import Progress

    bar.update(1)
    if isinstance(bar, Progress):  # lines or events: the rate and the time left
        return
    postfix = {"loss": f"{loss:.4f}"}
    if config.max_minutes is not None:  # tqdm's own ETA only knows the step budget
        left = max(0.0, 60 * config.max_minutes - (time.perf_counter() - loop_start))
        postfix["time left"] = f"{int(left // 60)}:{int(left % 60):02d}"
    bar.set_postfix(postfix)
