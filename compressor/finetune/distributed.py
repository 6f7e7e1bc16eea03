"""`compress finetune` on several processes: data-parallel, the student replicated (DDP) or
sharded (FSDP2's ``fully_shard``), launched by ``torchrun``.

``torchrun --nproc-per-node N -m cli.main finetune ...`` (or ``accelerate launch``, which starts
the same processes with the same environment) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous; `World.from_env` reads them, and a process started without them is a world of
one that runs exactly as before.

What makes N processes take the steps one process takes:

* every rank tokenizes the whole global batch (``--batch-size`` texts, one padded width) and
  keeps its own contiguous ``batch_size / N`` rows;
* every loss term is a sum over the rank's rows divided by the global count (tokens, texts,
  the teacher's squared norm), so the ranks' losses add up to the one-process loss; each rank
  back-propagates ``N x`` its share, which the gradient averaging of DDP and FSDP2 turns into
  the sum;
* the loss recorded is the sum of the ranks' shares (`World.total`).

Sharing survives sharding: `wrap_student` gives each sharing group's blocks to one
``fully_shard`` call (a shared base is one parameter in one group), each unshared block its own,
and the rest (embeddings, a tied head, the final norm) to the root.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConfigError

#: From this many student parameters, `FinetuneConfig.strategy` ``auto`` shards: below, a replica and its AdamW state fit
#: a device comfortably and DDP's single all-reduce is the faster path.
SHARD_FROM = 1_000_000_000


@dataclass
class World:
    """The processes of one fine-tuning run (one, without a launcher).

    Attributes:
        rank: This process's index (0 writes the output folder).
        size: How many processes train together.
        local_rank: Its index on its node (its GPU).
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA); ``None`` for a world of one.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False  # the process group was started here (and is ended here)

    @classmethod
    def from_env(cls, backend: str = "auto", device: str = "auto") -> World:
        """The world ``torchrun`` (or ``accelerate launch``) describes in the environment, with
        its process group started; a world of one without a launcher.

        Raises:
            ConfigError: NCCL asked for where there is no CUDA, or a launcher's environment
                that is incomplete.
        """
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        try:
            rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise ConfigError("WORLD_SIZE is set but RANK is not: launch with torchrun --nproc-per-node N") from None
        cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("--backend nccl needs CUDA devices, and this machine has none; use --backend gloo "
                              "(or auto) on CPUs", option="backend")
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend)
        return cls(rank, size, local_rank, backend, owned)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: str) -> str:
        """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) under NCCL."""
        if self.backend == "nccl" and device in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the ranks (itself in a world of one); never differentiated."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def why_not_split(config, size: int) -> str | None:
    """Why ``size`` processes cannot take the steps one process takes with ``config`` (one
    line), or ``None`` when they can. Needs no process group: a launch is refused before it starts."""
    if size <= 1:
        return None
    if config.batch_size % size:
        return (f"--batch-size {config.batch_size} is the global batch, split over {size} processes; give a multiple "
                f"of {size}")
    if config.similarity_weight:
        return "--similarity-weight compares every text of the batch with the others, which one process holds"
    for name in ("quantize_aware", "int8_aware", "embedding_bits"):
        if getattr(config, name):
            return f"--{name.replace('_', '-')} trains in one process"
    return None


def check_world(world: World, config) -> None:
    """Refuse what the ranks cannot split the same way one process computes it (`why_not_split`).

    Raises:
        ConfigError: a global batch the world size does not divide, or a loss term or option
            that needs the whole batch in one process.
    """
    why = why_not_split(config, world.size)
    if why is not None:
        raise ConfigError(f"{why}; run it in one process", option="batch_size" if "--batch-size" in why else None)


