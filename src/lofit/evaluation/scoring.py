"""Log-probability scoring of continuations: score(c | x) = Σ log p(token | everything before it) over c's tokens.

Two scorers compute the same numbers (fp32: within ~1e-4):
- "naive": one forward pass per (context, continuation), from scratch — the reference.
- "fast": the longest token prefix shared by *all* requests (TruthfulQA: instruction + 6-shot primer +
  "\n\nQ:") runs once per call and its KV cache is reused by everything after. Then, by default, the
  packed path (`lofit.evaluation.packed`): each request in one row — its shared part (the question), then
  every continuation, a block attention mask letting each continuation see the shared part and itself
  only, position ids restarting after the shared part — `batch_size` rows per forward pass, requests in
  order of row length. One pass over about `context + Σ continuations` tokens replaces
  `k x (context + continuation)`. The packed path is used when the model takes a 4D mask: its scores of
  one request (the shortest with several continuations) must equal the KV-cache path's, else (or on a
  forward error, or when a sequence reaches a sliding window, which the mask leaves out) every request
  goes the KV-cache path: (2) the part each request's continuations share runs once per request, several
  requests per forward pass, right-padded; (3) all continuations of those requests run in batched passes
  (`batch_size` continuations each), each row continuing its request's cache row, with an attention mask
  hiding step 2's padding and explicit position ids. Requests are packed in order of their shared part's
  length and each pack's continuations run shortest first, so little padding is computed; with a
  sliding-window model a pack never spans more than the window. On both paths the LM head runs only on
  the scored positions (the decoder body's hidden states are gathered first;
  `lofit.evaluation.forward.split_model` checks once per call that body + head reproduce the model's
  logits, else every position gets the model's own logits).

The answer boundary is found robustly: tokenise the context and context + continuation; the scored
tokens are those past their longest common prefix (normally exactly the context's tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LofitValueError
from ..training.tokens import common_prefix_length, encode_batch
from .bounds import Cuts, NonFiniteLogitsError, check_finite, non_finite_logits, resolve_max_length
from .forward import SplitModel, causal_lm, device_of, forward, inference, sliding_window, split_model
from .kv_cache import fork_cache, select_cache_rows
from .packed import pack_request, score_rows, shared_length, target_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Scorer = Literal["fast", "naive"]


@dataclass(frozen=True)
class ScoringRequest:
    """One context and the continuations to score after it (the text scored is `context + continuation`)."""

    context: str
    continuations: Sequence[str]


@dataclass(frozen=True)
class _Tokenized:
    sequences: list[list[int]]  # context + continuation, one per continuation
    boundaries: list[int]  # index of each sequence's first continuation token


def score_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[ScoringRequest],
    *,
    scorer: Scorer = "fast",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-probabilities of each continuation after its context (fp32 log-softmax).

    Args:
        model: a causal LM or a `LofitModel`.
        tokenizer: its tokenizer.
        requests: one `ScoringRequest` (context + continuations) per question.
        scorer: "fast" reuses the KV cache of shared prefixes; "naive" scores every sequence from scratch
            (the same numbers, for checking).
        batch_size: rows per forward pass ("fast" only): requests on the packed path (all continuations of a
            request in one row), continuations on the KV-cache path.
        max_length: drop the oldest context tokens of longer sequences (the continuation is kept);
            None: the model's `max_position_embeddings`. A warning says how much was cut.
        progress: show a tqdm bar.

    Returns:
        `result[i][j]`, the log-probability of `requests[i].continuations[j]` given `requests[i].context`.

    Raises:
        NonFiniteLogitsError: the model gave NaN/inf logits where a continuation is scored.
    """
    if scorer not in ("fast", "naive"):
        raise LofitValueError(f"scorer must be 'fast' or 'naive', got {scorer!r}")
    if batch_size < 1:
        raise LofitValueError(f"batch_size must be >= 1, got {batch_size}")
    limit, source = resolve_max_length(model, max_length)
    cuts = Cuts("scoring", limit, source)
    tokenized = _tokenize_all(tokenizer, requests, cuts)
    cuts.warn()
    bar = tqdm(total=len(tokenized), desc=f"scoring ({scorer})", disable=not progress, leave=False)
    try:
        with inference(model):
            if scorer == "naive":
                scores = _score_naive(model, tokenized, bar)
            else:
                scores = _score_fast(model, tokenized, batch_size, bar)
    except NonFiniteLogitsError:
        raise non_finite_logits(model, f"scoring {len(requests)} request(s)") from None
    finally:
        bar.close()
    return scores


