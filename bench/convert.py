"""DeepSpeed ZeRO-2 checkpoint conversion: DeepSpeed's ``ds_to_universal`` vs ``unickpt convert``.

One run:

1. trains ``Net`` (tests/deepspeed_train.py, the ``bench`` size: ~270M parameters) for one AdamW
   step with the real DeepSpeed engine, ZeRO stage 2, 2 gloo ranks on CPU, and saves it with
   ``engine.save_checkpoint`` (fp32 weights + fp32 Adam state: ~4 GB); ``--reuse`` keeps it
   between runs;
2. converts it ``--repeats`` times with each tool, in an order rotated per repeat, each as a
   fresh child process reading a cold source (page cache dropped first):
   ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` (DeepSpeed's
   defaults: 4 extract workers, 2 merge workers) and ``unickpt convert --from deepspeed``;
3. records per run the wall time of the process, the time of an ``os.sync()`` right after it
   (ds_to_universal leaves its output in the page cache; unickpt fsyncs before committing), the
   peak resident memory of the whole process tree (sampled every 20 ms: ds_to_universal works in
   a process pool) and the largest single process's ``ru_maxrss`` (exact, from ``wait4``);
4. checks that the last two outputs hold the same tensors bit for bit.

Medians (and min-max) go to a markdown table on stdout and, with every sample, to
bench/results/convert-<timestamp>.{json,md}. See bench/README.md ("convert").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from save_load import (
    GB,
    _check,
    _fmt,
    detect_cache_drop,
    drop_cache,
    log,
    machine_info,
    write_results,
)

from unickpt.engine.load import CheckpointReader

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TRAINER = REPO / "tests" / "deepspeed_train.py"
RUN = "zero2-fp32"  # tests/deepspeed_train.py's folder for ZeRO stage 2, fp32
TAG = "global_step1"
TOOLS = ("ds_to_universal", "unickpt convert")
SPEEDUP_TARGET = 2.0


def train(work: Path) -> dict[str, Any]:
    """The ZeRO-2 checkpoint under ``work``; trained unless it is already there."""
    ckpt = work / RUN / "ckpt"
    if (ckpt / "latest").is_file():
        log(f"reusing {ckpt}")
        return {"reused": True}
    log("training the benchmark model with DeepSpeed (ZeRO-2, 2 ranks)...")
    started = time.monotonic()
    command = [sys.executable, str(TRAINER), str(work), "--size", "bench", "--stages", "2"]
    subprocess.run(
        [*command, "--steps", "1", "--no-next-step"],
        check=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
    )
    return {"reused": False, "train_and_save_s": round(time.monotonic() - started, 1)}


def command(tool: str, ckpt: Path, out: Path) -> list[str]:
    if tool == "ds_to_universal":
        return [
            sys.executable,
            *("-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"),
            *("--input_folder", str(ckpt / TAG), "--output_folder", str(out / TAG)),
        ]
    cli = Path(sys.executable).with_name("unickpt")
    return [str(cli), "convert", "--from", "deepspeed", str(ckpt), str(out)]


def measure(argv: list[str]) -> dict[str, float]:
    """Run ``argv``; its wall time, the sync after it, and its peak memory (tree and process)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:  # a worker exited between listing and reading it
                pass
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-4000:]}")
    synced = time.monotonic()
    os.sync()
    return {
        "wall_s": wall,
        "sync_s": time.monotonic() - synced,
        "peak_rss_tree_gb": peak / GB,
        "peak_rss_process_gb": usage.ru_maxrss * 1024 / GB,
    }


def same_tensors(universal: Path, converted: Path) -> int:
    """Compare every tensor of both outputs; the number compared (raises on a difference)."""
    reader = CheckpointReader(str(converted))
    keys = set(reader.manifest.tensors)
    compared = 0
    for folder in sorted(p for p in (universal / TAG / "zero").iterdir() if p.is_dir()):
        name = folder.name
        for file, key in (
            ("fp32.pt", f"model.{name}"),
            ("exp_avg.pt", f"optim.state.{name}.exp_avg"),
            ("exp_avg_sq.pt", f"optim.state.{name}.exp_avg_sq"),
            ("step.pt", f"optim.state.{name}.step"),
        ):
            if not (folder / file).exists():
                continue
            value = torch.load(folder / file, weights_only=True)
            reference = value["param"] if isinstance(value, dict) else value
            ours = reader.read(key)
            if not torch.equal(ours.to(reference.dtype), reference):
                raise AssertionError(f"{key} differs from ds_to_universal's {folder / file}")
            keys.discard(key)
            compared += 1
    if keys:
        raise AssertionError(f"unickpt wrote tensors ds_to_universal did not: {sorted(keys)}")
    return compared


