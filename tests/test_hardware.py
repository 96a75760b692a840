"""Native bf16 on the CPU: detected from /proc/cpuinfo, warned about when missing, skipped by the CPU benchmark."""

from __future__ import annotations

import logging
import sys

import torch
from tests.helpers import ROOT

from grape_plugin import hardware
from grape_plugin.hardware import native_bf16_cpu, warn_if_slow_bf16

AVX2_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n" * 2
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_comes_from_the_cpu_flags():
    assert not native_bf16_cpu(AVX2_XEON)
    assert native_bf16_cpu(SAPPHIRE_RAPIDS)
    assert native_bf16_cpu("flags\t: avx512f avx512_bf16\n")  # Cooper Lake / Zen 4: AVX512-BF16 without AMX
    assert native_bf16_cpu(GRAVITON3)
    assert not native_bf16_cpu("flags\t: avx512f avx512bw avx512_vnni\n")  # AVX512 alone emulates bf16
    assert isinstance(native_bf16_cpu(), bool)  # this machine's own /proc/cpuinfo


def test_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: False)
    with caplog.at_level(logging.WARNING, logger="grape_plugin.hardware"):
        assert warn_if_slow_bf16("cpu", "bf16")
        assert warn_if_slow_bf16("cpu", torch.bfloat16)
        assert not warn_if_slow_bf16("cpu", "fp32")
        assert not warn_if_slow_bf16("cpu", "auto")  # auto is fp32 on CPUs
        assert not warn_if_slow_bf16("cuda:0", "bf16")
    assert len(caplog.records) == 2 and "slower than fp32" in caplog.records[0].getMessage()
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: True)
    assert not warn_if_slow_bf16("cpu", "bf16")


def test_loading_a_model_in_bf16_on_such_a_cpu_warns(tiny_model, monkeypatch, caplog):
    from grape_plugin.models import model_spec

    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: False)
    with caplog.at_level(logging.WARNING, logger="grape_plugin.hardware"):
        model_spec(str(tiny_model), device="cpu", dtype="bf16")
    assert any("slower than fp32" in r.getMessage() for r in caplog.records)


def test_the_cpu_benchmark_skips_bf16_without_native_bf16(tiny_model, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_scoring

    monkeypatch.setattr(bench_scoring, "native_bf16_cpu", lambda: False)
    bench_scoring.main(["--model", str(tiny_model), "--instructions", "1", "--repeats", "1", "--batch-tokens", "1024",
                        "--max-length", "1024"])  # the tiny BPE makes long prompts: the prefix cap is 2 x this
    out = capsys.readouterr().out
    assert "no native bf16" in out and "ours bf16" not in out and "bf16 --batch-tokens" not in out
    last = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    assert last["bf16_speedup"] == last["bf16_agreement"] == "skipped"
    assert float(last["fp32_speedup"]) > 0 and float(last["max_abs_diff"]) < 1e-4
