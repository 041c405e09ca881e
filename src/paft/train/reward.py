"""``paft reward``: a Bradley-Terry reward model on preference pairs.

The base causal LM is loaded as ``AutoModelForSequenceClassification`` with one output (a
linear ``score`` head on the last hidden state, newly initialised); LoRA adapts the body and
the head is trained fully (PEFT ``modules_to_save``). The reward of a conversation
(prompt + reply, rendered with the chat template) is the head's output at its last real token
(``paft.models.reward.sequence_rewards``, which also loads a trained one):

    r(x, y) = w^T h_T(x, y)

and the model is fit to the pairs by the Bradley-Terry likelihood (Bradley & Terry 1952; as
the reward model of Stiennon et al. 2020, arXiv 2009.01325, and Ouyang et al. 2022,
arXiv 2203.02155):

    loss = -log sigma(r(x, y_w) - r(x, y_l) - m) + c * (r(x, y_w) + r(x, y_l))^2

with ``m = reward.margin_weight * gap`` (Touvron et al. 2023, Llama 2, arXiv 2307.09288, use
the annotators' rating gap as m): ``gap`` is the score difference s_w - s_l for pairs drawn from
ranked/scored lists and 1 for plain (prompt, chosen, rejected) pairs, which carry no rating. Ranked
lists give every pair of replies with different scores (the K-choose-2 comparisons of Ouyang et
al. 2022), not only best vs worst. And ``c = reward.center_rewards`` (the auxiliary term of Eisenstein et al. 2023,
arXiv 2312.09244, that keeps rewards centred on zero; TRL's ``center_rewards_coefficient``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from paft.config import LoraConfig, PaftConfig
from paft.data.collate import pad_sequences
from paft.data.formats import BinaryExample, PreferenceExample, RankedExample, examples_for_method
from paft.data.loading import load_examples
from paft.data.tokenize import encode_pair
from paft.device import resolve_bf16
from paft.errors import DataError
from paft.io import write_json_atomic
from paft.models import load_tokenizer
from paft.models.generation import eval_mode
from paft.models.reward import load_reward_base, sequence_rewards
from paft.train.lora import attach_lora
from paft.train.trainer import Harness, Report, no_report, start_training


# --------------------------------------------------------------------------- loss and rewards

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float | torch.Tensor = 0.0,
                       center: float = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigma(r_w - r_l - margin) + center * (r_w + r_l)^2`` (see the module docstring).

    ``-log sigma(d)`` is computed as ``softplus(-d)``, exact for margins of any size.
    """
    loss = -F.logsigmoid(chosen - rejected - margin)  # margin: a float or one per pair
    if center:
        loss = loss + center * (chosen + rejected) ** 2
    return loss


@dataclass
class RewardPairCollator:
    """Pairs -> one batch of full sequences: [prompt+chosen for each pair; prompt+rejected for each pair].

    ``gap`` ([B] float) carries each pair's score gap (1 for plain pairs). ``padding_side``
    "right" (training) or "left"; the reward does not depend on it.
    """

    pad_id: int
    padding_side: str = "right"

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        seqs = [r.prompt_ids + r.chosen_ids for r in rows] + [r.prompt_ids + r.rejected_ids for r in rows]
        batch = pad_sequences(seqs, self.pad_id, self.padding_side)
        batch["gap"] = torch.tensor([float(getattr(r, "gap", 1.0)) for r in rows])
        return batch


@dataclass
class RewardObjective:
    """PaftTrainer objective: Bradley-Terry loss on a ``RewardPairCollator`` batch (chosen rows first)."""

    margin: float = 0.0
    center: float = 0.0

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        margin = self.margin * batch["gap"].to(rewards) if self.margin and "gap" in batch else self.margin
        loss = bradley_terry_loss(chosen, rejected, margin=margin, center=self.center).mean()
        c, r = chosen.detach(), rejected.detach()
        return loss, {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
                      "rewards/margin": (c - r).mean().item(), "rewards/accuracy": (c > r).float().mean().item()}


# --------------------------------------------------------------------------- model and data

def attach_reward_lora(model, cfg: LoraConfig, seed: int):
    """LoRA on the body (``cfg.target_modules``), the ``score`` head trained in full (modules_to_save)."""
    return attach_lora(model, cfg, seed, task_type="SEQ_CLS", modules_to_save=["score"])


