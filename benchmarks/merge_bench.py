"""Benchmark `paft merge` against mergekit on a synthetic llama: wall time, peak RSS, input read throughput.

    python benchmarks/merge_bench.py                                  # ~1B params, ties + dare_ties, 3 repeats
    python benchmarks/merge_bench.py --params 5e8 --repeats 3 --methods ties dare_ties --venv ~/mk-venv

Builds (once, cached under --workdir, default /tmp/paft-merge-bench) a random bf16 llama of about
``--params`` parameters as 2 GB safetensors shards with an index, config.json and a tokenizer, plus two
fine-tuned variants: ``dense`` (base + N(0, 1e-3) on every entry) and ``sparse`` (base + N(0, 1e-3) on
~5% of the entries). Each tensor is generated and written on its own, so memory stays at a few tensors.

mergekit runs from its own virtual environment (``--venv``, default ``~/.cache/paft/mergekit-venv``),
created with ``torch==<this torch>`` (CPU) and ``mergekit==--mergekit-version`` when missing
(``--no-create-venv`` to refuse instead). Both tools merge the *same* YAML (base + dense + sparse,
weight 0.5 each, density 0.5, dtype bfloat16) as separate processes under ``/usr/bin/time -v``;
peak RSS is its maximum resident set size (which counts mapped file pages that were touched);
peak anonymous RSS (heap, no page cache) is polled from /proc every 100 ms. The runs alternate
between the tools. Before the runs every input is read once (a warm-up), so the runs read from the
page cache ("warm"); ``--cold`` drops the page cache before every run instead (needs root).

Prints a Markdown table (medians over ``--repeats``, and mergekit / paft ratios) and writes every run to
``--out``/results.json (default runs/merge-bench). After the timed runs the two tools' outputs of each
method are compared tensor by tensor (max |diff| and share of equal entries; dare_ties differs by its
random masks, so only the shape of its statistics can agree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from paft.merge.engine import SHARD_BYTES, ShardWriter

DEFAULT_VENV = Path(os.environ.get("PAFT_MERGEKIT_VENV", "~/.cache/paft/mergekit-venv")).expanduser()
DEFAULT_WORKDIR = Path("/tmp/paft-merge-bench")
SMOLLM2 = Path("~/.cache/paft/models/smollm2-135m-instruct").expanduser()
SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DELTA_STD = 1e-3
SPARSE_SHARE = 0.05
VARIANTS = ("base", "dense", "sparse")
BUILD_VERSION = 2  # bump when the synthetic models change


# --- synthetic models ---------------------------------------------------------------------------

def llama_shape(params: float, vocab: int | None = None) -> dict[str, int]:
    """Hidden/intermediate/layers/vocab of a llama with about ``params`` parameters (untied lm_head, GQA 4:1)."""
    if params >= 3e8:
        hidden, inter = 2048, 5632
    elif params >= 5e7:
        hidden, inter = 1024, 2816
    elif params >= 5e6:
        hidden, inter = 512, 1408
    else:
        hidden, inter = 256, 688
    if vocab is None:
        vocab = SMOLLM2_VOCAB if params >= 5e7 else 4096
    heads = hidden // 64
    kv = max(1, heads // 4)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
            "num_attention_heads": heads, "num_key_value_heads": kv}


def _config(shape: dict[str, int], dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype=str(dtype).removeprefix("torch."),
                       architectures=["LlamaForCausalLM"])


def _plan(cfg, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [(n, tuple(t.shape), dtype) for n, t in model.state_dict().items()]


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """SmolLM2's tokenizer when the vocabulary matches, else a word-level one with ``vocab`` tokens."""
    if vocab == SMOLLM2_VOCAB and (SMOLLM2 / "tokenizer.json").is_file():
        for f in TOKENIZER_FILES:
            if (SMOLLM2 / f).is_file():
                shutil.copy2(SMOLLM2 / f, folder / f)
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 2048}, indent=2) + "\n")


def _gen(seed: int, name: str, what: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}\0{what}\0{name}".encode(), digest_size=8).digest(),
                                 "little"))
    return g


