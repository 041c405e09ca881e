"""Data kinds and the preference objective: policy and reference log-probs of the batch's replies, then a
registered loss.

The reference is the same model with its LoRA adapter disabled (no second copy in
memory); for the sequential baseline the adapter sits on the SFT-merged weights, so
disabling it gives the SFT model, as sequential DPO expects.

``DATA_KINDS`` holds, per data kind (``LossSpec.data``, or ``sft``), how an example becomes a row, which
collator batches the rows and how the objective reads a batch:

- ``pairs`` / ``online`` (``PairCollator``): [chosen rows; rejected rows] -> ``PairLogps`` (online methods
  train on the pairs each round builds; the file gives only prompts).
- ``binary`` / ``negatives`` (``BinaryCollator``): B matched rows (prompt_i + completion_i), for
  KTO followed by B mismatched "KL" rows (prompt_{i+1 mod B} + completion_i), and ``desirable``
  ([B] bool) -> ``UnpairedLogps``. Only the matched rows carry gradient: the policy's KL rows
  run under ``no_grad`` (KTO detaches the KL estimate anyway).
- ``groups`` (``RankedCollator``, as ``ranked``): the K sampled replies of each prompt with their rewards as
  ``scores``, built each online round; token-level losses (GRPO) also get [B, K, T] per-token log-probs.
- ``rewarded`` (``BinaryCollator`` without KL rows): B rows with their ``rewards`` ([B] float) -> ``UnpairedLogps``
  (DRO's single trajectories).
- ``ranked`` (``RankedCollator``): every reply of every list as one flat batch of N rows (list 0's
  replies, then list 1's...), ``list_index`` ([B, K], the row of reply k of list b, -1 past a
  shorter list) and ``scores`` ([B, K]) -> ``RankedLogps`` ([B, K], masked where ``list_index``
  is -1).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from paft.data.formats import PreferenceExample, RankedExample
from paft.data.collate import BinaryCollator, PairCollator, RankedCollator, SFTCollator
from paft.data.packing import is_packed
from paft.data.tokenize import IGNORE, encode_completion, encode_pair, encode_ranked, encode_sft
from paft.methods.losses import PairLogps, RankedLogps, UnpairedLogps, get_loss
from paft.methods.schedules import best_worst
from paft.models.logps import (batch_sequence_logps, batch_token_logps, label_hidden, label_log_softmax, label_logps,
                               sequence_sums, token_matrix, trim_padding)
from paft.models.reference import ReferenceLogps, reference_forward


def _pairs(obj: "PreferenceObjective", model, batch):
    if obj.spec.token_level:
        return _token_level_pairs(obj, model, batch)
    logps, counts = batch_sequence_logps(model, batch, obj.full_logits)
    n = logps.shape[0] // 2
    lp = PairLogps(policy_chosen=logps[:n], policy_rejected=logps[n:],
                   chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    if obj.spec.reference:
        ref = obj.reference_logps(model, batch)
        lp.ref_chosen, lp.ref_rejected = ref[:n].detach(), ref[n:].detach()
    return lp, _pair_metrics(lp, obj.beta)


def _token_level_pairs(obj: "PreferenceObjective", model, batch):
    """Pairs with each reply's sequential KL(pi_ref || pi_theta) (TDPO): the full next-token distributions of the
    policy and the reference (adapter disabled, or the frozen copy of full fine-tuning) at every reply position."""
    logprobs, targets, seq, n_seq = label_log_softmax(model, batch)
    with reference_forward(model, getattr(obj.reference, "model", None)) as ref_model:
        ref_logprobs = label_log_softmax(ref_model, batch)[0]
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    pick = lambda lps: lps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    logps, counts = sequence_sums(pick(logprobs), seq, n_seq)
    ref = sequence_sums(pick(ref_logprobs), seq, n_seq)[0]
    seq_kl = sequence_sums(kl, seq, n_seq)[0]
    n = n_seq // 2
    lp = PairLogps(policy_chosen=logps[:n], policy_rejected=logps[n:], ref_chosen=ref[:n], ref_rejected=ref[n:],
                   chosen_tokens=counts[:n], rejected_tokens=counts[n:], seq_kl_chosen=seq_kl[:n],
                   seq_kl_rejected=seq_kl[n:])
    metrics = _pair_metrics(lp, obj.beta)
    metrics["kl/chosen"], metrics["kl/rejected"] = seq_kl[:n].mean().item(), seq_kl[n:].mean().item()
    return lp, metrics


def _unpaired(obj: "PreferenceObjective", model, batch):
    if is_packed(batch):
        raise ValueError("unpaired (KTO-style) batches are not packed; build them with BinaryCollator")
    desirable = batch["desirable"].bool()
    n = desirable.shape[0]
    matched = _rows(batch, 0, n)
    has_kl = batch["input_ids"].shape[0] > n
    policy, counts = batch_sequence_logps(model, matched, obj.full_logits)
    lp = UnpairedLogps(policy=policy, labels=desirable, tokens=counts, rewards=batch.get("rewards"))
    if has_kl:
        kl_rows = _rows(batch, n, batch["input_ids"].shape[0])
        with torch.no_grad():
            lp.policy_kl = batch_sequence_logps(model, kl_rows, obj.full_logits)[0].detach()
    if obj.spec.reference:
        ref = obj.reference_logps(model, batch)
        lp.ref = ref[:n].detach()
        if has_kl:
            lp.ref_kl = ref[n:].detach()
    return lp, _unpaired_metrics(lp, obj.beta)


def _ranked(obj: "PreferenceObjective", model, batch):
    index = batch["list_index"]
    present = index >= 0
    rows = index.clamp(min=0)  # padded entries read row 0; the mask keeps them out of the loss
    values = None
    if obj.spec.value_head:  # one decoder pass feeds the LM head and the value head
        hidden, targets, seq, n = label_hidden(model, batch)
        flat = (label_logps(model, hidden, targets), seq, n)
        values = _values(model, hidden)
    else:
        flat = batch_token_logps(model, batch, obj.full_logits)
    logps, counts = sequence_sums(*flat)
    lp = RankedLogps(policy=logps[rows], scores=batch["scores"].to(logps.dtype), mask=present, tokens=counts[rows])
    if obj.spec.token_level:
        tokens, mask = token_matrix(*flat)
        gone = ~present[:, :, None]
        lp.policy_tokens, lp.token_mask = tokens[rows], mask[rows] & ~gone
        if obj.spec.reference:  # one reference forward: each reply's sum is the sum of its tokens
            ref_tokens = obj.reference_token_logps(model, batch).detach()
            lp.ref, lp.ref_tokens = ref_tokens.sum(-1)[rows], ref_tokens.to(tokens.dtype)[rows]
        if values is not None:
            lp.values = token_matrix(values, flat[1], flat[2])[0][rows]
    elif obj.spec.reference:
        lp.ref = obj.reference_logps(model, batch).detach()[rows]
    if obj.old is not None:  # the round's sampling policy, frozen before it trained (``start_round``)
        old = obj.old.tokens(model, batch)
        lp.old = old.sum(-1).to(logps.dtype)[rows]
        if obj.spec.token_level:
            lp.old_tokens = old.to(logps.dtype)[rows]
    if obj.old_values is not None:
        lp.old_values = obj.old_values.tokens(model, batch).to(logps.dtype)[rows]
    return lp, _ranked_metrics(lp, obj.beta)


VALUE_HEAD = "paft_value_head"


def attach_value_head(model) -> None:
    """Give ``model`` PPO's critic: a scalar linear head on the last hidden state, zero-initialised (V = 0 at the
    start), float32, trained with the adapter. A PEFT model saves only its adapter, so the head never reaches the
    adapter folder that PAFT merges, nor the Trainer's checkpoints (which do hold its Adam moments): a resumed
    run starts it from zero."""
    if getattr(model, VALUE_HEAD, None) is None:
        head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        model.add_module(VALUE_HEAD, head)


def _values(model, hidden: torch.Tensor) -> torch.Tensor:
    """V(s_t) at every position of ``hidden`` ([N, H] -> [N]), in float32: outside autocast, which would run the
    head's matmul in bf16."""
    with torch.autocast(hidden.device.type, enabled=False):
        return value_head(model)(hidden.float()).squeeze(-1)


