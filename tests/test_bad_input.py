"""Bad input through the real CLI (issue 16, classes 6 and 7): every case ends with exit code 1 and ONE line
``error: ...`` that names the file, row or key and the fix; never a traceback.

Each row of ``CASES`` builds its input in ``tmp_path`` (hand-made files on the tiny model; nothing is trained) and
lists the words the error line must hold.
"""

import errno
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import paft.io
from paft.cli import app
from paft.config import read_run_config
from paft.errors import DataError, ModelError

runner = CliRunner()
TINY = ["--preset", "tiny"]


def _error_line(result) -> str:
    out = result.output or ""
    assert "Traceback" not in out, out
    assert result.exit_code == 1, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


# ------------------------------------------------------------------ inputs

def _lora_folder(path: Path, base: Path) -> Path:
    """A LoRA adapter folder's config (the weights are the test's business)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return path


def _spoil(weights: Path, how: str) -> None:
    if how == "truncated":  # cut mid-file, as an interrupted copy leaves it
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(os.urandom(4096))


def _bad_folder(tmp_path, tiny_dir, kind: str, how: str) -> tuple[Path, Path]:
    """(the folder to pass, its spoiled safetensors file): a copy of the tiny model, or an adapter folder."""
    if kind == "model":
        folder = tmp_path / "model"
        shutil.copytree(tiny_dir, folder)
        weights = folder / "model.safetensors"
    else:
        folder = _lora_folder(tmp_path / "adapter", tiny_dir)
        weights = folder / "adapter_model.safetensors"
        shutil.copy(tiny_dir / "model.safetensors", weights)  # a real safetensors file, then spoiled
    _spoil(weights, how)
    return folder, weights


def _jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines.insert(i, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(n: int = 12) -> list[dict]:
    return [{"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": "no"} for i in range(n)]


def _chats(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


def _hh(i: int, reply: str) -> dict:
    return {"chosen": f"\n\nHuman: question {i}?\n\nAssistant:{reply}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no"}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _damaged_model(tmp_path, tiny_dir, name: str) -> Path:
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    (folder / name).write_text("{garbage")
    return folder


def _damaged_run(tmp_path, text: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    return run


# ------------------------------------------------------------------ the table
# id -> build(tmp_path, tiny_dir) returning (CLI args, words the error line must hold)

def _safetensors_case(command: str, kind: str, how: str):
    def build(tmp_path, tiny_dir):
        folder, weights = _bad_folder(tmp_path, tiny_dir, kind, how)
        out = str(tmp_path / "out")
        args = {"merge": ["merge", "--base", str(tiny_dir), "--models", str(folder), "--method", "task_arithmetic",
                          "--out", out],
                "eval": ["eval", str(folder), *TINY, "--out", out,
                         *(["--base", str(tiny_dir)] if kind == "adapter" else [])],
                "sparsity": ["sparsity", str(folder), "--base", str(tiny_dir), "--out", out]}[command]
        return args, [str(weights), "truncated or corrupt"]
    return build


def _out_is_file(command: str):
    def build(tmp_path, tiny_dir):
        f = tmp_path / "notes.txt"
        f.write_text("mine")
        other = str(shutil.copytree(tiny_dir, tmp_path / "other"))
        args = {"run": ["run", *TINY], "sft": ["sft", *TINY], "merge": ["merge", *TINY],
                "merge --force (flags)": ["merge", "--base", str(tiny_dir), "--models", other, "--force"],
                "eval (folders)": ["eval", str(tiny_dir), *TINY],
                "sparsity --force (flags)": ["sparsity", other, "--base", str(tiny_dir), "--force"]}[command]
        return [*args, "--out", str(f)], [str(f), "is a file, not a folder", "choose another --out"]
    return build


def _damaged_config(command: str, text: str):
    def build(tmp_path, tiny_dir):
        run = _damaged_run(tmp_path, text)
        args = {"sft": ["sft", *TINY, "--out", str(run)], "merge": ["merge", *TINY, "--out", str(run)],
                "report": ["report", str(run)]}[command]
        return args, [str(run / "config.yaml"), "damaged", "--force"]
    return build


def _damaged_summary(tmp_path, tiny_dir):
    """A run folder whose data stage left a summary.json cut short (edited, or copied in part)."""
    from paft.config import load_config

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(None, [f"run.output_dir={run}"], "tiny").to_yaml())
    (run / "data" / "summary.json").write_text('{"sft": {"path": "demo", "tra')
    return ["sft", *TINY, "--out", str(run)], [str(run / "data" / "summary.json"), "damaged",
                                               "pass --force to redo the run from the data stage"]


def _data_case(kind: str, rows_or_file, words, *extra):
    def build(tmp_path, tiny_dir):
        path = rows_or_file(tmp_path)
        command = "sft" if kind == "sft" else "align"
        return [command, *TINY, "--out", str(tmp_path / "run"), "--set", f"data.{kind}.path={path}", *extra], \
            [str(path), *words]
    return build


def _truncated_gz(tmp_path):
    data = gzip.compress(("\n".join(json.dumps(r) for r in _pairs(200)) + "\n").encode())
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


SKIP_FIX = "data.skip_invalid: true"

CASES = {
    **{f"{how} safetensors, {kind}, {command}": _safetensors_case(command, kind, how)
       for how in ("truncated", "garbage") for kind in ("model", "adapter") for command in ("merge", "eval", "sparsity")},
    **{f"--out is a file: {c}": _out_is_file(c)
       for c in ("run", "sft", "merge", "merge --force (flags)", "eval (folders)", "sparsity --force (flags)")},
    **{f"run config.yaml {what}: {c}": _damaged_config(c, text)
       for what, text in (("garbage YAML", "model: [unclosed\n  : : x\n"), ("a list", "- a\n- b\n"))
       for c in ("sft", "merge", "report")},
    "truncated .jsonl.gz": _data_case("preference", _truncated_gz, ["truncated or corrupt gzip", "download it again"]),
    "sft messages start with an assistant turn": _data_case(
        "sft", lambda t: _jsonl(t / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"},
                                                                  *_chats(1)[0]["messages"]]}, *_chats()]),
        ["row 0", "'messages'", "starts with an assistant turn", "open with a user turn", SKIP_FIX]),
    "preference prompt starts with an assistant turn": _data_case(
        "preference", lambda t: _jsonl(t / "p.jsonl", [*_pairs(2), {
            "prompt": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
            "chosen": "a", "rejected": "b"}]),
        ["row 2", "'prompt'", "starts with an assistant turn"]),
    "HH-RLHF row with an empty assistant turn (harmless-base row 103)": _data_case(
        "preference", lambda t: _jsonl(t / "hh.jsonl", [_hh(i, " fine") for i in range(3)] + [_hh(3, "")]),
        ["row 3", "'chosen'", "is empty", SKIP_FIX, "--set data.skip_invalid=true"], "--set", "data.preference.format=hh_rlhf"),
    "invalid JSON line without skip_invalid": _data_case(
        "sft", lambda t: _jsonl(t / "chat.jsonl", _chats(), {3: "{not json"}),
        ["line 4", "invalid JSON", SKIP_FIX]),
    "a .jsonl.gz that is not gzip": _data_case(
        "preference", lambda t: _jsonl(t / "plain.jsonl.gz", _pairs()), ["truncated or corrupt gzip"]),
    "an empty data file": _data_case("sft", lambda t: _write(t / "empty.jsonl", b""), ["no rows"]),
    "one usable row (the rest duplicates)": _data_case(
        "sft", lambda t: _jsonl(t / "chat.jsonl", _chats(1) * 3), ["only 1 usable example", "data.sft.eval_path"]),
    "every row invalid, skip_invalid": _data_case(
        "preference", lambda t: _jsonl(t / "p.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"}] * 2),
        ["none of the 2 rows is valid"], "--set", "data.skip_invalid=true"),
    "damaged data/summary.json": _damaged_summary,
    **{f"model folder with a damaged {name}": (lambda name: lambda t, d: (
        ["sft", *TINY, "--out", str(t / "run"), "--set", f"model.name={_damaged_model(t, d, name)}"],
        [str(t / "model"), "cannot load its tokenizer", "damaged"]))(name) for name in ("config.json", "tokenizer.json")},
    "config file not UTF-8": lambda t, d: (["config", str(_write(t / "c.yaml", b"\xad\xff: 1"))],
                                           [str(t / "c.yaml"), "not UTF-8"]),
    "config file is a folder": lambda t, d: (["run", str(t)], [str(t), "is a folder"]),
    "sft.lr_scheduler: foo": lambda t, d: (["config", *TINY, "--set", "sft.lr_scheduler=foo"],
                                           ["'sft.lr_scheduler'", "'foo'", "cosine"]),
    "preference.params with an unknown key": lambda t, d: (
        ["config", *TINY, "--set", "preference.params={bogus: 1}"], ["preference.params", "'bogus'", "dpo"]),
    "preference.params: beta": lambda t, d: (
        ["config", *TINY, "--set", "preference.method=ipo", "--set", "preference.params={beta: 1}"],
        ["'beta'", "length_normalize", "preference.beta"]),
    "run.device: banana": lambda t, d: (["config", *TINY, "--set", "run.device=banana"],
                                        ["'run.device'", "auto, cpu, cuda"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, tmp_path, tiny_dir):
    args, words = CASES[case](tmp_path, tiny_dir)
    line = _error_line(runner.invoke(app, args))
    for w in words:
        assert w in line, (w, line)


def test_out_file_is_left_alone(tmp_path, tiny_dir):
    """--force on a standalone merge used to rename the user's file to .old-NAME-PID and write a folder there."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    other = shutil.copytree(tiny_dir, tmp_path / "other")
    _error_line(runner.invoke(app, ["merge", "--base", str(tiny_dir), "--models", str(other), "--force",
                                    "--out", str(f)]))
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other"]


