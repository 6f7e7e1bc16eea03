"""The hidden state each block writes to the residual stream, on calibration text, and Block
Influence: what the analysis measures its similarities on and what pruning drops layers by.

The hidden state a block writes to the residual stream is captured with forward hooks (not
``output_hidden_states``, whose last entry already has the final norm applied in decoders).
Only real tokens count: padding is dropped with the attention mask.

* Block Influence of layer i: ``1 - mean cos(input_i, output_i)`` (ShortGPT, Men et al., 2024);
  low means the layer barely changes its input, so it is a candidate for removal.

Massive activations (Sun et al., 2024): in many decoders the first token (an attention sink)
carries a hidden state whose norm is hundreds of times the median (about 25,000 against 150 in
SmolLM2-135M). One such token dominates every centred Gram matrix, so linear CKA between any two
layers that carry it reads 1.0000 whatever else they compute. Tokens whose norm exceeds
`MASSIVE_FACTOR` times the layer's median, at any layer, are left out of the captured outputs
and of Block Influence, and counted in `BlockOutputs.left_out`; where there are none (encoders
such as MiniLM), nothing changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.text import fit_length
from ..errors import ConfigError
from ..progress import Progress

#: Fewer tokens than this say nothing about how alike two layers are.
MIN_TOKENS = 16
#: A token whose hidden-state norm at some layer exceeds this multiple of that layer's median
#: norm is a massive activation and is left out. Sinks sit at 100x-1000x; ordinary tokens,
#: [CLS] and [SEP] of encoders included, within a few times the median.
MASSIVE_FACTOR = 20.0


def _hidden_from_args(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_from_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _TokenSample:
    """The real-token positions kept for CKA and angular distance, drawn once over all texts.

    Attributes:
        keep: ``(total,)`` bool, one entry per real token of every text, in text order.
        offsets: Where each text's tokens start in ``keep`` (one more entry than texts).
    """

    keep: torch.Tensor
    offsets: list[int]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def of_texts(self, start: int, stop: int) -> torch.Tensor:
        """The ``keep`` entries of texts ``start..stop-1`` (their real tokens, text by text)."""
        return self.keep[self.offsets[start] : self.offsets[stop]]


def _sample_tokens(tokenizer, texts: list[str], max_length: int, max_tokens: int, seed: int) -> _TokenSample:
    """Count the real tokens of every text (as the batches will see them) and draw ``max_tokens`` of them."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=fit_length(tokenizer, max_length))["input_ids"]]
    total = sum(lengths)
    if total < MIN_TOKENS:
        raise ConfigError(f"the calibration text holds {total} token(s), under {MIN_TOKENS}; give more text to compare layers on")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens]] = True
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return _TokenSample(keep, offsets)