def _value_lists(model, batch) -> list[list[float]]:
    """Each sequence's V(s_t) at its label positions, in position order (``ReferenceLogps.snapshot``'s reader)."""
    hidden, _, seq, n = label_hidden(model, batch)
    values, mask = token_matrix(_values(model, hidden), seq, n)
    return [row[m].tolist() for row, m in zip(values, mask)]


def value_head(model) -> torch.nn.Module:
    head = getattr(model, VALUE_HEAD, None)
    if head is None:
        raise ValueError("this method reads a value head; attach_value_head(model) before training")
    return head


@dataclass(frozen=True)
class DataKind:
    """One data kind: ``encode(example, tok, data_cfg)`` -> row, ``collator(pad_id, pack_length, max_length)``,
    ``keep(row)`` (rows with nothing to learn are dropped) and ``logps(objective, model, batch)`` -> (the loss's
    log-probs, metrics) for preference kinds. Sampled kinds (online rounds; the file gives only prompts) also
    have ``from_samples(prompt, replies, scores)`` -> the example a round trains on (None: nothing to learn),
    ``unit`` naming those examples, ``unit_needs`` what one needs (for the warning when a round has none) and
    ``record(example)`` -> extra fields of the round's ``samples.jsonl`` record. ``batch_estimate``: why the
    loss needs at least two rows per batch (an estimate across the batch's rows), None when it does not; such
    kinds train on full batches only (an epoch's last, smaller one is dropped)."""

    encode: Callable | None
    collator: Callable[[int, int | None, int], Any]
    logps: Callable | None = None
    keep: Callable[[Any], bool] = lambda row: True
    from_samples: Callable[[list, list[str], list[float]], Any] | None = None
    unit: str = "rows"
    unit_needs: str = ""
    record: Callable[[Any], dict] = lambda example: {}
    batch_estimate: str | None = None


