"""Run every speed benchmark at one setting and put the numbers into docs/results.md (a script, not a test).

``--device cuda`` uses the paper's setting: DeepLabV3-ResNet101, 512x512 crops, batch 12 per GPU, bf16 autocast
(losses at the logits' size of that setting, 12 x 21 x 512 x 512, with torch.compile timings). ``--device cpu
--quick`` is a reduced run that fits a development machine (DeepLabV3-ResNet101 at 2 x 256x256, losses at
4 x 21 x 128 x 128). Each benchmark writes JSON to ``benchmarks/results/<name>-<device>.json`` (stdout to a
``.txt`` next to it); the summary table goes into docs/results.md between the markers
``<!-- run_all:<device>:begin -->`` and ``<!-- run_all:<device>:end -->`` (appended to the page when missing).

Usage::

    python benchmarks/run_all.py --device cuda          # the paper's setting, about 10 minutes on one GPU
    python benchmarks/run_all.py --device cpu --quick   # about 10 minutes on 2 CPU cores

``--mib-loss MiB/utils/loss.py`` (a clone of https://github.com/fcdl94/MiB) adds the table against MiB's losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def commands(device: str, quick: bool, results: Path, mib_loss: str | None = None) -> dict[str, list[str]]:
    """The command line of every benchmark for ``device`` (``--quick``: the reduced CPU setting; ``mib_loss``:
    MiB's ``utils/loss.py``, to time the unbiased CE + KD pair against it too)."""
    tag = device.split(":")[0]
    if tag == "cuda":
        losses = ["--size", "12", "21", "512", "512", "--compile"]
        step = ["--model", "deeplabv3_resnet101", "--size", "512", "--batch", "12", "--amp", "bf16"]
        non_local = ["--dtype", "bfloat16"]
    else:
        losses = ["--size", "4", "21", "128", "128"] + (["--repeats", "5", "--warmup", "2"] if quick else ["--compile"])
        step = ["--model", "deeplabv3_resnet101", "--size", "256", "--batch", "2"]
        step += ["--iters", "2", "--warmup", "1"] if quick else ["--iters", "5", "--warmup", "2"]
        non_local = ["--quick"] if quick else []
    if mib_loss:
        losses += ["--mib-loss", mib_loss] + (["--runs", "3"] if quick else [])
    return {
        "losses": ["bench_losses.py", "--device", device, *losses, "--json", str(results / f"losses-{tag}.json")],
        "step": ["bench_step.py", "--device", device, *step, "--json", str(results / f"step-{tag}.json")],
        "non_local": ["bench_non_local.py", "--device", device, *non_local],
    }


def table(device: str, command: str, losses: dict, step: dict) -> str:
    """Markdown summary of the JSON results of one run."""
    setting = step["setting"]
    r = step["results"]
    lines = [
        f"Measured with `{command}` (torch {step['torch']}, {device}, {setting['threads']} threads):",
        "",
        "| loss | reference | incseg / reference time | compiled speed-up |",
        "|---|---|---:|---:|",
    ]
    for row in losses["rows"]:
        speedup = f"{row['compiled_speedup']:.2f}x" if "compiled_speedup" in row else "-"
        ratio = f"{row['ratio']:.2f}x"
        if "ratio_min" in row:  # the MiB table: median and range over runs
            ratio += f" ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}, {row['threads']} threads)"
        lines.append(f"| {row['loss']} | {row['reference']} | {ratio} | {speedup} |")
    lines += [
        "",
        f"Training step ({setting['model']}, batch {setting['batch']}, {setting['size']}x{setting['size']}, "
        f"amp {setting['amp']}):",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| (a) CAF step / lower bound | {r['step_ratio']:.2f} ({r['caf_step_ms']:.0f} / {r['lower_bound_ms']:.0f} ms) "
        "| <= 1.15 |",
        f"| (d) `skip` inference / bare network | {r['inference_ratio']:.2f} | <= 1.05 |",
        f"| (e) CAF module FLOP rate / network's | {r['flop_rate_ratio']:.2f} ({r['caf_gflops_per_s']:.1f} / "
        f"{r['bare_gflops_per_s']:.1f} GFLOP/s) | >= 0.9 |",
        f"| CAF module FLOPs fwd+bwd / network's | {r['caf_gflop']:.0f} / {r['bare_gflop']:.0f} GFLOP | |",
    ]
    if "step_flop_ratio" in r:  # what (a) and (d) would be at equal FLOP rates: the architecture's share
        lines.append(f"| FLOP ratio of (a) / of (d) | {r['step_flop_ratio']:.2f} / {r['skip_flop_ratio']:.2f} | |")
    if "caf_peak_mib" in r:
        lines.append(f"| peak memory CAF step / lower bound | {r['caf_peak_mib'] / r['bound_peak_mib']:.2f} | |")
    return "\n".join(lines)


def write_table(page: Path, tag: str, text: str) -> None:
    """Replace the text between this device's markers in ``page`` (append a section when they are missing)."""
    begin, end = f"<!-- run_all:{tag}:begin -->", f"<!-- run_all:{tag}:end -->"
    content = page.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n### `run_all.py`, {tag}\n\n{block}\n"
    page.write_text(content)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda", help="cuda (the paper's setting) or cpu")
    parser.add_argument("--quick", action="store_true", help="reduced CPU setting")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of the JSON/text outputs")
    parser.add_argument("--page", default=str(ROOT / "docs" / "results.md"), help="page that receives the table")
    parser.add_argument("--only", nargs="+", choices=["losses", "step", "non_local"], help="run only these")
    parser.add_argument("--mib-loss", metavar="PATH", help="MiB's utils/loss.py: also time the losses against it")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    tag = args.device.split(":")[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for name, cmd in commands(args.device, args.quick, results, args.mib_loss).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}: python {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *cmd], cwd=HERE, env=env, capture_output=True, text=True)
        (results / f"{name}-{tag}.txt").write_text(proc.stdout + proc.stderr)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        print(f"   ({time.perf_counter() - start:.0f} s)")
    losses_json, step_json = results / f"losses-{tag}.json", results / f"step-{tag}.json"
    if losses_json.exists() and step_json.exists():
        command = f"python benchmarks/run_all.py --device {tag}" + (" --quick" if args.quick else "")
        text = table(tag, command, json.loads(losses_json.read_text()), json.loads(step_json.read_text()))
        write_table(Path(args.page), tag, text)
        print(f"table written to {args.page}")


if __name__ == "__main__":
    main()