def _tokenize_all(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[ScoringRequest], cuts: Cuts
) -> list[_Tokenized]:
    texts: list[str] = []
    bounded = []
    for index, request in enumerate(requests):
        if not request.continuations:
            raise LofitValueError(f"scoring request {index} has no continuations")
        for continuation in request.continuations:
            if cuts.text(continuation, "start") is not continuation:
                raise LofitValueError(
                    f"request {index}: a continuation of {len(continuation):,} characters cannot fit in "
                    f"{cuts.max_length} tokens ({cuts.source}); shorten it"
                )
        context = cuts.text(request.context, "end", key=index)  # bounded before it is tokenised
        bounded.append(ScoringRequest(context, request.continuations))
        texts.append(context)
        texts.extend(context + continuation for continuation in request.continuations)
    encoded = iter(encode_batch(tokenizer, texts))
    return [_boundaries(request, index, encoded, cuts) for index, request in enumerate(bounded)]


def _boundaries(request: ScoringRequest, index: int, encoded: Iterator[list[int]], cuts: Cuts) -> _Tokenized:
    max_length = cuts.max_length
    context_ids = next(encoded)
    sequences, boundaries = [], []
    for continuation in request.continuations:
        ids = next(encoded)
        boundary = common_prefix_length([context_ids, ids])
        if boundary == len(ids):
            raise LofitValueError(
                f"request {index}: continuation {continuation!r} adds no tokens to its context"
            )
        kept = cuts.tokens(ids, "end", key=index)
        ids, boundary = kept, boundary - (len(ids) - len(kept))
        if boundary < 1:
            raise LofitValueError(
                f"request {index}: the continuation {continuation!r} needs at least one context token before "
                f"it (context {request.context[:60]!r}, max_length={max_length}); give a non-empty context "
                "or raise max_length"
            )
        sequences.append(ids)
        boundaries.append(boundary)
    return _Tokenized(sequences, boundaries)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `logits` [n, vocab], in fp32; NonFiniteLogitsError for NaN/inf rows."""
    if not check_finite(logits):
        raise NonFiniteLogitsError("non-finite logits")
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _score_naive(model: nn.Module, tokenized: list[_Tokenized], bar: Any) -> list[list[float]]:
    device = device_of(model)
    results = []
    for item in tokenized:
        scores = []
        for ids, boundary in zip(item.sequences, item.boundaries, strict=True):
            input_ids = torch.tensor([ids], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0]
            scores.append(_target_logprobs(logits[boundary - 1 : -1], input_ids[0, boundary:]).sum().item())
        results.append(scores)
        bar.update(1)
    return results


def _score_fast(
    model: nn.Module, tokenized: list[_Tokenized], batch_size: int, bar: Any
) -> list[list[float]]:
    device = device_of(model)
    everything = [ids for item in tokenized for ids in item.sequences]
    # The decoder body runs every position, the LM head only the scored ones (where that equals the
    # model's logits; else every position gets full logits).
    split = split_model(model, everything[0][: min(len(everything[0]), 8)])
    run = _Run(model, split)
    # The global prefix stops before the first continuation token of any sequence.
    global_length = min(common_prefix_length(everything), min(min(item.boundaries) for item in tokenized))
    prefix = _Prefix(global_length, None, None)
    if global_length > 0:
        states, cache = run.forward(torch.tensor([everything[0][:global_length]], device=device))
        prefix = _Prefix(global_length, cache, states[0, -1:])
    window = sliding_window(model)
    # The packed path leaves the model's sliding window out of its mask: only where no sequence reaches it.
    if window is None or max(len(ids) for ids in everything) <= window:
        packed_scores = _score_packed(run, tokenized, prefix, batch_size, bar)
        if packed_scores is not None:
            return packed_scores
    return _score_cached(run, tokenized, prefix, batch_size, window, bar)


def _score_cached(
    run: _Run, tokenized: list[_Tokenized], prefix: _Prefix, batch_size: int, window: int | None, bar: Any
) -> list[list[float]]:
    """The KV-cache scorer: shared parts in one pass, continuations in batched passes continuing them."""
    # Requests in order of their shared part's length (and continuations by length in a pack) keep the
    # padding of batched passes small; the scores go back to the caller's order.
    shared = [_shared_length(item) for item in tokenized]
    order = sorted(range(len(tokenized)), key=lambda i: (shared[i], i))
    # Packing requests pads their shared parts in the middle of a row; a sliding window would count the
    # padding as distance, so a pack never spans more than the window.
    scores: list[list[float]] = [[] for _ in tokenized]
    destinations = iter(order)
    for pack in _packs([tokenized[i] for i in order], [shared[i] for i in order], batch_size, window):
        for item_scores in _score_pack(run, pack, prefix, batch_size):
            scores[next(destinations)] = item_scores
        bar.update(len(pack))
    return scores


def _score_packed(
    run: _Run, tokenized: list[_Tokenized], prefix: _Prefix, batch_size: int, bar: Any
) -> list[list[float]] | None:
    """The packed scorer (`lofit.evaluation.packed`): each request in one row, `batch_size` rows per pass
    (requests in order of row length). None where the model does not take its mask (a forward
    error, or one request's scores differ from the KV-cache scorer's): the caller falls back."""
    rows = [pack_request(item.sequences, item.boundaries, prefix.length) for item in tokenized]
    dtype = _float_dtype(run.model)
    device = device_of(run.model)

    def score(indices: list[int]) -> list[list[float]]:
        cache = None if prefix.cache is None else fork_cache(prefix.cache, len(indices))
        values = score_rows(run, [rows[i] for i in indices], cache, prefix.last_states, dtype, device)
        sums = torch.stack([v.sum() for v in values]).tolist()
        counts = [len(tokenized[i].sequences) for i in indices]
        return [sums[sum(counts[:k]) : sum(counts[: k + 1])] for k in range(len(indices))]

    # The probe: the shortest request with several continuations (else the shortest), both ways.
    probe = min(range(len(rows)), key=lambda i: (len(rows[i].sources) < 2, len(rows[i].ids), i))
    try:
        got = score([probe])[0]
    except NonFiniteLogitsError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None
    want = _score_pack(run, [tokenized[probe]], prefix, batch_size)[0]
    tolerance = (2e-3 if dtype == torch.float32 else 1e-1) * max(
        len(ids) for ids in tokenized[probe].sequences
    )
    if any(abs(a - b) > tolerance or a != a for a, b in zip(got, want, strict=True)):
        return None
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].ids), i))
    scores: list[list[float]] = [[] for _ in tokenized]
    for group in (order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)):
        for index, item_scores in zip(group, score(group), strict=True):
            scores[index] = item_scores
        bar.update(len(group))
    return scores


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype attention computes in, for the packed path's additive mask: autocast's where it is on
    (`evaluate(precision="bf16")`), else the causal LM's input embeddings'."""
    device_type = device_of(model).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    get_embeddings = getattr(causal_lm(model), "get_input_embeddings", None)
    weight = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def _shared_length(item: _Tokenized) -> int:
    """Tokens all of a request's sequences share; every continuation keeps at least one token for step 3."""
    return shared_length(item.sequences)


