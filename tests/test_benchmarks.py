"""The benchmark scripts (benchmarks/) run in --quick mode and write their tables."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, subprocess_env


INTERPRETED = ("decode_projections", "selective_scan")
"""Scripts whose --quick runs the Triton kernels under the interpreter: TRITON_INTERPRET must be set before
triton is imported, so they run in a process of their own."""


@pytest.mark.parametrize("script", ["generation", "projector", "training_throughput", "long_context", "eval_throughput",
                                    "prefill", "lora_step", "data_loader", *INTERPRETED])
def test_benchmark_quick_mode_runs_and_writes_its_table(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Each script's --quick run prints its report and writes the same text, a table of at least two rows.
    The scripts without Triton kernels run in this process, as ``python -m benchmarks.<script>`` would (their
    ``main`` is ``run`` of the parsed arguments; the package's import alone costs a subprocess 5-10 s), with
    the torch threads and random state they change put back after."""
    out = tmp_path / f"{script}.md"
    argv = ["--quick", "--out", str(out)]
    if script in INTERPRETED:
        result = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{script}", *argv], cwd=ROOT,
            env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
    else:
        module = importlib.import_module(f"benchmarks.{script}")
        monkeypatch.chdir(ROOT)
        threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng(devices=[]):
                module.run(module.build_parser().parse_args(argv))
        finally:
            torch.set_num_threads(threads)
        stdout = capsys.readouterr().out
    text = out.read_text()
    assert text in stdout
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) >= 4 and table[1].startswith("|---")
    assert "- device: CPU" in text


def test_multi_gpu_quick_mode_compares_one_and_two_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """DDP on 1 and 2 gloo processes through accelerate launch: the report's two rows hold the
    same step losses (the same global batches), its ratio line is the rows' tokens/s ratio and its
    per-step line 2 t2 - t1 of the rows' step seconds; step 2 is profiled on every process (its tables
    kept, the step not timed). A second call with the same ``--runs-dir`` reports the kept runs without
    running them again (the all-reduce measurement replaced: it launches processes). Both calls run in
    this process, as ``python -m benchmarks.multi_gpu`` would (its ``main`` is ``run`` of the parsed
    arguments): the runs themselves are still ``accelerate launch`` processes."""
    import benchmarks.multi_gpu as multi_gpu

    out, runs_dir = tmp_path / "multi_gpu.md", tmp_path / "runs"
    argv = ["--quick", "--steps", "3", "--profile-step", "2", "--out", str(out), "--runs-dir", str(runs_dir)]
    monkeypatch.chdir(ROOT)
    multi_gpu.run(multi_gpu.build_parser().parse_args(argv))
    text = out.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ddp")]
    assert [(r[1], r[2]) for r in rows] == [("1", "4"), ("2", "2")]  # processes, accumulation steps
    losses = [[float(x) for x in r[8].rstrip(" |").split()] for r in rows]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    tokens = [float(r[3].replace(",", "")) for r in rows]
    ratio = float(text.split("2 / 1 = ")[1].split("x")[0])
    # the rows show tokens/s rounded to whole tokens, the ratio line to 0.01: the ratio of the rows' true
    # values lies in the interval the rounding leaves (one process can run at a few dozen tokens/s here)
    low, high = (tokens[1] - 0.5) / (tokens[0] + 0.5), (tokens[1] + 0.5) / (tokens[0] - 0.5)
    assert low - 0.005 <= ratio <= high + 0.005, (ratio, tokens)
    t1, t2 = (float(r[5]) for r in rows)
    assert float(text.split("2 t2 - t1 = ")[1].split(" s")[0]) == pytest.approx(2 * t2 - t1, abs=2e-3)
    assert "within 0.02" in text
    assert sorted(p.name for p in runs_dir.iterdir()) == [
        "ddp-1-step-2-rank-0.txt", "ddp-1.json", "ddp-1.log", "ddp-2-step-2-rank-0.txt", "ddp-2-step-2-rank-1.txt",
        "ddp-2.json", "ddp-2.log"]
    assert "operators by their own CPU time" in (runs_dir / "ddp-2-step-2-rank-1.txt").read_text()
    assert "step 2 profiled (not timed)" in text
    for name in ("ddp-1", "ddp-2"):  # step 3 timed: not the first, not the profiled one
        assert json.loads((runs_dir / f"{name}.json").read_text())["metrics"]["throughput"]["timed_steps"] == 1
    # the all-reduce line: the gradients' seconds are the 1-process log's trainable parameters x 4 bytes
    # over the measured bus bandwidth
    trainable = int(re.search(r"([\d,]+) trainable parameters", (runs_dir / "ddp-1.log").read_text()).group(1)
                    .replace(",", ""))
    busbw = float(text.split("MiB float32): ")[1].split(" GB/s")[0]) * 1e9
    assert busbw > 0
    seconds = float(text.split("float32 gradients takes ")[1].split(" s")[0])
    assert seconds == pytest.approx(trainable * 4 / busbw, rel=0.06, abs=1.5e-3)

    monkeypatch.setattr(multi_gpu, "allreduce_bus_bandwidth", lambda *a, **k: busbw)
    capsys.readouterr()
    multi_gpu.run(multi_gpu.build_parser().parse_args(argv))
    again = capsys.readouterr().out
    assert "kept from" in again and "ddp x 1:" not in again  # nothing ran
    def table_and_ratios(report: str) -> list[str]:  # the all-reduce is measured again: not compared
        return [line for line in report.splitlines() if line.startswith(("|", "- ddp"))]

    assert table_and_ratios(out.read_text()) == table_and_ratios(text)

    # --processes 1 over a runs dir without the 2-process run: nothing runs, the report says why
    for path in runs_dir.glob("ddp-2*"):
        path.unlink()
    multi_gpu.run(multi_gpu.build_parser().parse_args([*argv, "--processes", "1"]))
    assert not list(runs_dir.glob("ddp-2*"))
    assert "- ddp: no run on 2 process(es) (--processes 1)" in out.read_text()