@dataclass
class RewardRow:
    """One encoded pair and its score gap s_w - s_l (1 for a plain pair)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    gap: float = 1.0


def reward_pairs(data_path: Path | str) -> list[tuple[Any, float]]:
    """``(PreferenceExample, gap)`` for every pair of ``data_path``; unpaired rows are a one-line ``DataError``.

    Plain pairs have gap 1. A ranked/scored list gives every pair of distinct replies with
    different scores, chosen = the higher-scored one, gap = the score difference.
    """
    examples = load_examples(str(data_path), "preference").examples
    if any(isinstance(e, BinaryExample) for e in examples):
        raise DataError(f"{data_path}: paft reward trains on pairs (prompt, chosen, rejected) or ranked lists; this "
                        "file has unpaired rows (prompt, completion, label), from which no pair can be formed")
    if examples and all(isinstance(e, RankedExample) for e in examples):
        out = [(PreferenceExample(prompt=e.prompt, chosen=e.responses[i], rejected=e.responses[j]),
                float(e.scores[i] - e.scores[j]))
               for e in examples for i in range(len(e.responses)) for j in range(len(e.responses))
               if e.scores[i] > e.scores[j] and e.responses[i] != e.responses[j]]
        if not out:
            raise DataError(f"{data_path}: every ranked list has equal scores; no pair to train a reward model on")
        return out
    return [(e, 1.0) for e in examples_for_method(examples, "pairs", method="reward", source=str(data_path))]


def encode_pairs(pairs: list, tok, max_length: int, max_prompt_length: int) -> list[RewardRow]:
    """``reward_pairs`` output (or bare ``PreferenceExample`` rows, gap 1) -> ``RewardRow`` token ids."""
    out = []
    for item in pairs:
        e, gap = item if isinstance(item, tuple) else (item, 1.0)
        enc = encode_pair(e, tok, max_length, max_prompt_length)
        out.append(RewardRow(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, gap))
    return out


def pair_rewards(model, rows: list, pad_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and of the rejected reply of each encoded pair (eval mode, no grad)."""
    device = next(model.parameters()).device
    collate = RewardPairCollator(pad_id)
    chosen, rejected = [], []
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
            r = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).cpu()
            n = r.shape[0] // 2
            chosen.append(r[:n])
            rejected.append(r[n:])
    return torch.cat(chosen), torch.cat(rejected)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0,
                 center: float = 0.0) -> dict[str, Any]:
    """Pairwise accuracy (share with r_w > r_l), mean margin r_w - r_l, and the mean training loss."""
    return {"pairs": int(chosen.numel()), "accuracy": (chosen > rejected).float().mean().item(),
            "mean_margin": (chosen - rejected).mean().item(), "mean_chosen": chosen.mean().item(),
            "mean_rejected": rejected.mean().item(),
            "loss": bradley_terry_loss(chosen, rejected, margin=margin, center=center).mean().item()}


# --------------------------------------------------------------------------- training

def train_reward(cfg: PaftConfig, model_dir: Path, data_path: Path, out_dir: Path, *, eval_path: Path | None = None,
                 device: str = "cpu", threads: int | None = None, report: Report = no_report,
                 name: str = "reward") -> dict[str, Any]:
    """Train the reward model (``cfg.reward``) on the pairs of ``data_path`` into ``out_dir``.

    Writes ``out_dir/adapter`` (PEFT folder for ``AutoModelForSequenceClassification`` of the base,
    num_labels=1, with the tokenizer), ``out_dir/train_summary.json``, ``out_dir/log_history.json``
    and, with ``eval_path``, ``out_dir/reward_eval.json`` (held-out pairwise accuracy and mean
    margin). A run killed mid-way resumes from the last checkpoint under ``out_dir/checkpoints``.
    """
    start_training(threads, cfg.run.report_to)
    rcfg, d = cfg.reward, cfg.data
    examples = reward_pairs(data_path)  # before any model is loaded
    held = reward_pairs(eval_path) if eval_path is not None and _has_rows(eval_path) else None
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    torch.manual_seed(cfg.run.seed)  # the new score head
    model = load_reward_base(model_dir, pad_token_id=tok.pad_token_id, dtype=cfg.model.dtype, device=device,
                             trust_remote_code=cfg.model.trust_remote_code)
    model = attach_reward_lora(model, rcfg.lora, cfg.run.seed)
    rows = encode_pairs(examples, tok, d.max_length, d.max_prompt_length)

    h = Harness(model, RewardObjective(rcfg.margin_weight, rcfg.center_rewards), rcfg, out_dir, name, report,
                cfg.run.seed, device, resolve_bf16(cfg.run.bf16, device), threads=threads, report_to=cfg.run.report_to)
    result = h.fit(rows, RewardPairCollator(tok.pad_token_id), out_dir / "checkpoints")
    held_out = None
    if held is not None:
        held_rows = encode_pairs(held, tok, d.max_length, d.max_prompt_length)
        chosen, rejected = pair_rewards(model, held_rows, tok.pad_token_id, batch_size=max(rcfg.batch_size, 8))
        margin = rcfg.margin_weight * torch.tensor([r.gap for r in held_rows])
        held_out = {"data": str(eval_path), **pair_metrics(chosen, rejected, margin, rcfg.center_rewards)}
        write_json_atomic(out_dir / "reward_eval.json", held_out)
    h.save(out_dir / "adapter", tok)
    return h.finish({
        "branch": name, "kind": "reward", "base_model": str(model_dir), "steps": result["steps"],
        "examples": len(rows), "train_loss": result["train_loss"],
        "eval_accuracy": held_out["accuracy"] if held_out else None,
        "eval_mean_margin": held_out["mean_margin"] if held_out else None,
        "eval_pairs": held_out["pairs"] if held_out else 0,
        "margin_weight": rcfg.margin_weight, "center_rewards": rcfg.center_rewards,
        "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
    })


def _has_rows(path: Path) -> bool:
    """False for a missing or blank file (the pipeline writes an empty held-out split as a blank line)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    return p.suffix not in (".jsonl", ".json") or bool(p.read_text(encoding="utf-8").strip())