def _encode_prompted(fn):
    return lambda e, tok, d: fn(e, tok, d.max_length, d.max_prompt_length)


def _pair_collator(pad_id, pack_length, max_length):
    return PairCollator(pad_id, pack_length)


def _best_worst_pair(prompt, replies: list[str], scores: list[float]) -> PreferenceExample | None:
    pair = best_worst(replies, scores) if len(replies) >= 2 else None
    return None if pair is None else PreferenceExample(prompt=prompt, chosen=pair[0], rejected=pair[1])


def _pair_record(ex: PreferenceExample | None) -> dict:
    """Which two replies were paired (a group trains on every reply in "used")."""
    return {"pair": None if ex is None else {"chosen": ex.chosen, "rejected": ex.rejected}}


def _group(prompt, replies: list[str], scores: list[float]) -> RankedExample | None:
    # equal rewards still train: the KL term (and, for RLOO, the KL-shaped reward) moves the policy
    return RankedExample(prompt=prompt, responses=list(replies), scores=list(scores)) if len(replies) >= 2 else None


DATA_KINDS: dict[str, DataKind] = {
    "sft": DataKind(lambda e, tok, d: encode_sft(e, tok, d.max_length), lambda p, n, m: SFTCollator(p, n),
                    keep=lambda r: any(t != IGNORE for t in r.labels[1:])),  # a reply cut off by max_length
    "pairs": DataKind(_encode_prompted(encode_pair), _pair_collator, _pairs),
    "online": DataKind(_encode_prompted(encode_pair), _pair_collator, _pairs, from_samples=_best_worst_pair,
                       unit="pairs", unit_needs="every prompt's replies scored equally", record=_pair_record),
    "groups": DataKind(_encode_prompted(encode_ranked), lambda p, n, m: RankedCollator(p, n), _ranked,
                       from_samples=_group, unit="groups", unit_needs="a group needs at least 2 replies per prompt"),
    "binary": DataKind(_encode_prompted(encode_completion), lambda p, n, m: BinaryCollator(p, kl=True, max_length=m),
                       _unpaired,
                       batch_estimate="its KL estimate pairs each completion with another row's prompt in the batch"),
    "negatives": DataKind(_encode_prompted(encode_completion),
                          lambda p, n, m: BinaryCollator(p, kl=False, max_length=m), _unpaired),
    "rewarded": DataKind(_encode_prompted(encode_completion),
                         lambda p, n, m: BinaryCollator(p, kl=False, max_length=m), _unpaired,
                         batch_estimate="its value estimate is the batch's mean (a row alone has residual 0)"),
    "ranked": DataKind(_encode_prompted(encode_ranked), lambda p, n, m: RankedCollator(p, n), _ranked),
}


