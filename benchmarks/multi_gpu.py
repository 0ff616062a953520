"""Fine-tuning on 1 and 2 GPUs under each accelerate strategy: step losses, tokens/s, peak memory.

    python -m benchmarks.multi_gpu                    # CUDA, >= 2 GPUs: the paper-shaped model, all strategies
    python -m benchmarks.multi_gpu --strategies ddp --runs-dir runs   # on 2 H200s a strategy's two runs take
                                                      # ~8 minutes: measure one per call, the last call reporting
                                                      # every run kept in runs/
    python -m benchmarks.multi_gpu --global-batch 16  # a small global batch: the communication it cannot hide
    python -m benchmarks.multi_gpu --quick            # CPU: the tiny config, DDP on 1 and 2 gloo processes
                                                      # at once (a check of the machinery, not a speed figure)

Each run is what a user runs, ``accelerate launch --config_file configs/accelerate/STRATEGY.yaml
--num_processes N train/finetune.py --config ...``, on the synthetic Shapes-VQA records (nothing
downloaded): with the paper-shaped model, MambaVLM-2.8B with random weights (DINOv2-L + SigLIP-SO400M
at 384 px, 1458 visual tokens, Mamba-2.8B in float32 master weights, bf16 autocast, gradient
checkpointing, as ``configs/train/mambavlm-2.8b.yaml``), and the same global batch on every number of
GPUs (more accumulation steps on fewer): by default the config's, the paper's 128 (16 micro-batches of
8 per step on one GPU, 8 on each of two); ``--global-batch 16`` shows the communication a small
batch cannot hide. The trainer's own ``metrics.json`` gives the step losses and
the throughput of every step but the first (``TrainerState.phase_throughput``): tokens/s over all
GPUs and the peak memory of one. The 1-GPU runs of different strategies run at once, one per GPU
(``--concurrent-single``, the default with enough GPUs); each 2-GPU run has the machine to itself.

Before the runs, one all-reduce between the processes is timed (NCCL on CUDA, gloo on the CPU; 1 GiB
of float32, 64 MiB with --quick; median of 5 after a warm-up): its bus bandwidth, and the seconds one all-reduce of the
run's float32 gradients (the trainable parameters the 1-process run's log names) takes at it, the
least a DDP step adds where the backward cannot hide it.

Reported per strategy: tokens/s on 1 and 2 GPUs and their ratio (issue 13's target: >= 1.85x), peak
GiB per GPU, the seconds of one optimiser step on each and what they imply does not divide over the
GPUs: with the same global batch, t1 = a + F and t2 = a / 2 + F + C (a: the micro-batches' compute,
F: per-step work every process repeats, the optimiser step, clipping, logging; C: communication not
hidden behind the backward), so ``2 t2 - t1 = F + 2 C``; and the relative difference of the first
step's losses, the same weights and batches in another reduction order (``LOSS_RTOL``). Later steps
are listed, not compared: with random weights AdamW's first, sign-like updates turn near-zero
gradients' rounding into different weights (float32 agreement is what tests/multi_gpu/ proves).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
QUICK_GLOBAL_BATCH, QUICK_MICRO_BATCH = 16, 4
"""--quick's batches (the tiny config's own are one micro-batch of 32: nothing to accumulate)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, DDP on 1 and 2 CPU processes (CI)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run (default 3; the first untimed)")
    parser.add_argument("--global-batch", type=int, help="samples per optimiser step (default: the paper config's, "
                        f"128; {QUICK_GLOBAL_BATCH} with --quick)")
    parser.add_argument("--micro-batch", type=int, help="samples per forward pass and process (default: the paper "
                        f"config's, 8; {QUICK_MICRO_BATCH} with --quick)")
    parser.add_argument("--processes", type=int, nargs="+", choices=[1, 2], default=[1, 2],
                        help="which runs to make: on 1 process, on 2, or both (default; the ratio needs both)")
    parser.add_argument("--no-concurrent-single", dest="concurrent_single", action="store_false",
                        help="run the 1-GPU runs one after another instead of one per GPU at once")
    parser.add_argument("--sync-each-batch", action="store_true", help="every run reduces its gradients after "
                        "each micro-batch (train.sync_each_batch=true): under FSDP, sharded gradients accumulate")
    parser.add_argument("--profile-step", type=int, help="record this step of every run with torch.profiler "
                        "(train.profile_step; it is then not timed); its operator tables are kept in --runs-dir")
    parser.add_argument("--work-dir", type=Path, help="where the runs' outputs go (a temporary directory in it; "
                        "default /dev/shm when it holds them, else the system's temporary directory)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/multi_gpu[-quick].md)")
    parser.add_argument("--runs-dir", type=Path, help="keep each finished run's metrics here (STRATEGY-GPUS.json) "
                        "and reuse those already there: the strategies can be measured over several calls, "
                        "the report covering all of them")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402

