"""The architecture adapter: the one place that knows how a model family is laid out.

Every stage reads and writes a Transformer block through an adapter, never through
family-specific attribute paths. An adapter names, for one family:

* where the blocks live (relative to ``model.base_model``, so task heads do not matter);
* the linear sublayers of a block by *role*: ``query``, ``key``, ``value``, ``attn_out``,
  ``ffn_gate`` (gated FFNs only), ``ffn_in`` and ``ffn_out``;
* how heads are laid out (heads, key/value heads, head size);
* which config keys hold the geometry (compare optimum's ``NormalizedTextConfig``);
* the norms of a block.

Weights cross this boundary in one orientation, ``(out_features, in_features)`` as in
``nn.Linear``, whatever the module stores (GPT-2's ``Conv1D`` stores ``(in, out)`` and fuses
Q, K and V into one matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that `compress --help` stays instant
    import torch
    from torch import nn

#: Roles of the linear sublayers, in block order.
ROLES = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out")
#: Roles whose output rows are grouped by attention head (query) or key/value head.
HEAD_ROW_ROLES = ("query", "key", "value")
#: Roles whose output rows are FFN neurons.
NEURON_ROW_ROLES = ("ffn_gate", "ffn_in")


@dataclass(frozen=True)
class LinearSpec:
    """Where one linear sublayer lives inside a block.

    Attributes:
        path: Dotted module path inside the block, e.g. ``"attention.self.query"``.
        fused_index: For a fused QKV module, which third of the outputs this role is
            (0 = query, 1 = key, 2 = value); ``None`` for an ordinary module.

    Whether the weight is stored transposed (GPT-2's ``Conv1D``) is read from the module
    itself, since sharing replaces such modules with ``nn.Linear``-oriented ones.
    """

    path: str
    fused_index: int | None = None


@dataclass(frozen=True)
class Geometry:
    """The shape of a model, read from its config through the adapter."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_kv(self) -> int:
        """Query heads that share one key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How one model family lays out its Transformer blocks.

    Attributes:
        family: Short name shown to users (``"bert"``, ``"llama"``...).
        model_types: The ``config.model_type`` values this adapter serves.
        blocks_path: Dotted path from ``model.base_model`` to the ``nn.ModuleList`` of blocks.
        linears: Role -> where that linear lives in a block.
        norms: Dotted paths of the block's norms, in block order.
        config_keys: Geometry field -> config attribute that holds it, for the fields whose name
            differs by family (``intermediate_size``, ``num_kv_heads``).
        is_decoder: Causal (decoder-only) model.
        gated_ffn: The FFN has a gate projection (SwiGLU).
        head_attrs: Attributes the attention modules keep about their own head count, as
            ``(module path in the block, attribute, kind)`` with kind ``heads`` (the count),
            ``width`` (heads x head size) or ``pruned`` (the set of pruned original heads).
            Pruning heads updates them the way the family's own ``prune_heads`` does.
        pruned_heads_in_config: Head pruning is recorded in ``config.pruned_heads`` (the
            families whose head size is ``hidden / num_heads``, which transformers re-prunes on
            load); otherwise (Llama) ``num_attention_heads``, ``num_key_value_heads`` and an
            explicit ``head_dim`` change.
        conv1d: Dense linears are GPT-2 style ``Conv1D`` modules (weight stored ``(in, out)``).
    """

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: dict[str, LinearSpec]
    norms: tuple[str, ...]
    config_keys: dict[str, str]
    is_decoder: bool = False
    gated_ffn: bool = False
    head_attrs: tuple[tuple[str, str, str], ...] = ()
    pruned_heads_in_config: bool = False
    conv1d: bool = False

    # --- geometry -------------------------------------------------------------------------
    def geometry(self, config) -> Geometry:
        """Read the model's geometry from its config."""
        # hidden_size, num_attention_heads and num_hidden_layers are standard names in every
        # transformers config (its attribute_map translates GPT-2's n_embd and friends); only
        # the FFN width and key/value heads differ by family.
        keys = self.config_keys
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_key = keys.get("num_kv_heads")
        kv_heads = (getattr(config, kv_key, None) if kv_key else None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        pruned = getattr(config, "pruned_heads", None) or {}
        if pruned:
            # Head pruning keeps the head size; `compress prune` prunes as many heads in every
            # layer, so any layer's count is the model's.
            removed = {len(v) for v in pruned.values()}
            heads -= removed.pop() if len(removed) == 1 and len(pruned) == config.num_hidden_layers else 0
            kv_heads = heads
        inter = getattr(config, keys["intermediate_size"], None) or 4 * hidden  # GPT-2: n_inner=None
        return Geometry(
            num_layers=config.num_hidden_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
        )

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this family has, in block order."""
        return tuple(r for r in ROLES if r in self.linears)

    # --- navigation -----------------------------------------------------------------------
    def base(self, model: nn.Module) -> nn.Module:
        """The bare Transformer without a task head."""
        return getattr(model, "base_model", model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's Transformer blocks, in order."""
        return _get(self.base(model), self.blocks_path)

    def linear(self, block: nn.Module, role: str) -> nn.Module:
        """The module that holds ``role`` (for a fused QKV module, the fused module)."""
        return _get(block, self.linears[role].path)

    def module_roles(self, roles: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
        """Module path -> the roles it holds, in output order (GPT-2's ``c_attn`` holds Q, K, V).

        Args:
            roles: Only modules holding one of these roles (default: all).
        """
        out: dict[str, list[str]] = {}
        for role in self.roles:
            if roles is None or role in roles:
                out.setdefault(self.linears[role].path, []).append(role)
        return {path: tuple(sorted(rs, key=lambda r: self.linears[r].fused_index or 0)) for path, rs in out.items()}

    # --- weights --------------------------------------------------------------------------
    def weight(self, block: nn.Module, role: str) -> torch.Tensor:
        """The weight of ``role`` as ``(out_features, in_features)``, detached (a view where possible)."""
        spec = self.linears[role]
        module = self.linear(block, role)
        w = module.weight.detach()
        if is_conv1d(module):
            w = w.t()
        if spec.fused_index is not None:
            w = w.chunk(3, dim=0)[spec.fused_index]
        return w

    def bias(self, block: nn.Module, role: str) -> torch.Tensor | None:
        """The bias of ``role`` (``(out_features,)``), or ``None`` if it has none."""
        spec = self.linears[role]
        b = getattr(self.linear(block, role), "bias", None)
        if b is None:
            return None
        b = b.detach()
        if spec.fused_index is not None:
            b = b.chunk(3, dim=0)[spec.fused_index]
        return b

    def block_weights(self, block: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """All linear weights ``(out, in)`` and biases of a block, keyed by role (copies)."""
        weights = {r: self.weight(block, r).clone() for r in self.roles}
        biases = {r: (None if (b := self.bias(block, r)) is None else b.clone()) for r in self.roles}
        return weights, biases

    def load_block_weights(
        self,
        block: nn.Module,
        weights: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor | None] | None = None,
    ) -> None:
        """Write ``(out, in)`` weights (and biases) back into a block's modules, in place."""
        import torch

        with torch.no_grad():
            for role, w in weights.items():
                self.weight(block, role).copy_(w)  # a view into the parameter
                b = None if biases is None else biases.get(role)
                if b is not None:
                    self.bias(block, role).copy_(b)


def is_conv1d(module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``(in, out)``."""
    return type(module).__name__ == "Conv1D"


def _get(root, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