def test_run_device_cuda_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _error_line(runner.invoke(app, ["sft", *TINY, "--out", str(tmp_path / "r"), "--set", "run.device=cuda"]))
    assert "run.device 'cuda'" in line and "run.device: auto or cpu" in line
    assert not (tmp_path / "r" / "data").exists()  # refused before the data stage


def test_paft_cache_that_is_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("")
    monkeypatch.setenv("PAFT_CACHE", str(f / "sub"))
    line = _error_line(runner.invoke(app, ["sft", *TINY, "--out", str(tmp_path / "r")]))
    assert "PAFT_CACHE" in line and f"{f} is a file" in line


def test_lr_schedulers_are_transformers_ones_it_builds_without_kwargs():
    """The config's scheduler list (kept there so `paft config` loads no transformers) is transformers' own."""
    import torch
    from transformers.optimization import get_scheduler
    from transformers.trainer_utils import SchedulerType

    from paft.config import LR_SCHEDULERS

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in LR_SCHEDULERS:
        assert name in {s.value for s in SchedulerType}
        get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)


# ------------------------------------------------------------------ read-only folders

def _read_only(monkeypatch, folder: Path) -> None:
    """chmod 0555; as root (where chmod stops nothing) the writes paft.io makes under ``folder`` raise EACCES,
    as the kernel would."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def refuse(path):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    real_open = open

    def fake_open(path, *a, **k):
        refuse(path)
        return real_open(path, *a, **k)

    class FakeTempfile:
        @staticmethod
        def mkdtemp(prefix=None, dir=None):
            refuse(Path(dir) / (prefix or "tmp"))
            return tempfile.mkdtemp(prefix=prefix, dir=dir)

        @staticmethod
        def mkstemp(prefix=None, dir=None):
            refuse(Path(dir) / (prefix or "tmp"))
            return tempfile.mkstemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(paft.io, "open", fake_open, raising=False)
    monkeypatch.setattr(paft.io, "tempfile", FakeTempfile)


@pytest.mark.parametrize("command", ["sft", "merge (flags)"])
def test_read_only_output_folder(command, tmp_path, tiny_dir, monkeypatch):
    ro = tmp_path / "ro"
    _read_only(monkeypatch, ro)
    try:
        if command == "sft":
            args, named = ["sft", *TINY, "--out", str(ro)], ro
        else:
            other = str(shutil.copytree(tiny_dir, tmp_path / "other"))
            args, named = ["merge", "--base", str(tiny_dir), "--models", other, "--out", str(ro / "m")], ro / "m"
        line = _error_line(runner.invoke(app, args))
    finally:
        ro.chmod(0o755)
    assert str(named) in line and "not writable" in line and "choose another --out" in line


# ------------------------------------------------------------------ disk full, and what skip_invalid skips

def test_disk_full_during_a_checkpoint_then_the_rerun_resumes(tmp_path, monkeypatch):
    """ENOSPC while the Trainer writes checkpoint-4: one line naming it and the fix; checkpoint-2 stays, the
    half-written one goes; the same command, with space again, resumes and finishes."""
    from transformers import Trainer

    real = Trainer._save_checkpoint

    def save(self, model, trial):
        real(self, model, trial)  # the files land in the staging folder...
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")  # ...and the disk fills before the last one

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    out = tmp_path / "run"
    args = ["sft", *TINY, "--out", str(out), "--set", "sft.max_steps=6", "--set", "sft.save_steps=2"]
    line = _error_line(runner.invoke(app, args))
    ckpts = out / "sft" / "checkpoints"
    assert f"disk full writing {ckpts / 'checkpoint-4'}" in line and "free space" in line
    assert "resumes from its last complete checkpoint" in line
    assert sorted(p.name for p in ckpts.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.setattr(Trainer, "_save_checkpoint", real)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sft" / "train_summary.json").read_text())["steps"] == 6


TORCH_DISK_FULL = ("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                   "file write failed")


def test_disk_full_in_torch_save_during_a_checkpoint(tmp_path, monkeypatch):
    """What a full disk really raises in the Trainer's torch.save of the optimizer state (a RuntimeError, no
    errno): the same one line; the half-written checkpoint is removed at once, the complete one stays."""
    import torch

    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and ".tmp-checkpoint-4" in str(f):
            Path(f).parent.mkdir(parents=True, exist_ok=True)
            Path(f).write_bytes(b"\0" * 100)  # a partial file, as the failed write leaves it
            raise RuntimeError(TORCH_DISK_FULL)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    line = _error_line(runner.invoke(app, ["sft", *TINY, "--out", str(out), "--set", "sft.max_steps=6",
                                           "--set", "sft.save_steps=2"]))
    ckpts = out / "sft" / "checkpoints"
    assert f"disk full writing {ckpts / 'checkpoint-4'}" in line and "free space" in line
    assert sorted(p.name for p in ckpts.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


def test_save_error_tells_a_full_disk_from_a_bug(tmp_path, monkeypatch):
    """torch's and safetensors' own exception types: disk full when the message says the write failed or the
    disk has (almost) no space left; any other error is not one (None: the caller re-raises it)."""
    from safetensors import SafetensorError

    from paft.io import LOW_FREE_BYTES, save_error

    path = tmp_path / "checkpoint-4"
    full = [RuntimeError(TORCH_DISK_FULL), RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                        "2112 vs 2006"),
            SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                            'left on device" })'), OSError(errno.ENOSPC, "No space left on device")]
    for exc in full:
        err = save_error(path, exc, tmp_path)
        assert err is not None and f"disk full writing {path}" in str(err), exc
    bug = RuntimeError("Expected all tensors to be on the same device")
    assert save_error(path, bug, tmp_path) is None  # plenty of space here (the test machine's tmp)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(paft.io.shutil, "disk_usage", lambda p: usage._replace(free=LOW_FREE_BYTES - 1))
    assert "disk full" in str(save_error(path, bug, tmp_path))  # the same message on a full disk: its cause


def test_skip_invalid_skips_an_invalid_json_line_and_counts_it(tmp_path):
    data = _jsonl(tmp_path / "chat.jsonl", _chats(), {3: "{not json", 7: "[1, 2]"})
    out = tmp_path / "run"
    result = runner.invoke(app, ["sft", *TINY, "--out", str(out), "--set", f"data.sft.path={data}",
                                 "--set", "data.skip_invalid=true", "--set", "sft.max_steps=1"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 invalid rows" in " ".join(result.output.split())
    summary = json.loads((out / "data" / "summary.json").read_text())["sft"]
    assert summary["skipped"] == 2 and summary["train"] + summary["dev"] + summary["eval"] == 12
    assert "line 4: invalid JSON" in summary["skipped_errors"][0]
    assert "line 8: invalid JSON: expected an object, got list" in summary["skipped_errors"][1]


def test_force_starts_a_run_with_a_damaged_config_over(tmp_path):
    run = _damaged_run(tmp_path, "- a\n")
    (run / "sft").mkdir()
    (run / "sft" / "log_history.json").write_text("[]")
    line = _error_line(runner.invoke(app, ["merge", *TINY, "--out", str(run), "--force"]))
    assert "train the sft branch before merging" in line  # got past the damaged config.yaml...
    assert not (run / "sft").exists()  # ...removing the outputs it could not vouch for
    assert read_run_config(run)["model"]["name"] == "tiny"


# ------------------------------------------------------------------ intact folders that are not damaged

def test_tokenizer_needing_remote_code_is_not_called_damaged(tmp_path, tiny_dir):
    """A tokenizer folder that ships its own code: the fix is model.trust_remote_code, not a fresh download."""
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    for name, extra in (("config.json", {"model_type": "my_model", "auto_map": {"AutoConfig": "conf.MyConfig"}}),
                        ("tokenizer_config.json", {"tokenizer_class": "MyTokenizer",
                                                   "auto_map": {"AutoTokenizer": [None, "tok.MyTokenizerFast"]}})):
        conf = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**conf, **extra}))
    line = _error_line(runner.invoke(app, ["sft", *TINY, "--out", str(tmp_path / "run"),
                                           "--set", f"model.name={folder}"]))
    assert str(folder) in line and "cannot load its tokenizer" in line
    assert "--set model.trust_remote_code=true" in line and "damaged" not in line


@pytest.mark.parametrize("raised", ["PermissionError", "reported as missing"])
def test_unreadable_safetensors_names_permissions(raised, tmp_path, tiny_dir, monkeypatch):
    """A weights file paft may not read is not 'truncated or corrupt' (root reads anything: the OS is faked)."""
    import paft.models.folders as folders

    weights = Path(shutil.copytree(tiny_dir, tmp_path / "model")) / "model.safetensors"

    def refuse(path, framework):
        if raised == "PermissionError":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        raise FileNotFoundError(f"No such file or directory: {path!r}")

    monkeypatch.setattr(folders, "safe_open", refuse)
    if raised != "PermissionError":  # safetensors' own report: only the OS can tell
        monkeypatch.setattr(folders.os, "access", lambda p, mode: Path(p) != weights)
    with pytest.raises(ModelError) as err:
        folders.check_weights(weights.parent)
    line = str(err.value)
    assert str(weights) in line and "permission denied" in line and "chmod" in line
    assert "truncated or corrupt" not in line


# ------------------------------------------------------------------ device-free steps of a GPU run

@pytest.mark.parametrize("command", ["merge", "sparsity"])
def test_device_free_steps_of_a_cuda_run_on_a_cpu_machine(command, tmp_path, tiny_dir):
    """A run trained on a GPU (run.device: cuda), merged or measured where there is none: no device is needed."""
    import torch
    from peft import LoraConfig, get_peft_model

    from paft.config import load_config
    from paft.models import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    run.mkdir()
    cuda = ["run.device=cuda"]
    (run / "config.yaml").write_text(load_config(None, [f"run.output_dir={run}", *cuda], "tiny").to_yaml())
    torch.manual_seed(0)
    for branch in ("sft", "preference"):  # the branches' adapters, as training leaves them
        model = get_peft_model(load_model(tiny_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        model.save_pretrained(run / branch / "adapter")
    result = runner.invoke(app, [command, *TINY, "--out", str(run), "--set", *cuda])
    assert result.exit_code == 0, result.output
    if command == "merge":
        assert (run / "merged" / "config.json").is_file() and list((run / "merged").glob("*.safetensors"))
    else:
        assert set(json.loads((run / "sparsity.json").read_text())) == {"sft", "preference"}


def test_no_equal_pairs_error_without_equal_pairs():
    """The all-pairs-equal error is for pairs dropped as equal, not for a list empty for another reason."""
    from paft.data.formats import PreferenceExample
    from paft.data.prepare import _drop_equal_pairs

    assert _drop_equal_pairs([], "p.jsonl", print) == ([], 0)
    same = PreferenceExample(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="a")
    with pytest.raises(DataError, match=r"p.jsonl: all 2 preference pairs have chosen == rejected"):
        _drop_equal_pairs([same, same], "p.jsonl", print)
