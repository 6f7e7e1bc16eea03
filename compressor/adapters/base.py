"""The architecture adapter: the one place that knows how a model family is laid out.

Every stage reads and writes a Transformer block through an adapter, never through
family-specific attribute paths. An adapter describes, as data, for one family:

* where the blocks live (relative to ``model.base_model``, so task heads do not matter);
* the linear sublayers of a block by *role*: ``query``, ``key``, ``value``, ``attn_out``,
  ``ffn_gate`` (gated FFNs only), ``ffn_in`` and ``ffn_out``;
* fused modules as explicit row maps (`FusedLayout`): which output rows of GPT-2's ``c_attn``,
  Phi-3's ``qkv_proj`` (unequal query and key/value widths), GPT-NeoX's per-head interleaved
  ``query_key_value`` or ModernBERT's GLU ``Wi`` belong to which role;
* state outside the blocks that constrains surgery (MPNet's per-head relative attention bias,
  shared by every layer), norms inside the heads (Qwen3's ``q_norm``), and what a family
  cannot do (`ArchitectureAdapter.refusals`);
* which config keys hold the geometry (compare optimum's ``NormalizedTextConfig``), and how
  surgery writes them back.

Weights cross this boundary in one orientation, ``(out_features, in_features)`` as in
``nn.Linear``, whatever the module stores (GPT-2's ``Conv1D`` stores ``(in, out)``):
`module_weight`, `set_module_weight` and `dense_like` are the only code that knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError

if TYPE_CHECKING:  # torch is imported lazily so that `compress --help` stays instant
    import torch
    from torch import nn

#: Roles of the linear sublayers, in block order.
ROLES = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out")
ATTENTION_ROLES = ("query", "key", "value", "attn_out")
FFN_ROLES = ("ffn_gate", "ffn_in", "ffn_out")
#: Roles whose output rows are grouped by attention head (query) or key/value head.
HEAD_ROW_ROLES = ("query", "key", "value")
#: Roles whose output rows are FFN neurons.
NEURON_ROW_ROLES = ("ffn_gate", "ffn_in")

#: What a stage may ask of an adapter, and the words for it in a refusal.
CAPABILITIES = {
    "permute_heads": "permute attention heads",
    "permute_neurons": "permute FFN neurons",
    "prune_heads": "prune attention heads",
    "prune_ffn": "prune FFN neurons",
    "drop_layers": "drop layers",
}


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

    def width(self, role: str) -> int:
        """Output rows of ``role``'s weight."""
        if role == "query":
            return self.num_heads * self.head_dim
        if role in ("key", "value"):
            return self.num_kv_heads * self.head_dim
        if role in NEURON_ROW_ROLES:
            return self.intermediate_size
        return self.hidden_size


