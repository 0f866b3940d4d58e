"""Packed sequences kept apart: varlen SDPA attention, and the check that a model packs exactly.

transformers 5 computes a packed row (position ids restarting per sequence, no attention
mask, no cache) under SDPA with a block-diagonal causal mask: correct, but every attention
call then costs the square of the whole row, most of it masked. With FlashAttention (CUDA)
the varlen kernel runs each sequence alone, from the ``cu_seq_lens_q`` boundaries a packed
batch carries; :data:`VARLEN_SDPA` does the same with PyTorch's SDPA on any device: one causal
call per sequence. Any other input goes to transformers' SDPA unchanged, so a model switched
to it computes padded batches bit for bit as before.

Whether a model really computes a packed row as its sequences alone (its forward passes the
position ids on, builds its mask with transformers' masking utilities, …) is not declared by
transformers; :func:`enable_packing` tries it on two short sequences.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fedlora.data.batches import packed_batch, padded_batch
from fedlora.data.prompts import TokenizedExample
from fedlora.forward import eval_mode, labelled_logits

#: the attention implementation name an SDPA model is switched to for packed batches
VARLEN_SDPA = "fedlora_varlen_sdpa"
#: token lengths of the probe's sequences: a few tokens each, so that its two forward passes cost
#: little more than reading the weights twice
_PROBE_LENGTHS = (5, 3)


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, cu_seq_lens_q: torch.Tensor | None = None,
                          cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                          max_length_k: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run on each packed sequence alone when boundaries are given.

    A packed batch is one row without a cache, so its key boundaries are its query boundaries;
    the block-diagonal mask transformers built for the row is not needed and goes unused.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                      value[:, :, start:end], None, **kwargs)[0]
               for start, end in pairwise(cu_seq_lens_q.tolist())]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def enable_packing(model: nn.Module) -> bool:
    """Make ``model`` compute packed batches (an SDPA model is switched to :data:`VARLEN_SDPA`);
    False, and the model left as it was, when it does not compute them as its sequences alone."""
    original = model.config._attn_implementation
    if original == "sdpa":
        model.set_attn_implementation(VARLEN_SDPA)
    if packs_exactly(model):
        return True
    if original == "sdpa":
        model.set_attn_implementation(original)
    return False


def packs_exactly(model: nn.Module) -> bool:
    """Whether two short sequences packed in one row get the logits each gets alone, up to the
    rounding of the model's dtype (a model attending across them, or numbering positions on
    through the row, misses by far more)."""
    vocab = model.get_input_embeddings().num_embeddings
    examples, start = [], 1
    for length in _PROBE_LENGTHS:
        ids = [(start + i) % vocab for i in range(length)]
        examples.append(TokenizedExample(ids, labels=ids, truncated=False))
        start += length
    device = next(model.parameters()).device
    with eval_mode(model):
        try:
            packed = labelled_logits(model, packed_batch(examples).to(device)).float()
        except (TypeError, ValueError, RuntimeError):  # a forward that rejects the packed inputs
            return False
        # right-padded, each row is its sequence alone (padding is masked): the reference
        alone = labelled_logits(model, padded_batch(examples, 0).to(device)).float()
    tolerance = torch.finfo(next(model.parameters()).dtype).eps ** 0.5 * alone.abs().max()
    return bool((packed - alone).abs().max() <= tolerance)
