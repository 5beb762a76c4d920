"""Measuring a causal language model: tokenising text and perplexity over fixed windows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from shear.errors import ShearError


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise a text the way its tokenizer normally encodes a single sequence.

    The tokenizer's own special-token convention is kept (``add_special_tokens=True``): a
    tokenizer that normally starts sequences with BOS (LLaMA-2, Mistral) gets one BOS at
    the front; one that adds nothing (SmolLM2, Qwen2) adds nothing. The whole text is one
    sequence; :func:`perplexity` splits it into windows.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the text.

    Returns:
        A 1-D LongTensor of token ids.
    """
    encoded = tokenizer(text, add_special_tokens=True, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor, window: int = 512, batch_size: int = 4
) -> float:
    """Perplexity of a causal LM on a token sequence, over non-overlapping windows.

    The sequence is cut into consecutive windows of ``window`` tokens; a final shorter
    window is kept if it has at least 2 tokens (dropped otherwise). Each window is scored
    on its own (no context carries over), predicting tokens 2..n of the window from the
    ones before. The result is exp of the mean negative log-likelihood over all predicted
    tokens. Runs without gradients and in eval mode; the model's training mode is restored.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits``.
        input_ids: a 1-D LongTensor of token ids.
        window: tokens per window (at least 2).
        batch_size: windows per forward pass.

    Returns:
        The perplexity (a float >= 1).

    Raises:
        ShearError: ``input_ids`` is not 1-D or has fewer than 2 tokens, or ``window`` < 2,
            or ``batch_size`` < 1.
    """
    if input_ids.dim() != 1:
        raise ShearError(f"perplexity needs a 1-D tensor of token ids, got shape {tuple(input_ids.shape)}")
    if window < 2:
        raise ShearError(f"the perplexity window must be at least 2 tokens, got {window}")
    if batch_size < 1:
        raise ShearError(f"batch_size must be at least 1, got {batch_size}")
    n = input_ids.numel()
    if n < 2:
        raise ShearError(f"perplexity needs at least 2 tokens, got {n}")

    device = _model_device(model)
    ids = input_ids.to(device=device, dtype=torch.long)
    n_full = n // window
    full = ids[: n_full * window].view(n_full, window)
    batches = [full[i : i + batch_size] for i in range(0, n_full, batch_size)]
    tail = ids[n_full * window :]
    if tail.numel() >= 2:
        batches.append(tail.unsqueeze(0))

    total_nll, total_tokens = token_nll(model, batches)
    return math.exp(total_nll / total_tokens)


def token_nll(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over batches of sequences, and the token count.

    Runs without gradients in eval mode (so a masked model uses its deterministic masks);
    the model's training mode is restored.

    Args:
        model: a causal LM.
        batches: LongTensors ``[batch, seq]``; each sequence predicts its tokens 2..seq.

    Returns:
        ``(sum of NLL, number of predicted tokens)``.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                pred = logits[:, :-1, :].float()
                target = batch[:, 1:]
                nll = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="sum")
                total_nll += nll.item()
                total_tokens += target.numel()
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def domain_losses(
    model: torch.nn.Module, eval_sets: dict[str, torch.Tensor], batch_size: int = 4
) -> dict[str, float]:
    """Mean next-token loss per data domain (perplexity = exp of it).

    Args:
        model: a causal LM (a masked model uses its deterministic masks here).
        eval_sets: ``{domain: LongTensor [sequences, seq_len]}`` (held-out data).
        batch_size: sequences per forward pass.

    Returns:
        ``{domain: mean loss}``.

    Raises:
        ShearError: a domain without evaluation data (never a NaN).
    """
    out = {}
    for domain, seqs in eval_sets.items():
        if seqs.dim() != 2 or seqs.shape[0] == 0 or seqs.shape[1] < 2:
            raise ShearError(f"domain {domain!r} has no evaluation sequences")
        nll, n = token_nll(model, seqs.split(batch_size))
        out[domain] = nll / n
    return out