def build_models(root: Path, params: float, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 vocab: int | None = None, shard_bytes: int = SHARD_BYTES, quiet: bool = False) -> dict[str, Path]:
    """``{base, dense, sparse}`` model folders under ``root`` (reused when built with the same settings)."""
    shape = llama_shape(params, vocab)
    spec = {"version": BUILD_VERSION, "shape": shape, "dtype": str(dtype), "seed": seed, "delta_std": DELTA_STD,
            "sparse_share": SPARSE_SHARE, "shard_bytes": shard_bytes}
    tag = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root) / f"models-{tag}"
    dirs = {v: folder / v for v in VARIANTS}
    if (folder / "spec.json").is_file():
        return dirs
    tmp = Path(root) / f".models-{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = _config(shape, dtype)
    plan = _plan(cfg, dtype)
    n_params = sum(torch.Size(s).numel() for _, s, _ in plan)
    if not quiet:
        print(f"building {n_params / 1e9:.3f}B-parameter llama x3 ({shape}) in {folder}", flush=True)
    writers = {}
    for v in VARIANTS:
        (tmp / v).mkdir(parents=True)
        cfg.save_pretrained(tmp / v)
        _write_tokenizer(tmp / v, shape["vocab_size"])
        writers[v] = ShardWriter(tmp / v, plan, shard_bytes)
    start = time.perf_counter()
    for i, (name, shp, _) in enumerate(plan):
        if name.endswith("norm.weight"):
            base = torch.ones(shp)
        else:
            base = torch.randn(shp, generator=_gen(seed, name, "base")) * 0.02
        dense = base + torch.randn(shp, generator=_gen(seed, name, "dense")) * DELTA_STD
        mask = torch.rand(shp, generator=_gen(seed, name, "mask")) < SPARSE_SHARE
        sparse = base + torch.randn(shp, generator=_gen(seed, name, "sparse")) * DELTA_STD * mask
        for v, t in (("base", base), ("dense", dense), ("sparse", sparse)):
            writers[v].write(name, t.to(dtype))
        del base, dense, mask, sparse
        if not quiet and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(plan)} tensors, {time.perf_counter() - start:.0f} s", flush=True)
    for w in writers.values():
        w.close()
    (tmp / "spec.json").write_text(json.dumps({**spec, "params": n_params}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return dirs


def model_params(folder: Path) -> int:
    return json.loads((Path(folder).parent / "spec.json").read_text())["params"]


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


# --- configs and tools --------------------------------------------------------------------------

def write_config(path: Path, method: str, base: Path, models: list[tuple[Path, dict]], *,
                 dtype: str = "bfloat16", params: dict | None = None) -> Path:
    """A mergekit YAML both tools accept (no seed key: mergekit's schema has none; paft's default is 0)."""
    import yaml

    cfg: dict[str, Any] = {"merge_method": method}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(m), **({"parameters": p} if p else {})} for m, p in models]
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = dtype
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def ensure_venv(venv: Path, version: str, create: bool) -> str:
    """mergekit's version in ``venv``; creates the venv (torch CPU pinned to ours first) when missing."""
    py = venv_python(venv)
    if not (Path(venv) / "bin" / "mergekit-yaml").is_file():
        if not create:
            raise SystemExit(f"no mergekit in {venv}; run without --no-create-venv or pass --venv")
        print(f"creating {venv} with mergekit=={version} (torch=={torch.__version__.split('+')[0]})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
                       check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"mergekit=={version}"], check=True)
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def mergekit_cmd(venv: Path, config: Path, out: Path, *, threads: int | None, seed: int | None = 0,
                 extra: list[str] | None = None) -> list[str]:
    """mergekit-yaml on the CPU, quiet, ~2 GB output shards (1B bf16 params), no model card."""
    cmd = [str(Path(venv) / "bin" / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--quiet",
           "--out-shard-size", "1B", "--no-write-model-card"]
    if threads:
        cmd += ["--num-threads", str(threads)]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    return cmd + list(extra or [])


def paft_cmd(config: Path, out: Path, *, workers: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "paft.cli", "merge", str(config), "--out", str(out), "--force"]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


# --- measurement --------------------------------------------------------------------------------

def _tree_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over ``pid`` and its descendants."""
    rss = anon = 0
    procs, todo = [], [pid]
    while todo:  # /proc/PID/task/TID/children: cheaper than scanning every process
        p = todo.pop()
        procs.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    for p in procs:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_read(folders: list[Path]) -> float:
    """Read every safetensors file once (into the page cache); returns the seconds it took."""
    start = time.perf_counter()
    for folder in folders:
        for f in sorted(Path(folder).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - start


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict[str, Any]:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds, peak RSS (time's) and peak anonymous RSS (polled)."""
    timefile = log.with_suffix(".time")
    full = (["/usr/bin/time", "-v", "-o", str(timefile)] if Path("/usr/bin/time").is_file() else []) + cmd
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env)

        def poll() -> None:
            while not done.is_set():
                rss, anon = _tree_mem(proc.pid)
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                done.wait(0.1)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        t.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    result = {"wall_s": wall, "peak_rss_polled": peak["rss"], "peak_anon_rss": peak["anon"]}
    if timefile.is_file():
        for line in timefile.read_text().splitlines():
            line = line.strip()
            if line.startswith("Maximum resident set size (kbytes):"):
                result["peak_rss"] = int(line.rsplit(":", 1)[1]) * 1024
            elif line.startswith("User time (seconds):"):
                result["user_s"] = float(line.rsplit(":", 1)[1])
            elif line.startswith("System time (seconds):"):
                result["sys_s"] = float(line.rsplit(":", 1)[1])
            elif line.startswith("File system inputs:"):
                result["fs_inputs"] = int(line.rsplit(":", 1)[1])
    result.setdefault("peak_rss", peak["rss"])
    return result