@dataclass(frozen=True)
class FusedLayout:
    """How the output rows of one fused module hold several roles.

    Attributes:
        roles: The roles the module holds, in output order.
        per_head: Rows are grouped by head: for every head, ``head_dim`` rows of each role in
            turn (GPT-NeoX's ``query_key_value``: q0 k0 v0 q1 k1 v1 ...). Otherwise the roles
            are stacked one after another with their own widths (GPT-2's ``c_attn`` thirds,
            Phi-3's ``qkv_proj`` under grouped-query attention, ``gate_up_proj``, ModernBERT's
            ``Wqkv`` and ``Wi``).
    """

    roles: tuple[str, ...]
    per_head: bool = False

    def rows(self, geometry: Geometry) -> dict[str, torch.Tensor]:
        """Role -> the module's output rows that hold it (ascending)."""
        import torch

        if self.per_head:
            if geometry.num_kv_heads != geometry.num_heads or not set(self.roles) <= set(HEAD_ROW_ROLES):
                raise UnsupportedModelError("a per-head interleaved projection needs as many key/value heads as heads")
            d = geometry.head_dim
            idx = torch.arange(geometry.num_heads * len(self.roles) * d).view(geometry.num_heads, len(self.roles), d)
            return {role: idx[:, i, :].reshape(-1) for i, role in enumerate(self.roles)}
        out, start = {}, 0
        for role in self.roles:
            width = geometry.width(role)
            out[role] = torch.arange(start, start + width)
            start += width
        return out

    @property
    def kind(self) -> str:
        """``per head`` or ``stacked``, as users read it."""
        return "per head" if self.per_head else "stacked"

    def total(self, geometry: Geometry) -> int:
        """Output rows of the whole fused module."""
        return sum(geometry.width(r) for r in self.roles)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How one model family lays out its Transformer blocks.

    Attributes:
        family: Short name shown to users (``"bert"``, ``"llama"``...).
        model_types: The ``config.model_type`` values this adapter serves.
        blocks_path: Dotted path from ``model.base_model`` to the ``nn.ModuleList`` of blocks.
        linears: Role -> dotted module path inside a block; the roles of a fused module are
            added from ``fused``.
        fused: Module path -> how its rows hold its roles.
        norms: Dotted paths of the block's norms, in block order (a path may be missing in some
            blocks, as ModernBERT's first block has no attention norm).
        head_norms: Norms inside the attention over ``head_dim``, applied alike to every head
            (Qwen3's and Gemma 3's ``q_norm`` / ``k_norm``): heads permute and prune freely
            through them; they stay per layer when the projections are shared.
        outer_norms: Norms outside the blocks, relative to ``model.base_model`` (embedding and
            final norms), for fine-tuning modes that train norms.
        head_state: Parameters outside the blocks with one entry per head that every layer
            reads (MPNet's relative attention bias), relative to ``model.base_model``: permuting
            one layer's heads would not preserve the function, so heads are not permuted.
        config_keys: Geometry field -> config attribute that holds it, for fields whose name
            differs by family (``intermediate_size``, ``num_kv_heads``, ``head_dim``).
        is_decoder: Causal (decoder-only) model.
        head_attrs: Attributes the attention modules keep about their own head count, as
            ``(module path in the block, attribute, kind)`` with kind ``heads`` (the count),
            ``kv_heads`` (key/value heads), ``width`` (heads x head size) or ``pruned`` (the set
            of pruned original heads). Pruning heads updates them.
        pruned_heads_in_config: Head pruning is recorded in ``config.pruned_heads`` (the
            families whose head size is ``hidden / num_heads``, which transformers re-prunes on
            load); otherwise the head counts and an explicit head size change in the config.
        refusals: Capability (see `CAPABILITIES`) -> why this family cannot do it.
        reserved_positions: Position ids the embeddings reserve before the first token
            (RoBERTa counts positions from ``padding_idx + 1``): usable length is
            ``max_position_embeddings`` minus this.
        positions_after_padding: Positions count from ``config.pad_token_id + 1`` (RoBERTa),
            which adds ``pad_token_id + 1`` reserved positions.
        conv1d: Dense linears are GPT-2 style ``Conv1D`` modules (rebuilt as such by surgery).
        fixed_kv_heads: Key/value heads the config does not count (Falcon's ``multi_query``
            flag means one, whatever ``num_kv_heads`` says); read from the shapes by inference.
        inferred: Built by `compressor.adapters.infer` rather than declared.
    """

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: dict[str, str]
    norms: tuple[str, ...]
    config_keys: dict[str, str]
    fused: dict[str, FusedLayout] = field(default_factory=dict)
    head_norms: tuple[str, ...] = ()
    outer_norms: tuple[str, ...] = ()
    head_state: tuple[str, ...] = ()
    is_decoder: bool = False
    head_attrs: tuple[tuple[str, str, str], ...] = ()
    pruned_heads_in_config: bool = False
    refusals: dict[str, str] = field(default_factory=dict)
    reserved_positions: int = 0
    positions_after_padding: bool = False
    conv1d: bool = False
    fixed_kv_heads: int | None = None
    inferred: bool = False

    def __post_init__(self):
        # a fused module's roles are named once, in its layout; linears gets them from there
        linears = dict(self.linears)
        for path, layout in self.fused.items():
            for role in layout.roles:
                if linears.setdefault(role, path) != path:
                    raise ValueError(f"{self.family}: fused module {path} holds {role}, which linears puts elsewhere")
        object.__setattr__(self, "linears", linears)
        if self.head_state and "permute_heads" not in self.refusals:
            paths = ", ".join(self.head_state)
            refusals = {**self.refusals, "permute_heads": f"every layer reads the per-head parameter {paths} outside the blocks"}
            object.__setattr__(self, "refusals", refusals)

    # --- as data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The adapter as JSON-ready data (a checkpoint of an inferred family records it: a
        pruned model's widths may no longer tell its projections apart)."""
        import dataclasses

        d = dataclasses.asdict(self)
        d["fused"] = {p: {"roles": list(f.roles), "per_head": f.per_head} for p, f in self.fused.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ArchitectureAdapter:
        """The adapter `to_dict` wrote."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["fused"] = {p: FusedLayout(tuple(f["roles"]), bool(f["per_head"])) for p, f in d.get("fused", {}).items()}
        for key in ("model_types", "norms", "head_norms", "outer_norms", "head_state"):
            kwargs[key] = tuple(kwargs.get(key, ()))
        kwargs["head_attrs"] = tuple(tuple(a) for a in kwargs.get("head_attrs", ()))
        return cls(**kwargs)

    # --- geometry -------------------------------------------------------------------------
    def geometry(self, config) -> Geometry:
        """Read the model's geometry from its config."""
        # hidden_size, num_attention_heads and num_hidden_layers are standard names in every
        # transformers config (its attribute_map translates GPT-2's n_embd and friends); the
        # FFN width, key/value heads and an explicit head size differ by family.
        keys = self.config_keys
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_key = keys.get("num_kv_heads")
        kv_heads = self.fixed_kv_heads or (getattr(config, kv_key, None) if kv_key else None) or heads
        head_dim = getattr(config, keys.get("head_dim", "head_dim"), None) or hidden // heads
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

    def write_heads(self, config, heads: int, kv_heads: int, head_dim: int) -> None:
        """Record a new head count in a config that holds it directly (not ``pruned_heads``)."""
        config.num_attention_heads = heads
        if "num_kv_heads" in self.config_keys:
            setattr(config, self.config_keys["num_kv_heads"], kv_heads)
        setattr(config, self.config_keys.get("head_dim", "head_dim"), head_dim)

    @property
    def prunes_head_state(self) -> bool:
        """Heads read by state outside the blocks can still be pruned: the same heads in every
        layer, the state sliced once (`slice_head_state`), the cut recorded in
        ``config.pruned_heads`` so that a model rebuilt from its config is sliced again
        (`fit_head_state`)."""
        # declared only: an inferred adapter's head state is a guess by shape (a token-type
        # table as wide as the head count would be sliced by head), good enough to keep heads
        # in place, not to cut it
        return bool(self.head_state) and self.pruned_heads_in_config and not self.inferred

    def slice_head_state(self, model: nn.Module, heads: list[int], count: int) -> None:
        """Keep the entries ``heads`` (of ``count``) on the head axis of every `head_state`
        parameter: the last axis of length ``count`` (MPNet's bias is ``(buckets, heads)``).
        A parameter with no such axis is left as it is (already sliced)."""
        import torch
        from torch import nn

        base = self.base(model)
        index = torch.tensor(sorted(heads), dtype=torch.long)
        for path in self.head_state:
            owner_path, _, attr = path.rpartition(".")
            owner = base.get_submodule(owner_path) if owner_path else base
            param = getattr(owner, attr)
            axes = [a for a in range(param.dim()) if param.shape[a] == count]
            if not axes:
                continue
            with torch.no_grad():
                kept = param.index_select(axes[-1], index.to(param.device)).clone()
            setattr(owner, attr, nn.Parameter(kept, requires_grad=param.requires_grad))
            if isinstance(owner, nn.Embedding):
                owner.embedding_dim = kept.shape[1]

    def fit_head_state(self, model: nn.Module) -> None:
        """Slice the head state of a model just built from a config whose ``pruned_heads``
        remove the same heads from every layer: transformers re-prunes the layers on build but
        not the state outside them (MPNet's encoder builds its bias with every head)."""
        config = model.config
        pruned = getattr(config, "pruned_heads", None) or {}
        if not (self.prunes_head_state and pruned):
            return
        removed = {tuple(sorted(v)) for v in pruned.values()}
        if len(removed) != 1 or len(pruned) != config.num_hidden_layers:
            return  # not a cut `compress prune` makes; transformers' own forward will say so
        total = config.num_attention_heads
        gone = set(removed.pop())
        self.slice_head_state(model, [h for h in range(total) if h not in gone], total)

    def write_intermediate(self, config, width: int) -> None:
        """Record a new FFN width in the config."""
        setattr(config, self.config_keys["intermediate_size"], width)

    def max_positions(self, config) -> int | None:
        """The longest sequence the config allows (``max_position_embeddings`` less reserved
        positions), or ``None`` where it names no limit."""
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        reserved = self.reserved_positions
        if self.positions_after_padding:
            reserved += (getattr(config, "pad_token_id", None) or 0) + 1
        return limit - reserved if limit else None

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this family has, in block order."""
        return tuple(r for r in ROLES if r in self.linears)

    @property
    def gated_ffn(self) -> bool:
        """The FFN has a gate projection (SwiGLU, GeGLU, ModernBERT's GLU)."""
        return "ffn_gate" in self.linears

    # --- what the family can do -----------------------------------------------------------
    def refusal(self, capability: str) -> str | None:
        """Why this family cannot do ``capability``, or ``None`` if it can."""
        return self.refusals.get(capability)

    def require(self, capability: str) -> None:
        """Raise `UnsupportedModelError` (one line) if the family cannot do ``capability``."""
        reason = self.refusal(capability)
        if reason:
            raise UnsupportedModelError(f"{self.family} models cannot {CAPABILITIES[capability]}: {reason}")

    def with_refusals(self, refusals: dict[str, str]) -> ArchitectureAdapter:
        """A copy that also refuses ``refusals`` (what a failed self-check rules out)."""
        import dataclasses

        return dataclasses.replace(self, refusals={**self.refusals, **refusals})

    # --- navigation -----------------------------------------------------------------------
    def base(self, model: nn.Module) -> nn.Module:
        """The bare Transformer without a task head."""
        return base_model(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's Transformer blocks, in order."""
        return get_path(self.base(model), self.blocks_path)

    def linear(self, block: nn.Module, role: str) -> nn.Module:
        """The module that holds ``role`` (for a fused module, the fused module)."""
        return get_path(block, self.linears[role])

    def module_roles(self, roles: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
        """Module path -> the roles it holds, in output order (GPT-2's ``c_attn`` holds Q, K, V).

        Args:
            roles: Only modules holding one of these roles (default: all).
        """
        out: dict[str, tuple[str, ...]] = {}
        for role in self.roles:
            if roles is not None and role not in roles:
                continue
            path = self.linears[role]
            held = self.fused[path].roles if path in self.fused else (role,)
            out[path] = tuple(r for r in held if roles is None or r in roles)
        return out

    def role_rows(self, role: str, geometry: Geometry) -> torch.Tensor | None:
        """The output rows of ``role``'s module that hold it; ``None`` for a module of its own."""
        path = self.linears[role]
        return self.fused[path].rows(geometry)[role] if path in self.fused else None

    def module_rows(self, path: str, kept: dict[str, torch.Tensor], geometry: Geometry) -> torch.Tensor:
        """The module's rows that hold the ``kept`` rows of each of its roles, in module order.

        Kept rows of a role are given in the role's own numbering; the result keeps the
        module's layout (stacked or per-head) for the smaller geometry, since rows stay in order.
        """
        import torch

        if path not in self.fused:
            (role,) = self.module_roles()[path]
            return kept[role]
        rows = self.fused[path].rows(geometry)
        return torch.cat([rows[r][kept[r]] for r in self.fused[path].roles]).sort().values

    def norm_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every norm the adapter knows of: in the blocks, in the heads, and outside."""
        found = []
        for block in self.blocks(model):
            for path in self.norms + self.head_norms:
                module = find_path(block, path)
                if module is not None and any(True for _ in module.parameters(recurse=False)):
                    found.append(module)
        for path in self.outer_norms:
            module = find_path(self.base(model), path)
            if module is not None:
                found.append(module)
        return found

    # --- weights --------------------------------------------------------------------------
    def weight(self, block: nn.Module, role: str, geometry: Geometry) -> torch.Tensor:
        """The stored weight of ``role`` as ``(out_features, in_features)``, detached.

        A view for a module of its own; for a fused module a copy of the role's rows.
        """
        w = module_weight(self.linear(block, role))
        rows = self.role_rows(role, geometry)
        return w if rows is None else w.index_select(0, rows.to(w.device))

    def applied_weight(self, block: nn.Module, role: str, geometry: Geometry) -> torch.Tensor:
        """The weight ``role`` really applies: for a shared module its shared weight plus delta."""
        w = applied_weight(self.linear(block, role))
        rows = self.role_rows(role, geometry)
        return w if rows is None else w.index_select(0, rows.to(w.device))

    def bias(self, block: nn.Module, role: str, geometry: Geometry) -> torch.Tensor | None:
        """The bias of ``role`` (``(out_features,)``), or ``None`` if it has none."""
        b = getattr(self.linear(block, role), "bias", None)
        if b is None:
            return None
        b = b.detach()
        rows = self.role_rows(role, geometry)
        return b if rows is None else b.index_select(0, rows.to(b.device))

    def block_weights(self, block: nn.Module, geometry: Geometry) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """All linear weights ``(out, in)`` and biases of a block, keyed by role (copies)."""
        weights = {r: self.weight(block, r, geometry).clone() for r in self.roles}
        biases = {r: (None if (b := self.bias(block, r, geometry)) is None else b.clone()) for r in self.roles}
        return weights, biases

    def load_block_weights(
        self,
        block: nn.Module,
        weights: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor | None] | None,
        geometry: Geometry,
    ) -> None:
        """Write ``(out, in)`` weights (and biases) back into a block's modules, in place."""
        import torch

        with torch.no_grad():
            for role, w in weights.items():
                module = self.linear(block, role)
                rows = self.role_rows(role, geometry)
                target = module_weight(module)  # a view into the parameter
                b = None if biases is None else biases.get(role)
                if rows is None:
                    target.copy_(w)
                    if b is not None:
                        module.bias.copy_(b)
                else:
                    target.index_copy_(0, rows.to(target.device), w.to(target.dtype))
                    if b is not None:
                        module.bias.index_copy_(0, rows.to(b.device), b.to(module.bias.dtype))


# --- the one place that knows how a linear module stores its weight --------------------------
def is_conv1d(module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``(in, out)``."""
    return type(module).__name__ == "Conv1D"


def is_linear(module) -> bool:
    """A dense linear sublayer: ``nn.Linear``, GPT-2's ``Conv1D`` or our ``SharedLinear``."""
    from torch import nn

    return isinstance(module, nn.Linear) or is_conv1d(module) or type(module).__name__ == "SharedLinear"


def head_rows(units: list[int], heads_per_unit: int, head_dim: int) -> torch.Tensor:
    """Rows (in a query-sized projection) of the heads that make up ``units``."""
    import torch  # here, not at the top: the adapters load with `compress --help`

    heads = [u * heads_per_unit + i for u in units for i in range(heads_per_unit)]
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def module_weight(module) -> torch.Tensor:
    """The stored weight as ``(out, in)``, detached (a view; for a shared module, the shared weight)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def applied_weight(module) -> torch.Tensor:
    """``(out, in)`` weight a module applies (a shared weight plus the layer's own delta)."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight().detach()
    return module_weight(module)


def module_shape(module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear module."""
    return tuple(module_weight(module).shape)


def set_module_weight(module, w: torch.Tensor) -> None:
    """Give a dense linear module a new ``(out, in)`` weight (its shape may change)."""
    from torch import nn

    grad = module.weight.requires_grad
    if is_conv1d(module):
        module.weight = nn.Parameter(w.t().contiguous(), requires_grad=grad)
        module.nf = w.shape[0]
    else:
        module.weight = nn.Parameter(w.contiguous(), requires_grad=grad)
        module.out_features, module.in_features = w.shape


def dense_like(w: torch.Tensor, bias: torch.Tensor | None, *, conv1d: bool) -> nn.Module:
    """A new dense module holding ``w`` ``(out, in)`` and ``bias``: a ``Conv1D`` for the
    families that use it (GPT-2), otherwise an ``nn.Linear``."""
    import torch
    from torch import nn

    out_f, in_f = w.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_f, in_f)
        dense.weight = nn.Parameter(w.t().contiguous())
        dense.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_f, dtype=w.dtype))
        return dense
    dense = nn.Linear(in_f, out_f, bias=bias is not None, dtype=w.dtype, device=w.device)
    dense.weight = nn.Parameter(w.clone())
    if bias is not None:
        dense.bias = nn.Parameter(bias.clone())
    return dense


def base_model(model: nn.Module) -> nn.Module:
    """The bare Transformer inside a model with a task head.

    ``model.base_model`` is the model itself where the class's ``base_model_prefix`` names no
    attribute (Gemma 3's text-only causal LM keeps its body in ``model``); then the body is the
    ``model`` / ``transformer`` attribute.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        for name in ("model", "transformer"):
            inner = getattr(model, name, None)
            if inner is not None and hasattr(inner, "config") and inner is not model:
                return inner
    return base


def get_path(root, dotted: str):
    """The attribute (or list item, for digits) at a dotted path."""
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def find_path(root, dotted: str):
    """`get_path`, or ``None`` where the path does not exist."""
    try:
        return get_path(root, dotted)
    except (AttributeError, IndexError):
        return None
