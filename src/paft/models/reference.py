"""Reference log-probabilities, computed once and cached on disk.

Every reference-based preference loss needs log pi_ref(y|x) for each reply it sees.
Recomputing it every step costs one extra forward per step and epoch; holding a
second model in memory costs its weights. paft does neither: the reference is the
policy with its LoRA adapter disabled (the starting weights), and its summed
completion log-prob of each row is computed the first time the row is seen,
memoised, and written to a JSON file under ``PAFT_CACHE/reference`` at the end of
training (and at each checkpoint), so later epochs and later runs on the same
(model, data, tokenisation) skip those forwards.

Full fine-tuning (``adapter: full``) has no adapter to disable: its reference is a frozen
copy of the starting weights (``model``), run the same way, once per row.

Keys: one file per reference model identity (base weights, the adapter merged into
them for the sequential baseline, dtype, bf16, the adapter kind: a 4-bit QLoRA base
gives other log-probs than the float one); inside it one entry per row, keyed by
a hash of the row's token ids and label mask. The tokenisation is therefore part of
the key by construction: a different template, tokenizer or max_length gives
different tokens and so a different entry, never a stale one.

Staged and online methods (sDPO, iterative DPO with ``reference: previous``) use
``snapshot``: the reference of a stage is the policy at the stage's start, so its
log-probs are computed eagerly for that stage's rows with the adapter *enabled*,
kept in memory only (that model exists nowhere else), and looked up while the stage
trains. The same snapshot freezes an online round's sampling policy pi_old (RLOO, GRPO, PPO reuse a round's
groups for several optimiser steps; ``paft.train.preference.PreferenceObjective.start_round``).

Token-level methods (GRPO's and PPO's per-token KL) ask ``tokens``: the reference log-prob of every label
token, memoised in memory only and dropped at each online round's end (``forget_tokens``): sampled replies
never recur, so writing them to the file would only grow it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

import torch

from paft.data.packing import is_packed, sequence_key
from paft.io import cache_root, sha256_file, write_json_atomic
from paft.models.logps import batch_sequence_logps, batch_token_logps, token_matrix, trim_padding
from paft import ranks


@contextlib.contextmanager
def reference_forward(model, frozen=None) -> Iterator:
    """The model whose forward is the reference, under ``no_grad``: the frozen copy of the start weights (full
    fine-tuning) when given, else ``model`` with its LoRA adapter disabled. Every reference forward goes
    through here."""
    with torch.no_grad():
        if frozen is not None:
            yield frozen
        else:
            with model.disable_adapter():
                yield model


def row_key(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> str:
    """Hash of a row's real tokens and which of them are scored (independent of padding side and width)."""
    keep = mask.bool()
    return sequence_key(ids[keep].tolist(), labels[keep].tolist())