def compare_outputs(a: Path, b: Path, limit: int | None = None) -> dict[str, Any]:
    """Max |a - b| over the tensors of two model folders, share of equal entries, tensors compared."""
    from paft.merge.deltas import open_state

    sa, sb = open_state(a), open_state(b)
    names = [n for n in sa.keys() if n in sb]
    if limit is not None:
        step = max(1, len(names) // limit)
        names = names[::step][:limit]
    max_diff, equal, total = 0.0, 0, 0
    for n in names:
        x, y = sa.get(n).float(), sb.get(n).float()
        max_diff = max(max_diff, float((x - y).abs().max()))
        equal += int((x == y).sum())
        total += x.numel()
    return {"tensors": len(names), "max_abs_diff": max_diff, "equal_share": equal / max(total, 1),
            "missing_in_b": sorted(set(sa.keys()) - set(sb.keys()))[:5]}


# --- main ---------------------------------------------------------------------------------------

def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="model size in parameters (default 1e9)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"])
    ap.add_argument("--tools", nargs="+", default=["paft", "mergekit"], choices=["paft", "mergekit"])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"mergekit's venv (default {DEFAULT_VENV})")
    ap.add_argument("--no-create-venv", action="store_true", help="fail instead of creating a missing venv")
    ap.add_argument("--mergekit-version", default="0.1.5")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options (one string)")
    ap.add_argument("--threads", type=int, default=None,
                    help="mergekit --num-threads (default: the usable cores)")
    ap.add_argument("--workers", type=int, default=None, help="paft --workers (default: paft's)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=Path("runs/merge-bench"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--no-compare", action="store_true", help="skip comparing the two tools' outputs")
    args = ap.parse_args(argv)

    workdir = args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or len(os.sched_getaffinity(0))
    mk_version = ensure_venv(args.venv.expanduser(), args.mergekit_version, not args.no_create_venv) \
        if "mergekit" in args.tools else None
    dirs = build_models(workdir, args.params)
    n_params = model_params(dirs["base"])
    inputs = [dirs["base"], dirs["dense"], dirs["sparse"]]
    in_bytes = sum(safetensors_bytes(d) for d in inputs)
    cold = args.cold and drop_page_cache()
    if args.cold and not cold:
        print("cannot drop the page cache (not root?): runs are warm", flush=True)
    warm_s = None if cold else warm_read(inputs)
    extra = args.mergekit_args.split()
    results: dict[str, Any] = {
        "params": n_params, "input_bytes": in_bytes, "shape": llama_shape(args.params), "density": args.density,
        "repeats": args.repeats, "cache": "cold" if cold else "warm", "warm_read_s": warm_s,
        "mergekit_version": mk_version, "mergekit_threads": threads, "mergekit_extra_args": extra,
        "paft_workers": args.workers, "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
        "runs": [], "commands": {}}
    out_root = workdir / "out"
    out_root.mkdir(exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for method in args.methods:
        params = {"normalize": False} if method == "task_arithmetic" else None
        models = [(dirs["dense"], {"weight": 0.5, "density": args.density}),
                  (dirs["sparse"], {"weight": 0.5, "density": args.density})]
        if method in ("linear", "task_arithmetic"):
            models = [(m, {"weight": p["weight"]}) for m, p in models]
        config = write_config(workdir / f"{method}.yaml", method, dirs["base"], models, params=params)
        cmds = {"paft": paft_cmd(config, out_root / f"paft-{method}", workers=args.workers),
                "mergekit": mergekit_cmd(args.venv.expanduser(), config, out_root / f"mergekit-{method}",
                                         threads=threads, extra=extra)}
        results["commands"][method] = {t: " ".join(c) for t, c in cmds.items()}
        for rep in range(args.repeats):
            for tool in args.tools:
                out = out_root / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                if cold:
                    drop_page_cache()
                r = measure(cmds[tool], logs / f"{tool}-{method}-{rep}.log", env=env)
                r.update(tool=tool, method=method, repeat=rep, throughput=in_bytes / r["wall_s"])
                results["runs"].append(r)
                _save(args.out, results)  # after every run, so an interrupted benchmark keeps what it measured
                print(f"{method:>10} {tool:>8} #{rep}: {r['wall_s']:7.1f} s, peak RSS {_fmt_bytes(r['peak_rss'])}"
                      f" (anon {_fmt_bytes(r['peak_anon_rss'])}), {r['throughput'] / 1e6:.0f} MB/s", flush=True)
        if not args.no_compare and set(args.tools) == {"paft", "mergekit"}:
            results.setdefault("compare", {})[method] = compare_outputs(out_root / f"paft-{method}",
                                                                        out_root / f"mergekit-{method}")
    _save(args.out, results)
    print()
    print(markdown(results))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


def _save(out: Path, results: dict) -> None:
    results["summary"] = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")


def summarize(results: dict) -> dict:
    summary: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        row: dict[str, Any] = {}
        for tool in ("paft", "mergekit"):
            runs = [r for r in results["runs"] if r["method"] == method and r["tool"] == tool]
            if runs:
                row[tool] = {k: statistics.median(r[k] for r in runs)
                             for k in ("wall_s", "peak_rss", "peak_anon_rss", "throughput")}
        if "paft" in row and "mergekit" in row:
            row["speedup"] = row["mergekit"]["wall_s"] / row["paft"]["wall_s"]
            row["rss_ratio"] = row["paft"]["peak_rss"] / row["mergekit"]["peak_rss"]
            row["anon_rss_ratio"] = row["paft"]["peak_anon_rss"] / max(row["mergekit"]["peak_anon_rss"], 1)
        summary[method] = row
    return summary


def markdown(results: dict) -> str:
    lines = [f"{results['params'] / 1e9:.2f}B params, bf16, inputs {results['input_bytes'] / 1e9:.2f} GB "
             f"(base + 2 models), median of {results['repeats']}, {results['cache']} page cache, "
             f"{results['cpus']} CPUs, mergekit {results['mergekit_version']}",
             "",
             "| method | tool | wall (s) | peak RSS (GiB) | peak anon RSS (GiB) | read (MB/s) |",
             "|---|---|---:|---:|---:|---:|"]
    for method, row in results["summary"].items():
        for tool in ("paft", "mergekit"):
            if tool in row:
                m = row[tool]
                lines.append(f"| {method} | {tool} | {m['wall_s']:.1f} | {m['peak_rss'] / 2**30:.2f} | "
                             f"{m['peak_anon_rss'] / 2**30:.2f} | {m['throughput'] / 1e6:.0f} |")
        if "speedup" in row:
            lines.append(f"| {method} | **mergekit/paft** | **{row['speedup']:.2f}x faster** | "
                         f"**paft {row['rss_ratio']:.2f}x** | paft {row['anon_rss_ratio']:.2f}x | "
                         f"{row['paft']['throughput'] / row['mergekit']['throughput']:.2f}x |")
    if results.get("compare"):
        lines += ["", "| method | tensors compared | max abs diff paft vs mergekit | equal entries |", "|---|---:|---:|---:|"]
        for method, c in results["compare"].items():
            lines.append(f"| {method} | {c['tensors']} | {c['max_abs_diff']:.3g} | {c['equal_share']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