from benchmarks import ROOT  # noqa: E402
from benchmarks.allreduce import allreduce_bus_bandwidth  # noqa: E402
from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from mambavlm.atomic import atomic_file  # noqa: E402
from mambavlm.training.config import load_train_config  # noqa: E402

TARGET_SPEEDUP = 1.85
"""Issue 13: 2 GPUs at least this many times one GPU's tokens/s."""
LOSS_RTOL = 2e-2
"""2-GPU vs 1-GPU first-step loss under bf16 autocast, random weights (a loss of ~22: logits in the
hundreds, where bf16 resolves 0.5): the same sums in another order; float32 agrees to 1e-4 on the
GPUs and ~1e-7 on the CPU (tests)."""

PAPER_OVERRIDES = [
    "model.llm.source=null",
    "model.llm.tokenizer=builtin:tiny",
    (
        "model.vision.encoders=[{name: 'timm:vit_large_patch14_reg4_dinov2', image_size: 384, weights: null},"
        " {name: 'open_clip:ViT-SO400M-14-SigLIP-384', image_size: 384, weights: null}]"
    ),
    "train.warmup_ratio=0",
    "train.save_every=null",
    "train.checkpoints=false",
    "train.log_every=1",
    "data.num_workers=4",
]
"""configs/train/mambavlm-2.8b.yaml with random weights and the project's tokenizer (no downloads)."""
PAPER_CONFIG = ROOT / "configs" / "train" / "mambavlm-2.8b.yaml"
ALLREDUCE_BYTES, QUICK_ALLREDUCE_BYTES = 2**30, 2**26
"""The timed all-reduce: 1 GiB between GPUs (NCCL reaches its bus bandwidth from ~100 MB), 64 MiB
between --quick's CPU processes."""
TRAINABLE = re.compile(r"([\d,]+) trainable parameters")


