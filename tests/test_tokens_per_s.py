"""Real (non-pad) tokens per second in the progress lines (issue 16, class 7)."""

import re

import torch
from typer.testing import CliRunner

from paft.cli import app
from paft.data.collate import pad_sequences
from paft.data.packing import Doc, pack, real_tokens

runner = CliRunner()


def test_real_tokens_leave_out_padding_and_count_a_shared_prompt_once():
    padded = pad_sequences([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert padded["input_ids"].numel() == 9 and int(real_tokens(padded)) == 6
    # two documents: a 3-token prompt with replies of 2 and 1 tokens (6 tokens), a 4-token SFT example
    docs = [Doc([1, 2, 3], [-100] * 3, [[4, 5], [6]], [[4, 5], [6]], [0, 1]), Doc([7, 8, 9, 10], [-100, 8, 9, 10],
                                                                                   seq_ids=[2])]
    packed = pack(docs, pad_id=0, pack_length=6)  # one row each, the second padded to width 6
    assert packed["input_ids"].numel() == 12 and int(real_tokens(packed)) == 10
    assert int(real_tokens({"input_ids": torch.zeros(2, 5, dtype=torch.long)})) == 10  # no mask: every token


def test_plain_progress_lines_show_tokens_per_s(tmp_path, paft_cache):
    args = ["sft", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "run.report_to=[]",
            "--set", "sft.max_steps=6", "--set", "sft.logging_steps=1", "--set", "run.log_every_s=0.001"]
    result = runner.invoke(app, args)  # output captured: not a terminal, so plain lines
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("train sft:")]
    rates = [float(m.group(1)) for ln in lines if (m := re.search(r", (\d+) tokens/s, ", ln))]
    assert rates and all(r > 0 for r in rates), lines
    last_running = [ln for ln in lines if "tokens/s" in ln and "ETA" in ln]
    assert last_running and re.search(r"loss \d+\.\d{4}, \d+ tokens/s, [\d.]+ it/s, ETA \d+s", last_running[-1])