class _BlockCapture:
    """Forward hooks on every block: per real token, the cosine of the block's input to its
    output and the norm of its output; and its output at the kept tokens.

    Set `mask` and `keep` before each batch goes through the model.
    """

    def __init__(self, num_layers: int):
        self.mask: torch.Tensor | None = None  # (batch, seq): the batch's real tokens
        self.keep: torch.Tensor | None = None  # (real tokens of the batch,): those kept
        self.cos: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._inputs: dict[int, torch.Tensor] = {}

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            self._inputs[i] = _hidden_from_args(args, kwargs)[self.mask].float()

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, kwargs, output):
            hidden = _hidden_from_output(output)[self.mask]  # (real tokens, hidden)
            out = hidden.float()
            self.cos[i].append(F.cosine_similarity(self._inputs.pop(i), out, dim=-1).double().cpu())
            self.norms[i].append(out.norm(dim=-1).cpu())
            # kept as the model computed them: a bf16 model's outputs take half the memory
            self.outputs[i].append(hidden[self.keep].cpu())

        return hook

    @contextmanager
    def attached(self, blocks):
        """Hook every block while the context lasts."""
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(self._post_hook(i), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


@dataclass
class BlockOutputs:
    """What `collect_block_outputs` captured.

    Attributes:
        outputs: One ``(tokens compared, hidden)`` tensor per layer, in the model's dtype: its
            output at the sampled tokens, massive activations left out.
        block_influence: ``(layers,)``: Block Influence of each layer over every real token
            that is not a massive activation.
        num_tokens: Real tokens seen.
        left_out: What was left out and why: ``tokens`` (how many), ``first_position`` (how many
            of them are the first token of their text), ``factor`` (the rule: norm above this
            multiple of the layer's median), ``max_norm_ratio`` (the largest norm over the median
            at any layer), ``layers`` (the layers where a token crossed it).
    """

    outputs: list[torch.Tensor]
    block_influence: torch.Tensor
    num_tokens: int
    left_out: dict


def massive_tokens(norms: torch.Tensor, factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(massive, ratio)`` for a ``(layers, tokens)`` matrix of hidden-state norms: a token is
    massive when its norm at some layer exceeds ``factor`` (default `MASSIVE_FACTOR`) x that
    layer's median; ``ratio`` is each layer's norms over its median."""
    factor = MASSIVE_FACTOR if factor is None else factor
    ratio = norms / norms.median(dim=1, keepdim=True).values.clamp(min=1e-12)
    return (ratio > factor).any(dim=0), ratio


@torch.no_grad()
def collect_block_outputs(
    loaded,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    max_tokens: int = 4096,
    device: str = "cpu",
    seed: int = 0,
) -> BlockOutputs:
    """Run the model on ``texts`` and capture every block's output at real tokens.

    The token positions kept for CKA and angular distance (at most ``max_tokens``, the same
    for every layer) are drawn before the forward passes, so memory stays at
    ``layers x max_tokens x hidden`` however much text there is. Massive activations are left
    out of everything (see the module's docstring).

    Raises:
        ConfigError: no tokenizer, or too little text to compare layers on.
    """
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{loaded.source} has no tokenizer; activation analysis needs one (or use --no-activations)")
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    base = adapter.base(model).to(device)
    sample = _sample_tokens(tokenizer, texts, max_length, max_tokens, seed)
    capture = _BlockCapture(len(blocks))
    starts = range(0, len(texts), batch_size)
    with capture.attached(blocks), Progress("block outputs", len(starts), "batches") as progress:
        for start in starts:
            stop = min(start + batch_size, len(texts))
            enc = tokenizer(texts[start:stop], padding=True, truncation=True, max_length=fit_length(tokenizer, max_length),
                            return_tensors="pt").to(device)
            capture.mask = enc["attention_mask"].bool()  # (batch, seq); real tokens come out text by text
            capture.keep = sample.of_texts(start, stop).to(device)
            base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            progress.update()

    return _without_massive(capture, sample)


def _without_massive(capture: _BlockCapture, sample: _TokenSample) -> BlockOutputs:
    """The captured outputs and Block Influence with massive-activation tokens left out."""
    norms = torch.stack([torch.cat(n) for n in capture.norms])  # (layers, tokens)
    massive, ratio = massive_tokens(norms)
    cos = torch.stack([torch.cat(c) for c in capture.cos])
    kept = ~massive
    block_influence = 1.0 - cos[:, kept].sum(dim=1) / max(int(kept.sum()), 1)
    compared = kept[sample.keep]  # of the sampled tokens, those not massive
    first = torch.zeros_like(massive)
    first[torch.tensor(sample.offsets[:-1], dtype=torch.long)] = True
    left_out = {"tokens": int(massive.sum()), "first_position": int((massive & first).sum()), "factor": MASSIVE_FACTOR,
                "max_norm_ratio": round(float(ratio.max()), 1),
                "layers": [i for i in range(len(ratio)) if bool((ratio[i] > MASSIVE_FACTOR).any())]}
    return BlockOutputs([torch.cat(o)[compared] for o in capture.outputs], block_influence.float(), sample.total,
                        left_out)
