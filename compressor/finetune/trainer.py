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
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.text import fit_length
from ..errors import CompressError, ConfigError, DataError
from ..evaluation.fidelity import pool
from ..models import LoadedModel, unique_parameters
from ..models.heads import class_indices, is_sequence_classifier
from ..record import StageRecord
from .config import FinetuneConfig

STATE = "trainer_state.pt"
#: Options a resumed run must share with the run it continues (the rest, budgets included, may change).
RESUME_KEYS = ("data", "text_column", "label_column", "train", "lr", "weight_decay", "warmup_steps", "batch_size",
               "max_length", "max_samples", "seed")
REPORT = "finetune_report.json"


def check_teacher(student: LoadedModel, teacher: LoadedModel) -> None:
    """The teacher must be the student's original: same architecture, shape and tokenizer."""
    s, t = student.geometry, teacher.geometry
    if student.config.model_type != teacher.config.model_type:
        raise ConfigError(f"the teacher is a {teacher.config.model_type} model, the student a {student.config.model_type}")
    if s.hidden_size != t.hidden_size or s.num_layers > t.num_layers:
        raise ConfigError(
            f"the teacher ({t.num_layers} layers, hidden {t.hidden_size}) does not match the student "
            f"({s.num_layers} layers, hidden {s.hidden_size})"
        )
    if student.tokenizer is None or teacher.tokenizer is None:
        raise ConfigError("both student and teacher need a tokenizer")
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ConfigError("the teacher's tokenizer differs from the student's (a pruned vocabulary?); fine-tune "
                          "before `compress prune --vocab-from`, or distil from the model the student was made from")


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from (hidden-state indices, 1-based).

    The same count pairs layer with layer; a student with fewer layers (after `prune
    --drop-layers`) maps its layers evenly onto the teacher's, last onto last (TinyBERT's
    uniform mapping).
    """
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


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
        is_lora = ".lora_A." in name or ".lora_B." in name
        train = mode == "all" or is_lora or (mode == "lora+norms" and id(p) in norm_params)
        p.requires_grad_(train)
        if train:
            chosen.append(p)
    if mode != "all" and not any(".lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError(f"--train {mode}: the student has no LoRA deltas (share it with --lora-rank R, or use --train all)")
    return chosen


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


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The texts of a step: a fresh seeded shuffle every epoch, so any step can be recomputed."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def distillation_loss(student_out, teacher_out, mask, config: FinetuneConfig, pooling: str, *, labels=None,
                      is_encoder: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the distillation terms, and each term's value."""
    real = mask.bool()
    parts: dict[str, torch.Tensor] = {}
    if config.hidden_weight:
        terms = []
        for i, j in layer_pairs(len(student_out.hidden_states) - 1, len(teacher_out.hidden_states) - 1):
            hs, ht = student_out.hidden_states[i][real].float(), teacher_out.hidden_states[j][real].float()
            terms.append(((hs - ht) ** 2).sum() / (ht**2).sum().clamp(min=1e-12))
        parts["hidden"] = torch.stack(terms).mean()
    if config.embedding_weight and is_encoder:
        es = pool(student_out.hidden_states[-1].float(), mask, pooling)
        et = pool(teacher_out.hidden_states[-1].float(), mask, pooling)
        parts["embedding"] = (1 - F.cosine_similarity(es, et, dim=-1)).mean()
    logits_s, logits_t = getattr(student_out, "logits", None), getattr(teacher_out, "logits", None)
    if config.kl_weight and logits_s is not None and logits_t is not None:
        if logits_s.dim() == 3:  # causal LM: per real token
            logits_s, logits_t = logits_s[real], logits_t[real]
        parts["kl"] = F.kl_div(F.log_softmax(logits_s.float(), -1), F.log_softmax(logits_t.float(), -1),
                               log_target=True, reduction="batchmean")
    if config.label_weight and labels is not None and logits_s is not None and getattr(student_out, "logits", None).dim() == 2:
        parts["label"] = F.cross_entropy(student_out.logits.float(), labels)
    weights = {"hidden": config.hidden_weight, "embedding": config.embedding_weight, "kl": config.kl_weight,
               "label": config.label_weight}
    if not parts:
        raise ConfigError("every loss term is switched off or does not apply to this model")
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


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
    from ..data.datasets import load_labelled, load_texts
    from ..io import check_writable
    from ..models import load_model
    from ..sharing.checkpoint import save_checkpoint

    start_time = time.perf_counter()
    output = Path(output)
    if resume:
        check_resumable(output)
    else:
        check_writable(output, overwrite=overwrite, folder=True)
    device = config.resolved_device()

    if teacher is None:
        source = config.teacher or _recorded_source(student)
        if source is None:
            raise ConfigError("name the original model with --teacher")
        teacher = load_model(source)
    check_teacher(student, teacher)

    is_classifier = is_sequence_classifier(student.model)
    texts = labels = label_ids = None
    if config.label_column is not None or (is_classifier and config.label_weight):
        try:
            texts, labels = load_labelled(config.data, text_column=config.text_column, label_column=config.label_column,
                                          encoding=config.encoding)
        except DataError:
            if config.label_column is not None:
                raise  # labels were asked for by name
            # otherwise a classifier distils from unlabelled text too (KL on its logits)
    if texts is None:
        texts = load_texts(config.data, text_column=config.text_column, encoding=config.encoding)
    if config.max_samples:
        texts = texts[: config.max_samples]
        labels = labels[: config.max_samples] if labels is not None else None
    if config.label_column is not None and not is_classifier:
        raise ConfigError("--label-column trains a classifier head, and the student has none; drop --label-column")
    if labels is not None and is_classifier:
        label_ids = class_indices(student.model, labels)
        if label_ids is None and config.label_column is not None:
            raise ConfigError(f"labels {sorted(set(labels))[:5]} do not match the classifier's classes "
                              f"{sorted(str(v) for v in student.model.config.id2label.values())}")
        # labels the head does not know (and were not asked for by name): distil with KL only
    if len(texts) < 1:
        raise ConfigError("the training data is empty")

    model, tmodel = student.model.to(device), teacher.model.to(device).eval()
    for p in tmodel.parameters():
        p.requires_grad_(False)
    trainable = select_trainable(student, config.train)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))

    step, history = 0, []
    if resume:
        state = torch.load(output / STATE, map_location="cpu", weights_only=False)
        changed = [k for k in RESUME_KEYS if state["config"].get(k) != getattr(config, k)]
        if changed:
            raise ConfigError(
                "--resume continues the same run; these options differ from it: "
                + ", ".join(f"--{k.replace('_', '-')} (was {state['config'].get(k)!r})" for k in changed)
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(config.seed)
    start_step = step

    def save(reason: str) -> None:
        record = _record(config, student, history, start_step, step, reason, device, start_time, trainable)

        def extras(staged: Path) -> None:
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(), "history": history, "config": config.to_dict()}, staged / STATE)
            import json

            (staged / REPORT).write_text(json.dumps(record.to_dict(), indent=2))

        save_checkpoint(student, output, overwrite=True, extra_files=extras)

    tokenizer = student.tokenizer
    # the pooled-embedding loss is for sentence encoders; a classifier is judged by its head (KL, labels)
    is_encoder = not student.adapter.is_decoder and not is_classifier
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _null()
    bar = _progress(config, start_step) if progress else None
    reason = "max_steps"
    loop_start = time.perf_counter()  # the time budget is training time, not loading time
    # Dropout stays off: the student is taught to compute what the teacher computes in eval
    # mode, and the run is deterministic on CPU.
    model.eval()
    try:
        with _StopFlag() as stop:
            while True:
                if config.max_steps is not None and step >= config.max_steps:
                    reason = "max_steps"
                    break
                if config.max_minutes is not None and time.perf_counter() - loop_start >= 60 * config.max_minutes:
                    reason = "max_minutes"
                    break
                if stop.requested:
                    reason = "interrupted"
                    break
                idx = _batch_indices(len(texts), config.batch_size, step, config.seed)
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=fit_length(tokenizer, config.max_length),
                                return_tensors="pt").to(device)
                batch_labels = label_ids[idx].to(device) if label_ids is not None else None
                with autocast:
                    with torch.no_grad():
                        t_out = tmodel(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
                    s_out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
                    loss, parts = distillation_loss(s_out, t_out, enc["attention_mask"], config, student.pooling,
                                                    labels=batch_labels, is_encoder=is_encoder)
                if not torch.isfinite(loss):
                    raise CompressError(f"the loss became {float(loss)} at step {step + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                history.append({"step": step, "loss": float(loss.detach()), **parts})
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{float(loss.detach()):.4f}"}
                    if config.max_minutes is not None:  # tqdm's own ETA only knows the step budget
                        left = max(0.0, 60 * config.max_minutes - (time.perf_counter() - loop_start))
                        postfix["time left"] = f"{int(left // 60)}:{int(left % 60):02d}"
                    bar.set_postfix(postfix)
                if config.save_every and step % config.save_every == 0:
                    save("checkpoint")
    finally:
        if bar is not None:
            bar.close()
    save(reason)
    record = _record(config, student, history, start_step, step, reason, device, start_time, trainable)
    return student, record


def _record(config, student, history, start_step, step, reason, device, start_time, trainable) -> StageRecord:
    params, nbytes = unique_parameters(student.model)
    done = history[start_step:]
    window = max(1, min(10, len(history) // 4 or 1))
    seconds = time.perf_counter() - start_time
    metrics = {
        "steps": step,
        "steps_this_run": step - start_step,
        "stopped_by": reason,
        "device": device,
        "trainable_params": sum(p.numel() for p in trainable),
        "loss_first": sum(h["loss"] for h in history[:window]) / window if history else None,
        "loss_last": sum(h["loss"] for h in history[-window:]) / window if history else None,
        "seconds_per_step": seconds / len(done) if done else None,
        "history": history,
    }
    return StageRecord("finetune", config.to_dict(), params, params, nbytes, nbytes, metrics, seconds)


def _recorded_source(student: LoadedModel) -> str | None:
    """The original dense model the student was made from, if it is not the student itself."""
    origin = student.origin
    if not origin or Path(origin) == Path(student.source):
        return None
    return origin


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(config: FinetuneConfig, start_step: int):
    from tqdm.auto import tqdm

    total = config.max_steps
    bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, desc="finetune")
    if config.max_minutes is not None and total is None:
        bar.set_description(f"finetune (<= {config.max_minutes:g} min)")
    return bar