@dataclass
class Run:
    strategy: str
    gpus: int
    metrics: dict
    seconds: float
    log: str = ""

    @property
    def throughput(self) -> dict:
        return self.metrics["throughput"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, gpus: int, args: argparse.Namespace, output_dir: Path,
           visible: str | None) -> subprocess.Popen:
    """Start one ``accelerate launch`` of train/finetune.py; its log goes to output_dir/launch.log."""
    accelerate = Path(sys.executable).with_name("accelerate")
    records = args.global_batch * args.steps
    overrides = [
        f"output_dir={output_dir}",
        "data.train=null",
        f"data.synthetic={{num_train: {records}, num_val: 0}}",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.sync_each_batch={str(args.sync_each_batch).lower()}",
        *([f"train.profile_step={args.profile_step}"] if args.profile_step else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.quick:
        # the torchrun launcher with ACCELERATE_USE_CPU starts CPU processes that talk through gloo
        cmd = [str(accelerate), "launch", "--multi_gpu" if gpus > 1 else "--cpu", "--num_processes", str(gpus),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no"]
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        config = ROOT / "configs" / "train" / "tiny.yaml"
    else:
        cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"),
               "--num_processes", str(gpus), "--main_process_port", str(free_port())]
        if strategy == "fsdp":
            cmd += ["--fsdp_transformer_layer_cls_to_wrap", "MambaBlock"]
        config = ROOT / "configs" / "train" / "mambavlm-2.8b.yaml"
        overrides = PAPER_OVERRIDES + overrides
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
    cmd += [str(ROOT / "train" / "finetune.py"), "--config", str(config), *overrides]
    output_dir.mkdir(parents=True, exist_ok=True)
    log = (output_dir.parent / f"{output_dir.name}.log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_all(jobs: list[tuple[str, int, str | None]], args: argparse.Namespace, work: Path) -> list[Run]:
    """Start ``jobs`` (strategy, GPUs, CUDA_VISIBLE_DEVICES) at once and wait for them. Each run's
    metrics are kept and its directory deleted (a paper-shaped run leaves an 11 GB model); a run that fails is reported with the end of its log, and the others go on."""
    started = time.perf_counter()
    procs = [(strategy, gpus, launch(strategy, gpus, args, work / f"{strategy}-{gpus}", visible))
             for strategy, gpus, visible in jobs]
    runs = []
    try:
        for _, _, proc in procs:
            proc.wait()
    except KeyboardInterrupt:  # the call's time limit (timeout -s INT): keep what the unfinished runs logged
        for strategy, gpus, proc in procs:
            proc.terminate()
            keep_partial_log(work / f"{strategy}-{gpus}.log", args.runs_dir)
        raise
    for strategy, gpus, proc in procs:
        code = proc.wait()
        log = work / f"{strategy}-{gpus}.log"
        output_dir = work / f"{strategy}-{gpus}"
        if code != 0:
            print(f"{strategy} on {gpus} process(es) FAILED (exit {code}); the end of its log:\n"
                  f"{log.read_text()[-4000:]}", flush=True)
            shutil.rmtree(output_dir, ignore_errors=True)
            continue
        metrics = json.loads((output_dir / "metrics.json").read_text())
        if args.runs_dir is not None:  # the operator tables of a profiled step (not the traces: 100s of MB)
            for table in sorted((output_dir / "profile").glob("*.txt")):
                shutil.copyfile(table, args.runs_dir / f"{strategy}-{gpus}-{table.name}")
        shutil.rmtree(output_dir)
        runs.append(Run(strategy, gpus, metrics, time.perf_counter() - started, log.read_text(errors="replace")))
        if args.runs_dir is not None:  # the log (timestamped) shows where a run's minutes went
            shutil.copyfile(log, args.runs_dir / log.name)
            with atomic_file(args.runs_dir / f"{strategy}-{gpus}.json") as f:
                json.dump({"strategy": strategy, "gpus": gpus, "seconds": runs[-1].seconds, "metrics": metrics}, f)
        throughput = metrics["throughput"]
        print(f"{strategy} x {gpus}: {throughput['tokens_per_s']:,.0f} tokens/s, peak {throughput['peak_memory_gib']} "
              f"GiB, losses {[round(x, 5) for x in metrics['step_losses']]}; done {runs[-1].seconds:.0f} s after its "
              f"start (training {throughput['seconds']:.0f} s timed)", flush=True)
    return runs


def keep_partial_log(log: Path, runs_dir: Path | None) -> None:
    """A run cut off before its end: its log so far, as ``NAME.partial.log`` in ``runs_dir`` (its
    timestamped lines say how far it got and how fast); nothing without a runs dir or a log."""
    if runs_dir is not None and log.is_file():
        shutil.copyfile(log, runs_dir / f"{log.stem}.partial.log")


def trainable_parameters(runs: list[Run]) -> int | None:
    """The trainable parameters a 1-process run's log names (its phase line), or None."""
    for r in runs:
        if r.gpus == 1 and r.log:
            found = TRAINABLE.search(r.log)
            if found:
                return int(found.group(1).replace(",", ""))
    return None


def kept_runs(runs_dir: Path, strategies: list[str], global_batch: int, micro_batch: int,
              sync_each_batch: bool = False) -> list[Run]:
    """The runs of ``strategies`` an earlier call kept in ``runs_dir`` (``--runs-dir``) with these batch
    sizes and gradient synchronisation (a run of others is not comparable: it is left there and run
    again; a run kept before ``train.sync_each_batch`` existed synchronised once per step). A 1-process
    run serves either synchronisation: one process has nothing to reduce (FSDP runs it unsharded, and
    its gradients accumulate in place either way)."""
    runs = []
    for path in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        kept = json.loads(path.read_text())
        train = kept["metrics"]["config"]["train"]
        settings = train["global_batch_size"], train["micro_batch_size"], train.get("sync_each_batch", False)
        if kept["gpus"] == 1:
            settings = settings[:2] + (sync_each_batch,)
        if kept["strategy"] in strategies and settings == (global_batch, micro_batch, sync_each_batch):
            log = path.with_suffix(".log")
            runs.append(Run(kept["strategy"], kept["gpus"], kept["metrics"], kept["seconds"],
                            log.read_text(errors="replace") if log.is_file() else ""))
    return runs


def step_seconds(run: Run) -> float:
    """Seconds of one timed optimiser step (every step but the first)."""
    return run.throughput["seconds"] / run.throughput["timed_steps"]


def data_wait(run: Run) -> str:
    """The share of the timed steps the processes spent blocked on the data loader."""
    share = run.throughput.get("data_wait_share")
    return "n/a" if share is None else f"{share:.1%}"


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def versions() -> str:
    names = ["torch", "accelerate", "transformers", "deepspeed", "mamba-ssm", "causal-conv1d"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    if torch.cuda.is_available():
        found.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
    return ", ".join(found)


RUN_BYTES = 20 * 2**30
"""Disk one paper-shaped run's output directory takes at its end (an 11 GB model, data; no checkpoint:
``train.checkpoints=false``, which spared ~40-65 s of writing ~33 GB per run)."""


def default_work_dir(concurrent_runs: int, shm: Path = Path("/dev/shm")) -> Path | None:
    """Where the runs write when ``--work-dir`` is not given: shared memory when it holds
    ``concurrent_runs`` runs' outputs (writing ~14 GB per run to it takes seconds, to a disk
    longer), else None (the system's temporary directory)."""
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if free >= concurrent_runs * RUN_BYTES else None


def resolve_batches(args: argparse.Namespace) -> None:
    """Fill ``--global-batch`` / ``--micro-batch`` left out: the paper config's, or --quick's."""
    if args.quick:
        defaults = QUICK_GLOBAL_BATCH, QUICK_MICRO_BATCH
    else:
        # through the trainer's loader (the config's model references resolved), with the runs' overrides
        train = load_train_config(PAPER_CONFIG, [*PAPER_OVERRIDES, "data.synthetic={num_train: 1, num_val: 0}"]).train
        defaults = train.global_batch_size, train.micro_batch_size
    args.global_batch = args.global_batch or defaults[0]
    args.micro_batch = args.micro_batch or defaults[1]


def run(args: argparse.Namespace) -> str:
    resolve_batches(args)
    device = torch.device("cpu" if args.quick else "cuda")
    strategies = ["ddp"] if args.quick else args.strategies
    gpus = 1 if args.quick else torch.cuda.device_count()
    if not args.quick and gpus < 2:
        raise SystemExit(f"the multi-GPU benchmark needs 2 GPUs, this machine has {gpus}; --quick runs on the CPU")
    work_dir = args.work_dir
    if work_dir is None and not args.quick:
        work_dir = default_work_dir(gpus if args.concurrent_single else 1)
    print(f"runs write under {work_dir or tempfile.gettempdir()}", flush=True)
    if args.runs_dir is not None:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
    allreduce_bytes = QUICK_ALLREDUCE_BYTES if args.quick else ALLREDUCE_BYTES
    busbw = allreduce_bus_bandwidth(2, cuda=not args.quick, nbytes=allreduce_bytes)
    print(f"all-reduce between 2 processes: {busbw / 1e9:.1f} GB/s bus bandwidth", flush=True)
    runs = (kept_runs(args.runs_dir, strategies, args.global_batch, args.micro_batch, args.sync_each_batch)
            if args.runs_dir is not None else [])
    done = {(r.strategy, r.gpus) for r in runs}
    if done:
        print(f"kept from {args.runs_dir}: {', '.join(f'{s} x {g}' for s, g in sorted(done))}", flush=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        singles = [(s, 1, None) for s in strategies if (s, 1) not in done and 1 in args.processes]
        pairs = [(s, 2, None) for s in strategies if (s, 2) not in done and 2 in args.processes]
        if args.quick:  # a check of the machinery on the CPU, not a speed figure: every run at once
            runs += run_all(singles + pairs, args, work)
        else:
            if args.concurrent_single:
                for start in range(0, len(singles), gpus):
                    runs += run_all([(s, 1, str(i)) for i, (s, _, _) in enumerate(singles[start:start + gpus])],
                                    args, work)
            else:
                for job in singles:
                    runs += run_all([job], args, work)
            for job in pairs:
                runs += run_all([job], args, work)

    rows, lines = [], []
    for strategy in strategies:
        one = next((r for r in runs if r.strategy == strategy and r.gpus == 1), None)
        two = next((r for r in runs if r.strategy == strategy and r.gpus == 2), None)
        if one is None or two is None:
            failed = " and ".join(f"{n} process(es)" for n, r in ((1, one), (2, two)) if r is None and n in args.processes)
            skipped = " and ".join(f"{n} process(es)" for n, r in ((1, one), (2, two)) if r is None and n not in args.processes)
            if failed:
                lines.append(f"- {strategy}: the run on {failed} FAILED (its log's end is printed above)")
            if skipped:
                lines.append(f"- {strategy}: no run on {skipped} (--processes {' '.join(map(str, args.processes))})")
            continue
        speedup = two.throughput["tokens_per_s"] / one.throughput["tokens_per_s"]
        difference = max_relative_difference(two.metrics["step_losses"][:1], one.metrics["step_losses"][:1])
        t1, t2 = step_seconds(one), step_seconds(two)
        for r in (one, two):
            peak = r.throughput["peak_memory_gib"]
            rows.append([strategy, str(r.gpus), str(r.metrics["gradient_accumulation_steps"]),
                         f"{r.throughput['tokens_per_s']:,.0f}", f"{r.throughput['samples_per_s']:.2f}",
                         f"{step_seconds(r):.3f}", data_wait(r), "n/a" if peak is None else f"{peak:.1f}",
                         " ".join(f"{x:.4f}" for x in r.metrics["step_losses"])])
        verdict = "" if args.quick else (" (target >= 1.85x: " + ("met" if speedup >= TARGET_SPEEDUP else "NOT met") + ")")
        lines.append(f"- {strategy}: 2 / 1 = {speedup:.2f}x tokens/s{verdict}; per-step work that does not divide "
                     f"over the GPUs, 2 t2 - t1 = {2 * t2 - t1:.3f} s of t1 = {t1:.3f} s; first-step loss, 2 vs 1: "
                     f"relative difference {difference:.1e} ({'within' if difference <= LOSS_RTOL else 'OUTSIDE'} "
                     f"{LOSS_RTOL:g})")
    trainable = trainable_parameters(runs)
    link = (f"- all-reduce between the 2 processes ({'gloo' if args.quick else 'NCCL'}, {allreduce_bytes / 2**20:g} "
            f"MiB float32): {busbw / 1e9:.1f} GB/s bus bandwidth")
    if trainable is not None:
        link += (f"; one all-reduce of the {trainable:,} trainable parameters' float32 gradients takes "
                 f"{trainable * 4 / busbw:.3f} s at it (a DDP step's communication, hidden only behind the last "
                 "micro-batch's backward)")
    lines.insert(0, link)
    model = "tiny config (float32, CPU, gloo; the 1- and 2-process runs at once, sharing the cores)" if args.quick else (
        "MambaVLM-2.8B, random weights: LLM float32 master weights + bf16 autocast, gradient checkpointing")
    setup = (f"{model}; synthetic Shapes-VQA records; global batch {args.global_batch}, micro-batch "
             f"{args.micro_batch} per process, {args.steps} steps (the first untimed"
             + (f"; step {args.profile_step} profiled (not timed)" if args.profile_step else "")
             + "); gradients reduced "
             + ("after every micro-batch (`train.sync_each_batch=true`)" if args.sync_each_batch else
                "once per optimiser step (accelerate's no_sync over the other micro-batches)")
             + f"; {versions()}")
    table = markdown_table(
        ["strategy", "processes", "accumulation", "tokens/s", "samples/s", "s / step", "waiting for data",
         "peak GiB per process", "step losses"], rows
    )
    return write_report(args.out or default_out("multi_gpu", args.quick),
                        "Fine-tuning on 1 and 2 processes per accelerate strategy", device,
                        [setup, table, "\n".join(lines)])


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