@dataclass(frozen=True)
class _Run:
    """Forward passes returning what the score tables hold: hidden states (`split`) or logits."""

    model: nn.Module
    split: SplitModel | None

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **extra: Any) -> tuple[torch.Tensor, Any]:
        if self.split is None:
            return forward(self.model, input_ids, cache, **extra)
        return self.split.forward(input_ids, cache, **extra)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.split is None else self.split.project(rows)


@dataclass(frozen=True)
class _Prefix:
    length: int  # tokens shared by every sequence of the call
    cache: Any  # their KV cache (batch 1), None when length == 0
    last_states: torch.Tensor | None  # [1, hidden or vocab] at position length - 1


def _packs(
    tokenized: list[_Tokenized], shared: list[int], size: int, window: int | None
) -> list[list[_Tokenized]]:
    """Consecutive requests in groups of at most `size`; with a sliding `window`, a group's longest row
    plus its step-2 padding stays inside the window (a request alone always forms a group)."""
    packs: list[list[_Tokenized]] = []
    current: list[_Tokenized] = []
    low = high = longest = 0
    for item, length in zip(tokenized, shared, strict=True):
        item_longest = max(len(ids) for ids in item.sequences)
        if current:
            new_low, new_high = min(low, length), max(high, length)
            new_longest = max(longest, item_longest)
            fits = window is None or new_longest + (new_high - new_low) < window
            if len(current) < size and fits:
                current.append(item)
                low, high, longest = new_low, new_high, new_longest
                continue
            packs.append(current)
        current, low, high, longest = [item], length, length, item_longest
    if current:
        packs.append(current)
    return packs


