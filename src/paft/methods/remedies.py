"""Trained alignment-tax remedies as data: one frozen :class:`Remedy` row each (docs/trained-candidates.md).

Unlike the training-free candidates (``paft.methods.candidates``), each remedy trains one more branch.
The pipeline adds every configured row (``candidates.trained.names``) to its branch table, so the branch
trains, resumes and is costed like the main ones, and its model is scored into ``candidates.json``
beside the training-free candidates. A row says what the branch trains on (``data``: the run's
``sft`` or ``preference`` split, and the config section, ``section``, whose training knobs it uses),
which branch it starts from (``after``), which objective (``objective``: a key of
``paft.train.branch.BRANCH_KINDS``), its per-step merge (``online``: ``dare`` or ``ties``,
``paft.train.online_merge``), the config values it overrides (``overrides``) and how its model is
formed (``merge``: the branches merged with the run's ``merge`` section; empty: the branch's own
output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Remedy:
    name: str  # the config name (candidates.trained.names) and the branch folder RUN/<branch>
    model: str  # the evaluated model's name in candidates.json
    what: str  # equation and paper: its line in docs/trained-candidates.md
    data: str  # data split the branch trains on: "sft" or "preference" (RUN/data/<data>_train.jsonl)
    section: str  # the config section of its training knobs (learning rate, steps, adapter)
    objective: str  # a key of paft.train.branch.BRANCH_KINDS
    after: str | None = None  # the branch whose output it starts from
    online: str | None = None  # per-step merge with the SFT delta: "dare" or "ties" (paft.train.online_merge)
    overrides: tuple[tuple[str, Any], ...] = ()  # dotted config keys set for this branch only
    merge: tuple[str, ...] = ()  # branches merged with the run's merge section into its model; () its own output
    needs: tuple[str, ...] = ()  # trained branches its cost adds up (its own branch included)
    alone: str | None = None  # a merged remedy's branch scored on its own too, as this model (no_l1: plain SFT)

    @property
    def branch(self) -> str:
        return self.name


#: every trained remedy, by config name
REMEDIES: dict[str, Remedy] = {r.name: r for r in (
    Remedy("joint", "joint",
           "Joint training: `L = L_pref(preference batch) + gamma * NLL(SFT batch)` from the base, one branch "
           "(RPO / LLaMA-Factory pref_ftx style: Pang et al. 2024, Iterative Reasoning Preference Optimization, "
           "arXiv 2404.19733; here the NLL term is on the SFT data rather than the chosen replies).",
           data="preference", section="preference", objective="joint", needs=("joint",)),
    Remedy("online_dare", "online_dare",
           "OnDARE online merging: preference training from the SFT model whose every optimizer step is "
           "`theta_t = theta_{t-1} + alpha tau_sft + (1 - alpha) m_t * delta_t / p`, `m_t ~ Bernoulli(p)` "
           "(Lu et al. 2024, Online Merging Optimizers for Boosting Rewards and Mitigating Tax in Alignment, "
           "arXiv 2405.17931).",
           data="preference", section="preference", objective="preference", after="sft", online="dare",
           needs=("sft", "online_dare")),
    Remedy("online_ties", "online_ties",
           "OnTIES online merging: each optimizer step's update trimmed to the top `density` by magnitude, signs "
           "elected against the (trimmed) SFT delta and merged disjointly: `theta_t = theta_{t-1} + alpha "
           "[tau]_s + (1 - alpha) [trim(delta_t)]_s` (Lu et al. 2024, arXiv 2405.17931).",
           data="preference", section="preference", objective="preference", after="sft", online="ties",
           needs=("sft", "online_ties")),
    Remedy("no_l1", "paft_no_l1",
           "PAFT without sparsity: the SFT branch trained with `sft.l1_lambda = 0`, merged with the preference "
           "branch exactly as the paft model (the PAFT paper's 'parallel merge without sparsity' baseline: "
           "PAFT, A Parallel Training Paradigm for Effective LLM Fine-Tuning, arXiv 2406.17923).",
           data="sft", section="sft", objective="sft", overrides=(("sft.l1_lambda", 0.0),),
           merge=("no_l1", "preference"), needs=("no_l1", "preference"), alone="sft_no_l1"),
)}


def remedy_branches(names: list[str]) -> dict[str, tuple[str, str | None]]:
    """The configured remedies as rows of the pipeline's branch table: branch -> (data kind, start branch)."""
    return {REMEDIES[n].branch: (REMEDIES[n].data, REMEDIES[n].after) for n in names}