@dataclass
class PreferenceObjective:
    method: str = "dpo"
    beta: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)
    # memoised / disk-cached reference log-probs (paft.models.reference); None: the adapter-disabled forward
    reference: Any = None
    full_logits: bool = False  # the plain path: full-vocabulary logits at every position
    # during an online round of a ratio method (``LossSpec.ratio``): snapshots (``ReferenceLogps``) of the
    # round's sampling policy pi_old, and of its value head V_old for PPO; None outside a round
    old: Any = None
    old_values: Any = None

    def __post_init__(self):
        self.spec = get_loss(self.method)
        self.kwargs, self.schedule = self.spec.configure(self.params)
        self.kind = DATA_KINDS[self.spec.data]

    def __call__(self, model, batch):
        lp, metrics = self.kind.logps(self, model, batch)
        return self.spec.fn(lp, beta=self.beta, **self.kwargs).mean(), metrics

    def start_round(self, model, batches: list) -> None:
        """Before an online round trains on ``batches`` (sampled by the current policy): freeze that policy as
        pi_old (and its values as V_old) for ratio methods. A round takes several optimiser steps on its
        groups, so from the second on the ratio pi_theta / pi_old and its clip are real (TRL does the same
        with ``num_iterations`` > 1). The snapshot computes in the training step's precision (the reference's
        autocast), so rho at the first step is 1 up to float rounding."""
        if not self.spec.ratio:
            return
        precision = self.reference.precision if self.reference is not None else contextlib.nullcontext
        self.old = ReferenceLogps(None, cache=False, precision=precision)
        self.old.snapshot(model, batches)
        if self.spec.value_head:
            self.old_values = ReferenceLogps(None, cache=False, precision=precision)
            self.old_values.snapshot(model, batches, read=_value_lists)

    def end_round(self) -> None:
        """Drop the round's snapshots and the reference's per-token memo of its sampled replies."""
        self.old = self.old_values = None
        if self.reference is not None:
            self.reference.forget_tokens()

    def reference_logps(self, model, batch) -> torch.Tensor:
        """Summed reference log-prob of each sequence of the batch (no gradient): cached, or the
        adapter-disabled forward."""
        if self.reference is not None:
            return self.reference(model, batch)
        with reference_forward(model) as ref:
            return batch_sequence_logps(ref, batch, self.full_logits)[0].detach()

    def reference_token_logps(self, model, batch) -> torch.Tensor:
        """Reference log-prob of every label token, [n, T] right-padded (``token_matrix``'s layout)."""
        if self.reference is not None:
            return self.reference.tokens(model, batch)
        with reference_forward(model) as ref:
            return token_matrix(*batch_token_logps(ref, batch, self.full_logits))[0].detach()


def _rows(batch, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a padded batch, with the columns past their longest row cut off."""
    keys = ("input_ids", "attention_mask", "labels")
    return dict(zip(keys, trim_padding(*(batch[k][start:stop] for k in keys))))


def _pair_metrics(lp: PairLogps, beta: float) -> dict[str, float]:
    out = {"logps/chosen": lp.policy_chosen.mean().item(), "logps/rejected": lp.policy_rejected.mean().item()}
    if lp.ref_chosen is not None:
        rc = beta * (lp.policy_chosen - lp.ref_chosen).detach()
        rr = beta * (lp.policy_rejected - lp.ref_rejected).detach()
        out.update({"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                    "rewards/margin": (rc - rr).mean().item(), "rewards/accuracy": (rc > rr).float().mean().item()})
    return out


def _unpaired_metrics(lp: UnpairedLogps, beta: float) -> dict[str, float]:
    """Means over the desirable / undesirable rows present in the batch (a key is absent when none is)."""
    out: dict[str, float] = {}
    pos, neg = lp.labels, ~lp.labels
    policy = lp.policy.detach()
    for name, sel in (("desirable", pos), ("undesirable", neg)):
        if sel.any():
            out[f"logps/{name}"] = policy[sel].mean().item()
            if lp.ref is not None:
                out[f"rewards/{name}"] = (beta * (policy[sel] - lp.ref[sel])).mean().item()
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
    if lp.policy_kl is not None and lp.ref_kl is not None:
        out["kl"] = (lp.policy_kl - lp.ref_kl).mean().clamp(min=0).item()
    return out


def _ranked_metrics(lp: RankedLogps, beta: float) -> dict[str, float]:
    """``rank/top1_accuracy``: share of lists whose top-scored reply (any of them on a tie) also has the
    highest model score the loss ranks by: beta h(y) with a reference (LiPO), else the
    length-normalised log-prob (RRHF, PRO). Plus the mean policy log-prob over all replies, of the
    top- and of the lowest-scored reply, the mean score (for groups: the scorer's mean reward, which RLOO's and
    GRPO's near-zero loss does not show) and, with a reference, the mean implicit reward beta h(y)."""
    m = lp.mask.bool()
    policy = lp.policy.detach()
    if lp.ref is not None:
        model_score = beta * (policy - lp.ref)
    else:
        model_score = policy / lp.tokens.to(policy.dtype).clamp(min=1)
    neg_inf = torch.full_like(model_score, -torch.inf)
    scores = torch.where(m, lp.scores, neg_inf)
    top = model_score.masked_fill(~m, -torch.inf).argmax(dim=1, keepdim=True)
    hit = scores.gather(1, top).squeeze(1) == scores.max(dim=1).values
    best = scores.argmax(dim=1, keepdim=True)
    worst = torch.where(m, lp.scores, -neg_inf).argmin(dim=1, keepdim=True)
    out = {"rank/top1_accuracy": hit.float().mean().item(), "scores/mean": lp.scores[m].mean().item(),
           "logps/mean": policy[m].mean().item(),
           "logps/best": policy.gather(1, best).mean().item(),
           "logps/worst": policy.gather(1, worst).mean().item()}
    if lp.ref is not None:
        out["rewards/mean"] = model_score[m].mean().item()
    return out