class ReferenceLogps:
    """Summed reference log-prob of each row, memoised by row content; optionally persisted.

    ``path`` None keeps the memo in memory only (still one forward per row per run).
    ``cache`` False disables memoising: the adapter-disabled forward on every call.
    ``model``: the reference model itself, for full fine-tuning (no adapter to disable): a frozen
    copy of the starting weights, run once per row like the adapter-disabled forward.
    ``precision``: the context the training step computes in (its autocast), entered by ``snapshot``, which
    runs outside the Trainer: a snapshot in fp32 would give a bf16 policy a nonzero log-ratio at the start.
    """

    def __init__(self, path: Path | None = None, *, cache: bool = True, model=None,
                 precision: Callable[[], ContextManager] = contextlib.nullcontext):
        self.path, self.cache = path, cache
        self.model, self.precision = model, precision
        self.values: dict[str, float] = {}
        # per-token entries: memory only (online sampled replies never recur; ``forget_tokens`` at a round's end)
        self.token_values: dict[str, list[float]] = {}
        self.snapshot_values: dict[str, float] | None = None
        self.snapshot_tokens: dict[str, list[float]] | None = None
        self.hits = self.misses = 0
        self._dirty = False
        if path is not None and cache and path.is_file():
            try:
                data = json.loads(path.read_text())
                self.values = {k: float(v) for k, v in data["logps"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                self.values = {}  # unreadable cache: recompute (it is only a cache)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """Summed reference log-prob of each sequence of ``batch`` (either layout of ``paft.models.logps``)."""
        device = batch["input_ids"].device
        if self.snapshot_values is not None:
            keys = batch_keys(batch)
            if any(k not in self.snapshot_values for k in keys):
                raise RuntimeError("reference log-prob of a row missing from the stage snapshot; "
                                   "the stage's rows must all be snapshotted before it trains")
            return torch.tensor([self.snapshot_values[k] for k in keys], device=device, dtype=torch.float32)
        if not self.cache:
            return self._forward(model, batch)
        keys = batch_keys(batch)
        missing = [i for i, k in enumerate(keys) if k not in self.values]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            if is_packed(batch):  # a packed batch runs whole (first epoch: every sequence is new anyway)
                fresh, where = self._forward(model, batch).tolist(), range(len(keys))
            else:
                ids, mask, labels = (batch[k] for k in ("input_ids", "attention_mask", "labels"))
                sel = torch.tensor(missing, device=device)
                sub = dict(zip(("input_ids", "attention_mask", "labels"),
                               trim_padding(ids[sel], mask[sel], labels[sel])))
                fresh, where = self._forward(model, sub).tolist(), missing
            for i, v in zip(where, fresh):
                self.values[keys[i]] = v
            self._dirty = True
        return torch.tensor([self.values[k] for k in keys], device=device, dtype=torch.float32)

    def tokens(self, model, batch: dict) -> torch.Tensor:
        """Reference log-prob of every label token, [n, T] right-padded with 0 (the layout of
        ``paft.models.logps.token_matrix``). Memoised in memory only, never written to ``path``: token-level
        losses train on online sampled replies, which never recur across runs."""
        device = batch["input_ids"].device
        keys = batch_keys(batch)
        if self.snapshot_tokens is not None:
            table = self.snapshot_tokens
            if any(k not in table for k in keys):
                raise RuntimeError("reference log-probs of a row missing from the stage snapshot; "
                                   "the stage's rows must all be snapshotted before it trains")
        else:
            table = self.token_values if self.cache else {}
            missing = [k for k in keys if k not in table]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:  # the whole batch: a packed one cannot run a subset, and token rows are rarely reused
                for k, v in zip(keys, self._token_forward(model, batch)):
                    table[k] = v
        rows = [table[k] for k in keys]
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], device=device, dtype=torch.float32)

    def _token_forward(self, model, batch: dict) -> list[list[float]]:
        with reference_forward(model, self.model) as ref:
            return _token_lists(ref, batch)

    def _forward(self, model, batch: dict) -> torch.Tensor:
        with reference_forward(model, self.model) as ref:
            return batch_sequence_logps(ref, batch)[0].detach().float()

    @torch.no_grad()
    def snapshot(self, model, batches: Iterable[dict[str, torch.Tensor]],
                 read: Callable[[object, dict], list[list[float]]] | None = None) -> int:
        """Freeze the current policy (adapter enabled, eval mode) for the rows of ``batches``: as the reference
        (sDPO's stages, online reference "previous"), or as the sampling policy pi_old of an online round.
        ``read(model, batch)`` -> each sequence's per-token values (default: its label-token log-probs; PPO's
        V_old reads the value head the same way)."""
        read = read or _token_lists
        was_training = model.training
        model.eval()
        table: dict[str, list[float]] = {}
        try:
            with self.precision():
                for b in batches:
                    for key, v in zip(batch_keys(b), read(model, b)):
                        table[key] = v
        finally:
            model.train(was_training)
        self.snapshot_tokens = table
        self.snapshot_values = {k: float(sum(v)) for k, v in table.items()}
        return len(table)

    def release_snapshot(self) -> None:
        self.snapshot_values = self.snapshot_tokens = None

    def forget_tokens(self) -> None:
        """Drop the in-memory per-token memo (an online round's sampled replies)."""
        self.token_values = {}

    def save(self) -> None:
        """Write the memo to ``path`` (merged with entries other runs wrote meanwhile). In a branch of several
        ranks every rank calls it (a collective): each computed the rows of its own share of the batches, the
        memos are gathered into every rank's, and rank 0 alone writes the file."""
        if self.path is None or not self.cache:
            return
        if ranks.world_size() > 1:
            shares = ranks.gather((self._dirty, self.values if self._dirty else {}))
            for _, values in shares:
                self.values.update(values)
            self._dirty = any(dirty for dirty, _ in shares)
            if not ranks.is_main():
                self._dirty = False
                return
        if not self._dirty:
            return
        merged = dict(self.values)
        if self.path.is_file():
            try:
                merged = {**json.loads(self.path.read_text())["logps"], **merged}
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        write_json_atomic(self.path, {"format": 1, "logps": merged})
        self._dirty = False


def _token_lists(model, batch: dict) -> list[list[float]]:
    """Each sequence's label-token log-probs, in position order."""
    values, mask = token_matrix(*batch_token_logps(model, batch))
    return [row[m].float().tolist() for row, m in zip(values, mask)]


def batch_keys(batch: dict) -> list[str]:
    """The cache key of each sequence of a batch, the same for the padded and the packed layout."""
    if is_packed(batch):
        return list(batch["sequence_keys"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    return [row_key(ids[i], mask[i], labels[i]) for i in range(ids.shape[0])]


def _weight_files(model_dir: Path) -> list[str]:
    parts = []
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    parts.append((model_dir / "config.json").read_text() if (model_dir / "config.json").is_file() else "")
    return parts


def reference_identity(model_dir: Path, *, dtype: str, bf16: bool, init_adapter: Path | None,
                       adapter: str = "lora") -> str:
    """Key of the reference model: its weight files (name, size, mtime), the merged adapter's weights (or the
    full model the branch starts from), precision, and the adapter kind: a 4-bit (qlora) base gives other
    log-probs than the float one (``lora`` adds nothing, so caches written before the kinds existed stay valid)."""
    # "autocast" marks bf16 caches written since the objectives run under autocast (issue 17): the ones written
    # before, under the same bf16=True key, were computed in fp32 and would mismatch a bf16 policy at step 0
    parts = [f"dtype={dtype}", "bf16=True autocast" if bf16 else "bf16=False", *_weight_files(model_dir)]
    if adapter != "lora":
        parts.append(f"adapter={adapter}")
    if init_adapter is not None:
        if (init_adapter / "adapter_model.safetensors").is_file():
            parts.append("adapter:" + sha256_file(init_adapter / "adapter_model.safetensors"))
        else:  # a full fine-tuned model folder (sft.adapter full)
            parts.append("start-model:" + "|".join(_weight_files(init_adapter)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def reference_cache_path(identity: str) -> Path:
    return cache_root() / "reference" / f"{identity}.json"