def check_rows(world: World, texts: int, batch_size: int) -> None:
    """Every rank needs rows: a data set smaller than the global batch leaves late ranks none.

    Raises:
        ConfigError: fewer texts than ``batch_size`` under several processes.
    """
    if world.distributed and texts < batch_size:
        raise ConfigError(f"the training data has {texts} texts, fewer than --batch-size {batch_size} split over "
                          f"{world.size} processes; give more texts or a smaller batch", option="batch_size")


def resolve_strategy(config, student_numel: int, world: World) -> str | None:
    """``ddp`` or ``fsdp`` under a launcher (`STRATEGIES`), ``None`` in one process."""
    if not world.distributed:
        return None
    if config.strategy != "auto":
        return config.strategy
    return "fsdp" if student_numel >= SHARD_FROM else "ddp"


def wrap_student(loaded, strategy: str, device: str):
    """The student ready for ``strategy``; returns what to call for its forward pass.

    ``ddp``: a ``DistributedDataParallel`` replica. ``fsdp``: ``fully_shard`` in place, a
    sharing group's blocks as one unit (their shared bases stay one parameter), every other
    block as its own, the root last.
    """
    model = loaded.model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        # a module the loss never reaches (an encoder's pooler) must not hang the all-reduce
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    _shard(model, loaded.adapter.blocks(model), _units(loaded))
    return model


def wrap_teacher(teacher, strategy: str):
    """The teacher for ``strategy``: a replica under DDP, sharded block by block under FSDP2
    (it takes no step, so there is no optimizer state to shard)."""
    if strategy == "fsdp":
        blocks = teacher.adapter.blocks(teacher.model)
        _shard(teacher.model, blocks, [[i] for i in range(len(blocks))])
    return teacher.model


def _units(loaded) -> list[list[int]]:
    """The blocks ``fully_shard`` takes together: those that hold a parameter in common (a
    sharing group's shared base, whatever the manifest says), and every other block alone."""
    blocks = loaded.adapter.blocks(loaded.model)
    owner: dict[int, int] = {}  # parameter -> the first block holding it
    parent = list(range(len(blocks)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, block in enumerate(blocks):
        for p in block.parameters():
            j = owner.setdefault(id(p), i)
            parent[root(i)] = root(j)
    units: dict[int, list[int]] = {}
    for i in range(len(blocks)):
        units.setdefault(root(i), []).append(i)
    return list(units.values())


def _shard(model, blocks, units: list[list[int]]) -> None:
    """``fully_shard`` each unit, then the root; the root reshards after its forward too (FSDP2
    leaves a root whole for its backward, which a teacher's no-grad forward never has)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"--strategy fsdp needs FSDP2 (torch 2.6 or newer; this is {torch.__version__}); "
                          "use --strategy ddp", option="strategy") from None

    for unit in units:
        fully_shard([blocks[i] for i in unit] if len(unit) > 1 else blocks[unit[0]])
    fully_shard(model, reshard_after_forward=True)


@contextmanager
def full_parameters(model, world: World):
    """Every sharded parameter whole, on every rank, for the duration (a checkpoint written
    from the student, its aliases intact: a tied head and a shared base are each one tensor).
    Nothing changes in a world of one or under DDP."""
    if not world.distributed:
        yield
        return
    holders = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if _sharded(p)]
    if not holders:
        yield
        return
    full: dict[int, torch.nn.Parameter] = {}
    for _, _, p in holders:
        if id(p) not in full:
            full[id(p)] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
    try:
        for m, n, p in holders:
            m._parameters[n] = full[id(p)]
        yield
    finally:
        for m, n, p in holders:
            m._parameters[n] = p


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (gathered from the ranks when it is sharded), on the CPU."""
    if _sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def _sharded(tensor) -> bool:
    """A DTensor (FSDP2's shard); tested by its method, so one process needs no torch.distributed.tensor."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def set_full_value(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole value into a parameter, into this rank's shard when it is sharded."""
    with torch.no_grad():
        if _sharded(parameter):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                      parameter.placements)
        parameter.copy_(value)