def test_long_context_bandwidth_floor_counts_weights_kv_and_states() -> None:
    """The tiny teacher (4 attention layers, 2 K/V heads of 16, float32) at 128 tokens reads its weights
    and 4 x 2 (K, V) x 2 heads x 128 x 16 x 4 bytes; the linear student its weights and its states."""
    from benchmarks.long_context import build_models, step_bytes

    models = build_models("tiny", torch.device("cpu"), torch.float32, 256)
    teacher = models["teacher"]
    weights = sum(p.numel() * 4 for p in teacher.parameters())
    assert step_bytes(teacher, 128) == weights + 4 * 2 * 2 * 128 * 16 * 4
    linear = models["linear (0 % attention)"]
    states = step_bytes(linear, 128) - sum(p.numel() * 4 for p in linear.parameters())
    assert states == step_bytes(linear, 4096) - sum(p.numel() * 4 for p in linear.parameters()) > 0  # no K/V


def test_generation_bandwidth_floor_counts_weights_and_each_sequences_state_twice() -> None:
    """The floor's state bytes equal the decoder's own allocated state (conv + SSM per layer), read and
    written once per step per sequence: 4.8e12 B/s makes ms = bytes / 4.8e9."""
    from benchmarks.generation import decode_floor_ms
    from mambavlm.generation.mamba1 import StatefulMambaMixer
    from tests.conftest import tiny_vlm

    model = tiny_vlm()
    weights = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    states = [StatefulMambaMixer(layer.mixer).allocate(3) for layer in model.llm.backbone.layers]
    state_bytes = sum(s.conv.nbytes + s.ssm.nbytes for s in states)
    assert decode_floor_ms(model, 3, 4.8e12) == pytest.approx((weights + 2 * state_bytes) / 4.8e9)
    assert decode_floor_ms(model, 3, None) is None


def test_kernel_trace_busy_time_gaps_and_totals_by_hand() -> None:
    """Kernels [0, 10] a, [5, 12] b (overlapping a), [20, 25] a, [30, 31] c: busy = 12 + 5 + 1,
    gaps 8 (b -> a) and 5 (a -> c); a ran 15 us in 2 launches."""
    from benchmarks.profiling import KernelTrace

    trace = KernelTrace([(0.0, 10.0, "a"), (5.0, 12.0, "b"), (20.0, 25.0, "a"), (30.0, 31.0, "c")])
    busy, gaps = trace.busy_and_gaps()
    assert busy == 18.0 and trace.span_us == 31.0
    assert gaps == [(8.0, "b", "a"), (5.0, "a", "c")]
    assert trace.by_name() == {"a": (15.0, 2), "b": (7.0, 1), "c": (1.0, 1)}
    assert KernelTrace([]).busy_and_gaps() == (0.0, []) and KernelTrace([]).span_us == 0.0