def _score_pack(run: _Run, pack: list[_Tokenized], prefix: _Prefix, batch_size: int) -> list[list[float]]:
    """Score up to `batch_size` requests: one pass over their shared parts, then batched continuation passes.

    Step 2 runs each request's shared part (e.g. its question) after the global prefix, right-padded to a
    common width. Step 3 runs the continuations on top, `batch_size` rows at a time (shortest first, so
    rows of a pass have similar lengths), each row starting from its request's cache row; an attention
    mask hides the step-2 padding and explicit position ids skip it.
    """
    device = device_of(run.model)
    start = prefix.length
    shared = [_shared_length(it) for it in pack]
    width2 = max(shared) - start
    states2, cache2 = None, prefix.cache
    if width2 > 0:
        rows2 = [it.sequences[0][start:end] for it, end in zip(pack, shared, strict=True)]
        ids2 = torch.tensor([r + [0] * (width2 - len(r)) for r in rows2], device=device)
        states2, cache2 = run.forward(
            ids2, None if prefix.cache is None else fork_cache(prefix.cache, len(pack))
        )

    rows3 = [(r, j) for r, it in enumerate(pack) for j in range(len(it.sequences))]
    rows3.sort(key=lambda rj: len(pack[rj[0]].sequences[rj[1]]) - shared[rj[0]])
    results = [[0.0] * len(it.sequences) for it in pack]
    for begin in range(0, len(rows3), batch_size):
        chunk = rows3[begin : begin + batch_size]
        suffixes = [pack[r].sequences[j][shared[r] :] for r, j in chunk]
        width3 = max(len(s) for s in suffixes)
        ids3 = torch.tensor([s + [0] * (width3 - len(s)) for s in suffixes], device=device)
        request_rows = torch.tensor([r for r, _ in chunk], device=device)
        if width2 > 0 and all(shared[r] == start + width2 for r, _ in chunk):  # no step-2 padding to hide
            states3, _ = run.forward(ids3, select_cache_rows(cache2, request_rows))
        elif width2 > 0:
            mask = torch.ones(len(chunk), start + width2 + width3, dtype=torch.long)  # built on the host
            for row, (r, _) in enumerate(chunk):
                mask[row, shared[r] : start + width2] = 0
            positions = torch.tensor([[shared[r] + t for t in range(width3)] for r, _ in chunk])
            states3, _ = run.forward(
                ids3,
                select_cache_rows(cache2, request_rows),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
            )
        else:  # no step 2: the continuations follow the global prefix directly
            states3, _ = run.forward(ids3, None if cache2 is None else fork_cache(cache2, len(chunk)))
        sums = _chunk_scores(run, pack, chunk, shared, prefix, states2, states3)
        for (r, j), value in zip(chunk, sums, strict=True):
            results[r][j] = value
    return results


def _chunk_scores(
    run: _Run,
    pack: list[_Tokenized],
    chunk: list[tuple[int, int]],
    shared: list[int],
    prefix: _Prefix,
    states2: torch.Tensor | None,
    states3: torch.Tensor,
) -> list[float]:
    """Σ log p over each chunk row's continuation tokens, gathering every needed logit row in one go per source.

    The logits at position p predict token p + 1; position p lives in the global prefix's last row
    (p = prefix.length - 1), in step 2 (p < the request's shared length) or in step 3.
    """
    start = prefix.length
    sources: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {
        name: ([], [], [], []) for name in ("prefix", "step2", "step3")
    }
    for row, (r, j) in enumerate(chunk):
        ids, boundary = pack[r].sequences[j], pack[r].boundaries[j]
        for p in range(boundary - 1, len(ids) - 1):
            if p == start - 1:
                name, batch, position = "prefix", 0, 0
            elif p < shared[r]:
                name, batch, position = "step2", r, p - start
            else:
                name, batch, position = "step3", row, p - shared[r]
            for column, value in zip(sources[name], (batch, position, ids[p + 1], row), strict=True):
                column.append(value)
    tables = {"prefix": prefix.last_states, "step2": states2, "step3": states3}
    sums = torch.zeros(len(chunk), dtype=torch.float32, device=states3.device)
    for name, (batches, positions, tokens, rows) in sources.items():
        if not rows:
            continue
        table = tables[name]
        assert table is not None
        if table.dim() == 2:  # the prefix's [1, vocab] row
            table = table[:, None, :]
        index = functools.partial(torch.tensor, device=states3.device)
        selected = run.logits(table[index(batches), index(positions)])  # the LM head on these rows only
        sums.index_add_(0, index(rows), target_logprobs(selected, index(tokens)))
    return sums.tolist()
