"""Options of the recovery fine-tuning stage (distillation from the original)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import StageConfig, TextOptions, check_block_size, check_choice, check_int, check_positive, choice
from ..errors import ConfigError
from ..data.suite import SUITE_TASKS, SuiteConfig

#: The options that choose the texts ``holdout`` ``suite`` leaves out.
SUITE_KEYS = ("suite_tasks", "suite_train_size", "suite_test_size")
#: What trains: the LoRA deltas; the deltas and every norm; or every parameter.
TRAIN_MODES = ("lora", "lora+norms", "all")
#: The learning rate after the warm-up: held, or decayed to 0 at ``max_steps`` (linearly, as
#: Hugging Face's Trainer does by default, or along a half cosine).
LR_SCHEDULES = ("constant", "linear", "cosine")
#: How the weights are held while training: every parameter in float32, or ``mixed``: the frozen
#: base and the teacher in bf16 (fp16 underflows the gradients without loss scaling), the trained
#: parameters in float32, the forward pass under bf16 autocast.
PRECISIONS = ("auto", "float32", "mixed")
#: Under torchrun: the student replicated (DDP) or sharded (FSDP2); ``auto`` shards from 1 B parameters.
STRATEGIES = ("auto", "ddp", "fsdp")
#: Under torchrun: the collective backend; ``auto`` is NCCL where there is CUDA, gloo on CPUs.
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class FinetuneConfig(TextOptions, StageConfig):
    """How to recover a compressed model's quality by distilling from the original.

    Attributes:
        teacher: The original model (folder, hub id or alias); default: the source
            recorded in the student's checkpoint.
        data: Training text: a file (txt, csv/tsv, jsonl), a packaged data set name
            (``movie-snippets``) or a Hugging Face dataset id; several, comma-separated, are
            interleaved.
        holdout: Texts never trained on, left out of ``data`` wherever they occur: ``suite``
            for the test splits the quality suite scores (``compress evaluate --suite`` with
            the same ``suite_tasks``, ``suite_train_size`` and ``suite_test_size``), or files or
            data sets (comma-separated) whose texts are left out.
        suite_tasks: With ``holdout`` ``suite``: the suite's tasks.
        suite_train_size: With ``holdout`` ``suite``: the suite's probe training examples per task.
        suite_test_size: With ``holdout`` ``suite``: the suite's test examples per task.
        label_column: Column or key of the labels (adds cross-entropy for classifiers).
        train: What trains: ``lora``, ``lora+norms`` or ``all``.
        max_steps: Stop after this many optimizer steps (default 200 when no ``max_minutes``).
        max_minutes: Stop after this much training time (whichever limit comes first).
        lr: AdamW learning rate (the peak, after ``warmup_steps``).
        lr_schedule: After the warm-up: ``constant``, or ``linear`` / ``cosine`` decay to 0 at
            ``max_steps`` (which it needs). A decayed run ends on weights the last, smallest
            steps settled rather than wherever a full-size step left them.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up of the learning rate.
        batch_size: Texts per step.
        max_length: Tokens per text.
        max_samples: Use at most this many training texts.
        group_by_length: Batch texts of about one length together (each epoch's shuffle sorted
            by length within runs of 50 batches, the batches then shuffled; Hugging Face
            Trainer's option of the name): the same texts each epoch, less padding, which costs
            as much compute as text (on texts of mixed lengths a step takes about half as long).
            Each loss term is still a mean over its own batch, so a text in a batch of short
            texts weighs as much as one in a batch of long ones, and ``similarity_weight``
            compares texts of about one length.
        hidden_weight: Weight of the per-layer hidden-state loss.
        embedding_weight: Weight of the pooled-embedding cosine loss (encoders).
        similarity_weight: Weight of the in-batch neighbour loss (encoders): the KL divergence
            between each text's softmax over its cosine similarities to the batch's other texts
            (temperature 0.05) under the teacher's and under the student's pooled embeddings
            (relational distillation, Park et al., 2019): what nearest-neighbour search reads.
        kl_weight: Weight of the KL loss on logits (classifiers and causal LMs).
        label_weight: Weight of the cross-entropy on labels (classifiers with labels).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: Seed for data order, dropout and LoRA init; the same seed gives the same result on CPU.
        quantize_aware: Train for an int4 export (``compress export --quantize int4``): every
            step computes on the projections rounded to int4 blocks of ``block_size`` and updates
            the float weights behind them (straight-through estimator); the checkpoint holds the
            rounded weights, which the export stores as they are.
        int8_aware: Train for an int8 export (``compress export --quantize int8 --per-channel``):
            every step computes each projection on its weight rounded to int8 with a scale per
            output channel and on its input rounded as dynamic int8 rounds it at run time
            (uint8, one scale for the whole tensor), updating the float weights behind them;
            the checkpoint keeps the float projections, which the
            export rounds as training did. The output head stays float in training (an int8
            export rounds a decoder's head too). Try it when an int8 export loses more than
            the float checkpoint does; compare with as many float steps (docs/finetune.md).
        embedding_bits: Train for an export's ``--embedding-bits`` tables (4 or 8): every step
            computes on the embedding tables rounded to the export's symmetric blocks of
            ``block_size`` (a scale per block) and updates the float tables behind them; the
            checkpoint holds the rounded tables, which the export's blocks reproduce.
        block_size: With ``quantize_aware`` or ``embedding_bits``: weights per block, along each
            projection's input dimension and each table's rows (the export's ``--block-size``;
            a power of two, at least 16).
        save_every: Write a resumable checkpoint every this many steps (0: only at the end).
        precision: ``float32``: every weight in float32 (a bf16 checkpoint trains at twice its
            size, the teacher too); ``mixed``: only the deltas (``--train lora`` or
            ``lora+norms``) train, in float32, on a frozen base held in bf16, with a bf16
            teacher, so a 1-8 B pair fits a workstation (an fp16 or float32 base is rounded to
            bf16, whose range keeps the small gradients that fp16's flushes to zero; the
            checkpoint is bf16); ``auto``: ``mixed`` for a student stored in bf16/fp16 that
            trains its deltas, ``float32`` otherwise.
        strategy: Under ``torchrun`` (several processes): ``ddp`` replicates the student on every
            rank, ``fsdp`` shards its parameters, gradients and AdamW state with FSDP2
            (``fully_shard``; the teacher too), ``auto`` shards from 1 B parameters. One
            process ignores it.
        backend: Under ``torchrun``: ``gloo`` (CPUs), ``nccl`` (CUDA GPUs) or ``auto`` (NCCL
            where there is CUDA).
        processes: Run on this many processes of this machine (``torchrun --standalone``
            started for you: gloo on CPUs, NCCL on its GPUs); in a recipe or batch job the
            default is the job's ``num_gpus`` when it asks for more than one, else one process.
            Several machines: start ``compress finetune`` under ``torchrun`` yourself.
        gradient_checkpointing: Keep only each block's input in the forward pass and recompute
            the block in the backward pass: less memory for activations (long texts, big
            batches), about a third more time; the same numbers.
    """

    teacher: str | None = None
    data: str = "movie-snippets"
    holdout: str | None = None
    suite_tasks: list[str] = field(default_factory=lambda: list(SUITE_TASKS))
    suite_train_size: int = 2000
    suite_test_size: int = 1000
    label_column: str | None = None
    train: str = choice("lora+norms", TRAIN_MODES)
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float = 1e-3
    lr_schedule: str = choice("constant", LR_SCHEDULES)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 32
    max_length: int = 64
    max_samples: int | None = None
    group_by_length: bool = False
    hidden_weight: float = 1.0
    embedding_weight: float = 1.0
    similarity_weight: float = 0.0
    kl_weight: float = 1.0
    label_weight: float = 1.0
    device: str = "auto"
    seed: int = 0
    quantize_aware: bool = False
    int8_aware: bool = False
    embedding_bits: int | None = choice(None, (4, 8))
    block_size: int = 32
    save_every: int = 50
    precision: str = choice("auto", PRECISIONS)
    gradient_checkpointing: bool = False
    strategy: str = choice("auto", STRATEGIES)
    backend: str = choice("auto", BACKENDS)
    processes: int | None = None

    def __post_init__(self):
        check_choice("train", self.train, TRAIN_MODES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.max_steps is None and self.max_minutes is None:
            self.max_steps = 200
        if self.lr_schedule != "constant" and self.max_steps is None:
            raise ConfigError(f"--lr-schedule {self.lr_schedule} decays to 0 at --max-steps; give --max-steps",
                              option="lr_schedule")
        check_int("max_steps", self.max_steps, 1, allow_none=True)
        check_positive("max_minutes", self.max_minutes, allow_none=True)
        for name in ("lr", "batch_size", "max_length"):
            check_positive(name, getattr(self, name))
        check_positive("max_samples", self.max_samples, allow_none=True)
        for name in ("weight_decay", "warmup_steps", "save_every", "hidden_weight", "embedding_weight", "similarity_weight",
                     "kl_weight", "label_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more", option=name)
        for name in ("quantize_aware", "int8_aware", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", option=name)
        if self.quantize_aware and self.int8_aware:
            raise ConfigError("--quantize-aware trains for int4 blocks and --int8-aware for int8: choose one",
                              option="int8_aware")
        check_block_size(self.block_size)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("backend", self.backend, BACKENDS)
        check_int("processes", self.processes, 1, allow_none=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}",
                              option="gradient_checkpointing")
        if self.precision == "mixed":
            if self.train == "all":
                raise ConfigError("--precision mixed trains the deltas on a frozen 16-bit base, and --train all "
                                  "trains the base too; use --train lora or lora+norms, or --precision float32",
                                  option="precision")
            aware = next((n for n in ("quantize_aware", "int8_aware", "embedding_bits") if getattr(self, n)), None)
            if aware:
                raise ConfigError(f"--{aware.replace('_', '-')} trains the float32 weights behind rounded ones; "
                                  "use --precision float32", option="precision")
        if self.embedding_bits is not None:
            check_choice("embedding_bits", self.embedding_bits, (4, 8))
        if self.block_size != 32 and not (self.quantize_aware or self.embedding_bits):
            raise ConfigError("--block-size is the blocks --quantize-aware or --embedding-bits trains for; add one "
                              "or drop it", option="block_size")
        if self.label_column is not None and "," in self.data:
            raise ConfigError("--label-column reads the labels of one data set, and --data names several",
                              option="label_column")
        if self.holdout is not None:
            self.holdout = self.holdout.strip()
            specs = [spec.strip() for spec in self.holdout.split(",") if spec.strip()]
            if not specs:
                raise ConfigError("--holdout names nothing; give 'suite' or a data set", option="holdout")
            if self.holdout.lower() == "suite":
                self.holdout = "suite"
            elif "suite" in (spec.lower() for spec in specs):
                raise ConfigError("--holdout suite stands alone; leave out other texts with a file of them",
                                  option="holdout")
        if isinstance(self.suite_tasks, str):
            self.suite_tasks = [t.strip() for t in self.suite_tasks.split(",") if t.strip()]
        if self.holdout == "suite":
            self.suite_tasks = self.holdout_suite().suite_tasks  # checks the suite's options
        else:
            for f in dataclasses.fields(self):
                if f.name in SUITE_KEYS:
                    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    if getattr(self, f.name) != default:
                        raise ConfigError(f"--{f.name.replace('_', '-')} chooses the texts --holdout suite leaves "
                                          "out; add --holdout suite or drop it", option=f.name)
        if self.device != "auto":
            from ..config import check_device

            check_device(self.device)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def holdout_suite(self) -> SuiteConfig:
        """The quality suite whose test splits ``holdout`` ``suite`` leaves out (seed 0, as the suite's)."""
        return SuiteConfig(suite_tasks=list(self.suite_tasks), suite_train_size=self.suite_train_size,
                           suite_test_size=self.suite_test_size)