def summary(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for tool, runs in samples.items():
        out[tool] = (
            {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            | {f"{k}_min": min(r[k] for r in runs) for k in runs[0]}
            | {f"{k}_max": max(r[k] for r in runs) for k in runs[0]}
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    med = result["median"]
    lines = [
        f"### convert — {result['started']}, {m['cores']} cores, {m['mem_gib']} GiB, torch "
        f"{m['torch']}, deepspeed {result['deepspeed']}, load avg {m['loadavg_1m_at_start']:.1f}"
        f" -> {m['loadavg_1m_at_end']:.1f}",
        "",
        f"Source: DeepSpeed ZeRO-2, 2 DP ranks, {result['params'] / 1e6:.0f}M parameters, fp32 + "
        f"Adam, {result['source_gb']:.2f} GB on disk; cold source ({result['cache_drop']}); "
        f"{result['repeats']} repeat(s), medians (min-max).",
        "",
        "| tool | wall s | + sync s | peak RSS, process tree GB | peak RSS, largest process GB "
        "| output GB |",
        "|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        s = med[tool]
        lines.append(
            f"| {tool} | {s['wall_s']:.1f} ({s['wall_s_min']:.1f}-{s['wall_s_max']:.1f}) "
            f"| {s['sync_s']:.1f} | {s['peak_rss_tree_gb']:.2f} | {s['peak_rss_process_gb']:.2f} "
            f"| {result['output_gb'][tool]:.2f} |"
        )
    ds, uc = med["ds_to_universal"], med["unickpt convert"]
    speedup = ds["wall_s"] / uc["wall_s"]
    speedup_sync = (ds["wall_s"] + ds["sync_s"]) / (uc["wall_s"] + uc["sync_s"])
    rss = uc["peak_rss_tree_gb"] / ds["peak_rss_tree_gb"]
    lines += [
        "",
        f"- speed-up (wall): **{speedup:.2f}x** (target >= {SPEEDUP_TARGET}x: "
        f"{_check(speedup, SPEEDUP_TARGET)}); including the final sync: {speedup_sync:.2f}x",
        f"- peak RSS (tree), unickpt / ds_to_universal: **{rss:.2f}** (target < 1: "
        f"{_check(rss, 1.0, higher_is_better=False)})",
        f"- outputs equal bit for bit: {_fmt(result['compared'], 'd')} tensors compared",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=BENCH_DIR / "results" / "tmp" / "convert")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="keep the trained checkpoint")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(args.dir),
        "deepspeed": importlib.metadata.version("deepspeed"),  # fails early when absent
        "repeats": args.repeats,
    }
    result["training"] = train(args.dir)
    ckpt = args.dir / RUN / "ckpt"
    files = list((ckpt / TAG).iterdir())
    result["source_gb"] = sum(f.stat().st_size for f in files) / GB
    result["cache_drop"] = detect_cache_drop()
    samples: dict[str, list[dict[str, float]]] = {tool: [] for tool in TOOLS}
    outputs = {tool: args.dir / f"out-{i}" for i, tool in enumerate(TOOLS)}
    for repeat in range(args.repeats):
        order = TOOLS[repeat % 2 :] + TOOLS[: repeat % 2]
        for tool in order:
            shutil.rmtree(outputs[tool], ignore_errors=True)
            os.sync()
            drop_cache(result["cache_drop"], ckpt)
            sample = measure(command(tool, ckpt, outputs[tool]))
            samples[tool].append(sample)
            log(
                f"repeat {repeat + 1} {tool}: "
                + json.dumps({k: round(v, 2) for k, v in sample.items()})
            )
    result["samples"] = samples
    result["median"] = summary(samples)
    result["output_gb"] = {
        tool: sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / GB
        for tool, out in outputs.items()
    }
    manifest = CheckpointReader(str(outputs["unickpt convert"])).manifest
    result["params"] = sum(
        math.prod(t.shape) for k, t in manifest.tensors.items() if k.startswith("model.")
    )
    result["compared"] = same_tensors(outputs["ds_to_universal"], outputs["unickpt convert"])
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    if not args.reuse:
        shutil.rmtree(args.dir / RUN)
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_results("convert", stamp, result, markdown(result))


if __name__ == "__main__":
    main()
