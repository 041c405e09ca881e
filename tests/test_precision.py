"""bf16 training: the objectives run under autocast, and the losses equal the fp32 path's within bf16 rounding.

accelerate's autocast wraps only ``model.forward``; paft's objectives call the decoder and the LM head
themselves, so until ``PaftTrainer.compute_loss`` entered ``accelerator.autocast()`` a ``run.bf16: true`` branch
trained in fp32 (issue 17). These tests fail if that regresses.
"""

import json

import pytest
import torch

from paft.config import load_config
from paft.pipeline import Run

# bf16 keeps 8 bits of mantissa: each logit is rounded by ~0.4 %, and the mean NLL over a few hundred
# completion tokens moves by well under 1 %. The DPO loss starts at ln 2 exactly (policy = reference) in both.
REL_TOL = 0.01


def _train(tmp_path, branch, bf16, *extra):
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / f'{branch}-{bf16}'}", f"run.bf16={bf16}",
                                                f"{branch}.max_steps=3", f"{branch}.save_steps=3",
                                                f"{branch}.logging_steps=1", *extra])
    run = Run(cfg)
    run.prepare()
    seen: set[torch.dtype] = set()
    real = torch.nn.Linear.forward

    def spy(self, x):
        out = real(self, x)
        seen.add(out.dtype)
        return out

    torch.nn.Linear.forward = spy
    try:
        summary = run.train([branch])[branch]
    finally:
        torch.nn.Linear.forward = real
    history = json.loads((run.branch_dir(branch) / "log_history.json").read_text())
    return summary, [e["loss"] for e in history if "loss" in e], seen


@pytest.mark.parametrize("branch,extra", [("sft", ("sft.l1_lambda=0.001",)), ("preference", ())])
def test_bf16_branch_computes_in_bf16_and_matches_fp32(tmp_path, branch, extra):
    s32, loss32, seen32 = _train(tmp_path, branch, False, *extra)
    s16, loss16, seen16 = _train(tmp_path, branch, True, *extra)
    assert s16["bf16"] is True and s32["bf16"] is False
    assert torch.bfloat16 in seen16, "bf16 training ran its linear layers in fp32"
    assert seen32 == {torch.float32}
    assert len(loss16) == len(loss32) == 3
    for a, b in zip(loss16, loss32):
        assert abs(a - b) <= REL_TOL * abs(b), (loss16, loss32)
    assert loss16 != loss32  # the rounding is real: the two paths did not run the same arithmetic


def test_reference_snapshot_computes_in_the_training_precision(lora_model, tiny_tok):
    """A stage or round snapshot runs outside the Trainer; under bf16 it must use the step's autocast, or a
    policy equal to its snapshot starts with a nonzero log-ratio (reviewer's finding on the autocast change)."""
    from paft.data.demo import preference_examples
    from paft.data.tokenize import encode_pair
    from paft.device import autocast
    from paft.models.logps import batch_sequence_logps
    from paft.train.phases import collate_all
    from paft.train.preference import DATA_KINDS
    from paft.models.reference import ReferenceLogps

    model = lora_model
    rows = [encode_pair(e, tiny_tok, 128, 96) for e in preference_examples(6, 0)]
    batch = next(collate_all(DATA_KINDS["pairs"].collator(tiny_tok.pad_token_id, 512, 128), rows, 6))
    with torch.no_grad(), autocast("cpu", True):  # what the training step computes for the policy
        policy = batch_sequence_logps(model, batch)[0].float()
    for precision, close in ((lambda: autocast("cpu", True), True), (None, False)):
        ref = ReferenceLogps(None, **({"precision": precision} if precision else {}))
        ref.snapshot(model, [batch])
        gap = (ref(model, batch) - policy).abs().max().item()
        # the same arithmetic up to float32 rounding of a ~-500 nat sum (one ulp is 3e-5); fp32 is 100x off
        assert (gap < 1e-4) if close else (gap > 1e-2), gap
