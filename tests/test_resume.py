"""Resume after a kill: a half-written checkpoint is skipped and reported, and a fit that ends at its final
checkpoint is not trained one step further. The kill is real: a child process SIGKILLs itself in the middle
of writing a checkpoint (after the weights, before the optimizer state and trainer_state.json)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

FIT = r'''
import json, os, signal, sys
from pathlib import Path
import torch
from transformers import Trainer
from paft.config import TrainConfig
from paft.models import load_model
from paft.train.trainer import Harness

model_dir, out, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kill_at:
    real = Trainer._save_optimizer_and_scheduler
    def killed(self, output_dir):
        if self.state.global_step == kill_at:  # the weights of checkpoint-N are on disk, nothing else
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, output_dir)
    Trainer._save_optimizer_and_scheduler = killed

def objective(model, batch):
    loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    return loss, {"nll": loss.item()}

rows = [{"input_ids": torch.tensor([1, 5 + i, 7, 9, 11])} for i in range(8)]
notes = []
cfg = TrainConfig(max_steps=6, batch_size=2, logging_steps=1, save_steps=2, learning_rate=1e-3)
h = Harness(load_model(model_dir), objective, cfg, out, "sft", notes.append, seed=0, device="cpu", bf16=False)
res = h.fit(rows, lambda b: {"input_ids": torch.stack([r["input_ids"] for r in b])}, out / "checkpoints")
h.model.save_pretrained(out / "model")
print(json.dumps({"fit": res, "notes": notes}))
'''


def fit(tmp_path, tiny_dir, out, kill_at=0):
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    p = subprocess.run([sys.executable, str(script), str(tiny_dir), str(out), str(kill_at)],
                       capture_output=True, text=True, timeout=300)
    return p, (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None)


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same(a, b):
    # resume restores the data order, RNG, optimizer and schedule: on CPU the result matches to float rounding
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    p, res = fit(tmp, tiny_dir, tmp / "run")
    assert p.returncode == 0, p.stderr
    return tmp / "run", res


def test_killed_during_a_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, tiny_dir, reference):
    out = tmp_path / "run"
    p, _ = fit(tmp_path, tiny_dir, out, kill_at=4)
    assert p.returncode == -9  # SIGKILL while checkpoint-4 was half-written ...
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert sorted(d.name for d in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]  # ... and is not visible

    p, res = fit(tmp_path, tiny_dir, out)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert not any("warning" in n for n in res["notes"])
    assert sorted(d.name for d in ckpts.iterdir()) == ["checkpoint-6"]  # the partial write is cleared
    ref_out, ref = reference
    assert res["fit"]["steps"] == ref["fit"]["steps"] == 6
    assert_same(weights(out), weights(ref_out))
    log = json.loads((ckpts / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    ref_log = json.loads((ref_out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in log if "loss" in e] == pytest.approx([e["loss"] for e in ref_log if "loss" in e],
                                                                     abs=1e-6)


def test_an_incomplete_checkpoint_in_place_is_skipped_and_reported(tmp_path, tiny_dir, reference):
    """A checkpoint written in place (several ranks, or an older paft) and cut short: the one before it is used."""
    import shutil

    ref_out, ref = reference
    out = tmp_path / "run"
    p, _ = fit(tmp_path, tiny_dir, out, kill_at=4)
    half = out / "checkpoints" / "checkpoint-4"
    shutil.move(out / "checkpoints" / ".tmp-checkpoint-4" / "checkpoint-4", half)
    p, res = fit(tmp_path, tiny_dir, out)
    assert p.returncode == 0, p.stderr
    assert [n["warning"] for n in res["notes"] if "warning" in n] == [
        f"skipping incomplete checkpoint {half}: no trainer_state.json (killed while it was being written); removed"]
    assert res["fit"]["steps"] == 6
    assert_same(weights(out), weights(ref_out))


def test_a_truncated_trainer_state_is_skipped(tmp_path):
    from paft.train.trainer import last_checkpoint

    for n in (2, 4):
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        (d / "optimizer.pt").write_bytes(b"x")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    notes = []
    assert last_checkpoint(tmp_path, notes.append, "dpo") == str(tmp_path / "checkpoint-2")
    assert notes == [{"branch": "dpo", "warning": f"skipping incomplete checkpoint {tmp_path / 'checkpoint-4'}: "
                      "trainer_state.json is truncated or not a Trainer state (killed while it was being written); "
                      "removed"}]
    assert not (tmp_path / "checkpoint-4").exists()
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    assert last_checkpoint(tmp_path) is None


def test_resuming_from_the_final_checkpoint_trains_no_extra_step(tmp_path, tiny_dir, reference):
    import shutil

    ref_out, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")  # killed after its last checkpoint
    p, res = fit(tmp_path, tiny_dir, out)
    assert p.returncode == 0, p.stderr
    assert res["fit"]["steps"] == 6  # the Trainer alone would train a 7th step
    assert res["fit"]["train_loss"] == pytest.approx(ref["fit"]["train_loss"], abs=1e-6)
    assert [n["step"] for n in res["notes"] if "step" in n] == [6]
    assert_same(weights(out), weights(ref_out))