def test_training_crossover_by_hand() -> None:
    """Transformer: 1/20000 s per token at 1000 tokens, 1/10000 at 3000 -> a + b L with b = 2.5e-8,
    a = 2.5e-5; ours flat at 1e-4 s per token: they meet at L = (1e-4 - 2.5e-5) / 2.5e-8 = 3000."""
    from benchmarks.training_throughput import Result, crossover_tokens

    def result(tokens_per_s: float, tokens: int) -> Result:
        return Result("x", 1, 1, tokens / tokens_per_s, tokens, None)

    short = (result(10_000, 1000), result(20_000, 1000))
    long = (result(10_000, 3000), result(10_000, 3000))
    assert crossover_tokens(short, long) == pytest.approx(3000)
    assert crossover_tokens(short, (result(10_000, 3000), result(30_000, 3000))) is None


def test_multi_gpu_reuses_only_kept_runs_of_the_same_batch_sizes(tmp_path: Path) -> None:
    """A kept run of another global or micro-batch is not comparable: left out of the report (run
    again); one of another strategy than asked for too."""
    from benchmarks.multi_gpu import kept_runs

    def keep(name: str, strategy: str, gpus: int, global_batch: int, micro_batch: int) -> None:
        train = {"global_batch_size": global_batch, "micro_batch_size": micro_batch}
        metrics = {"config": {"train": train}, "throughput": {}}
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"strategy": strategy, "gpus": gpus, "seconds": 1.0, "metrics": metrics}))

    keep("ddp-1", "ddp", 1, 128, 4)
    keep("ddp-2", "ddp", 2, 16, 4)
    keep("fsdp-1", "fsdp", 1, 128, 8)
    keep("fsdp-2", "fsdp", 2, 128, 4)
    keep("deepspeed_zero2-1", "deepspeed_zero2", 1, 128, 4)
    (tmp_path / "ddp-1.log").write_text("phase finetune: ..., 1,234 trainable parameters in 5 tensors")
    runs = kept_runs(tmp_path, ["ddp", "fsdp"], 128, 4)
    assert sorted((r.strategy, r.gpus) for r in runs) == [("ddp", 1), ("fsdp", 2)]
    from benchmarks.multi_gpu import trainable_parameters

    assert trainable_parameters(runs) == 1234
    assert kept_runs(tmp_path / "none", ["ddp"], 128, 4) == []
    # a 2-process run kept before train.sync_each_batch existed reduced once per step: not one that syncs
    # each batch; a 1-process run has nothing to reduce and serves both
    assert [(r.strategy, r.gpus) for r in kept_runs(tmp_path, ["fsdp"], 128, 4, sync_each_batch=True)] == []
    keep("ddp-2", "ddp", 2, 128, 4)
    assert [(r.strategy, r.gpus) for r in kept_runs(tmp_path, ["ddp"], 128, 4, sync_each_batch=True)] == [("ddp", 1)]
    synced = json.loads((tmp_path / "ddp-2.json").read_text())
    synced["metrics"]["config"]["train"]["sync_each_batch"] = True
    (tmp_path / "ddp-2.json").write_text(json.dumps(synced))
    assert sorted((r.strategy, r.gpus) for r in kept_runs(tmp_path, ["ddp"], 128, 4, sync_each_batch=True)) == [
        ("ddp", 1), ("ddp", 2)]
    assert [(r.strategy, r.gpus) for r in kept_runs(tmp_path, ["ddp"], 128, 4)] == [("ddp", 1)]


def test_multi_gpu_runs_write_to_shared_memory_only_when_it_holds_them(monkeypatch, tmp_path) -> None:
    import shutil
    from collections import namedtuple

    from benchmarks.multi_gpu import RUN_BYTES, default_work_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * RUN_BYTES))
    assert default_work_dir(2, tmp_path) == tmp_path
    assert default_work_dir(3, tmp_path) is None

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(shutil, "disk_usage", missing)
    assert default_work_dir(1, tmp_path / "absent") is None


def test_kernel_labels_keep_the_functors_a_cut_name_would_drop() -> None:
    """PyTorch's elementwise kernels differ only deep in their template arguments: the label keeps the
    head and names the innermost functor; short names pass unchanged."""
    from benchmarks.profiling import kernel_label

    mul = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<at::native::BinaryFunctor<float, "
           "float, float, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&, "
           "at::native::BinaryFunctor<float, float, float, at::native::binary_internal::MulFunctor<float> > const&)"
           "::{lambda(int)#1}>(int, at::native::gpu_kernel_impl<...>)")
    label = kernel_label(mul)
    assert label == mul[:68] + " ... MulFunctor<float>"
    assert label.endswith(" ... MulFunctor<float>") and len(label) <= 90
    assert kernel_label("_layer_norm_bwd_kernel") == "_layer_norm_bwd_kernel"
    plain = "void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<128, 16, false, true, true, " + "x" * 80
    assert kernel_label(plain) == plain[:90]


