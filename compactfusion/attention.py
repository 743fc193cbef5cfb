"""Attention over blocks of keys/values: joint tokens, log-sum-exp merging.

xfuser's attention functions take ``(q, k, v)`` shaped ``[B, H, S, D]`` and return
``(out, lse)`` with ``lse`` shaped ``[B, H, Sq]`` (natural log). Attention over the union of
key blocks equals the log-sum-exp merge of per-block attentions::

    lse = logaddexp(lse_1, lse_2)
    out = out_1 * exp(lse_1 - lse) + out_2 * exp(lse_2 - lse)

Joint (text) tokens that xfuser passes in ``joint_attn_kwargs`` are replicated on every rank:
they are attended exactly once, with the block that holds the local keys, and never sent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def attend(
    attention_function: AttentionFn,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    dropout_p: float,
    is_causal: bool,
    joint_attn_kwargs: dict | None,
    attention_kwargs: dict | None,
    with_joint: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention call; joint keys/values are included iff ``with_joint``.

    ``attention_function`` is xfuser's wrapped backend, which concatenates the joint tensors
    when its ``step`` matches the joint strategy; a single-step view is passed so it does so
    exactly when asked (and a fresh dict, because the wrapper increments ``step`` in place).
    """
    joint = None
    if joint_attn_kwargs is not None and with_joint:
        joint = {**joint_attn_kwargs, "step": 0, "total_steps": 1}
    elif joint_attn_kwargs is not None:
        # A step value at which neither "front" (0) nor "rear" (total-1) concatenates.
        joint = {**joint_attn_kwargs, "step": 1, "total_steps": 3}
    out, lse = attention_function(
        query,
        key,
        value,
        dropout_p=dropout_p,
        is_causal=is_causal,
        joint_attn_kwargs=joint,
        attention_kwargs=attention_kwargs,
    )
    return out, lse


def merge(
    acc: tuple[torch.Tensor, torch.Tensor] | None, block: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's ``(out, lse)`` into an accumulator (float32 accumulation)."""
    out_b, lse_b = block
    out_b, lse_b = out_b.float(), lse_b.float()
    if acc is None:
        return out_b, lse_b
    out_a, lse_a = acc
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def blocks_to_sequence(blocks: torch.Tensor) -> torch.Tensor:
    """``[W, B, H, S, D]`` rank blocks -> ``[B, H, W*S, D]`` keys in rank order."""
    w, b, h, s, d = blocks.shape
    return blocks.permute(1, 2, 0, 3, 4).reshape(b, h, w * s, d)