def test_multi_gpu_default_batches_are_the_paper_configs() -> None:
    """Without --global-batch / --micro-batch the runs take configs/train/mambavlm-2.8b.yaml's, read as
    the trainer reads it (its model references resolved): the YAML's own numbers, independently parsed."""
    import argparse

    import yaml

    from benchmarks.multi_gpu import PAPER_CONFIG, resolve_batches

    train = yaml.safe_load(PAPER_CONFIG.read_text())["train"]
    args = argparse.Namespace(quick=False, global_batch=None, micro_batch=None)
    resolve_batches(args)
    assert (args.global_batch, args.micro_batch) == (train["global_batch_size"], train["micro_batch_size"])
    args = argparse.Namespace(quick=False, global_batch=16, micro_batch=None)
    resolve_batches(args)
    assert (args.global_batch, args.micro_batch) == (16, train["micro_batch_size"])


def test_multi_gpu_keeps_the_log_of_a_run_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call's time limit interrupts the benchmark (SIGINT) while runs are going: each is terminated and
    its log so far kept beside the finished runs, not as a finished run (kept_runs reads the .json files)."""
    import argparse

    from benchmarks import multi_gpu

    work, runs_dir = tmp_path / "work", tmp_path / "runs"
    work.mkdir()
    runs_dir.mkdir()
    terminated = []

    class Running:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait(self) -> int:
            raise KeyboardInterrupt

        def terminate(self) -> None:
            terminated.append(self.name)

    def launch(strategy, gpus, args, output_dir, visible):
        (work / f"{strategy}-{gpus}.log").write_text(f"{strategy}: step 1/3 | loss 22.3\n")
        return Running(f"{strategy}-{gpus}")

    monkeypatch.setattr(multi_gpu, "launch", launch)
    args = argparse.Namespace(runs_dir=runs_dir)
    with pytest.raises(KeyboardInterrupt):
        multi_gpu.run_all([("ddp", 1, "0"), ("fsdp", 1, "1")], args, work)
    assert terminated == ["ddp-1", "fsdp-1"]
    assert sorted(p.name for p in runs_dir.iterdir()) == ["ddp-1.partial.log", "fsdp-1.partial.log"]
    assert (runs_dir / "fsdp-1.partial.log").read_text() == "fsdp: step 1/3 | loss 22.3\n"
    assert multi_gpu.kept_runs(runs_dir, ["ddp", "fsdp"], 128, 4) == []


def test_decode_projections_names_what_a_launch_shape_lacks_and_passes_other_errors_on() -> None:
    """A launch shape whose pipelined weight tiles exceed shared memory is a row saying so (as Triton
    reported it on an H200: 32 x 2048 bf16 tiles x 3 stages and more), not the end of the sweep."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from benchmarks.decode_projections import out_of_resources

    assert out_of_resources(OutOfResources(287744, 232448, "shared memory")) == "shared memory 287744 > 232448"
    assert out_of_resources(RuntimeError("CUDA error: an illegal memory access")) is None


def test_long_context_words_a_slower_student_as_slower_and_more_memory_as_more() -> None:
    """``--quick`` printed "**0.5x** faster per token" for a student taking twice the teacher's time."""
    from benchmarks.long_context import memory_change, speed_change

    assert speed_change(3.4) == "**3.4x** faster per token"
    assert speed_change(1.0) == "**1.0x** faster per token"
    assert speed_change(0.5) == "**2.0x** slower per token"  # teacher 1 ms, student 2 ms
    assert memory_change(0.513) == "decode memory 51.3 % less"
    assert memory_change(-0.25) == "decode memory 25.0 % more"


def test_generation_per_token_figure_is_the_median_of_each_repeats_own_difference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three repeats, prefill then generation back to back: prefills 0.30, 0.10, 0.20 s, totals 0.80, 0.60,
    0.75 s. Their differences 0.50, 0.50, 0.55 have the median 0.50, so 5 new tokens decode at 0.50 / 4 s
    a token; the difference of the medians (0.75 - 0.20 = 0.55) would say 0.1375 s."""
    import benchmarks.generation as generation

    seconds = iter([0.30, 0.80, 0.10, 0.60, 0.20, 0.75])
    monkeypatch.setattr(generation, "median_seconds", lambda fn, device, repeats, warmup: next(seconds))
    row, tokens = generation.measure("x", torch.device("cpu"), 7, 5, lambda: None, lambda: torch.zeros(1, 5), 3)
    assert (row.prefill_s, row.total_s) == (0.20, 0.75)
    assert row.ms_per_decoded_token == pytest.approx(1e3 * 0.50 / 4)
    assert tokens.shape == (1, 5) and next(seconds, None) is None
