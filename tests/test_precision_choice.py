"""--amp auto on the CPU: bf16 only where the CPU multiplies bf16 natively, as torch will run it (vega_utils/cpu.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from vega_utils import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARROWED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ZEN3 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SKYLAKE_X = ZEN3 | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize("flags, machine, aten, isa, native, words", [
    (ZEN3, "x86_64", "AVX2", "", False, "this CPU has no native bf16 (avx2)"),
    (SKYLAKE_X, "x86_64", "AVX512", "", False, "this CPU has no native bf16 (avx512)"),
    (ZEN4, "x86_64", "AVX512", "", True, "natively (avx512_bf16)"),
    (SAPPHIRE_RAPIDS, "x86_64", "AVX512", "", True, "natively (amx_bf16)"),
    (SAPPHIRE_RAPIDS, "x86_64", "AVX512", "ALL", True, "natively (amx_bf16)"),
    (SAPPHIRE_RAPIDS, "x86_64", "AVX512", "avx512_core_amx", True, "natively (amx_bf16)"),
    # narrowed by the environment: what torch runs, not what the chip has
    (SAPPHIRE_RAPIDS, "x86_64", "AVX2", "AVX2", False, "ATEN_CPU_CAPABILITY gives avx2, ONEDNN_MAX_CPU_ISA=AVX2"),
    (ZEN4, "x86_64", "AVX2", "", False, "ATEN_CPU_CAPABILITY gives avx2"),
    (ZEN4, "x86_64", "AVX512", "AVX512_CORE_VNNI", False, "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI"),
    ({"fp", "asimd", "sve", "bf16", "i8mm"}, "aarch64", "SVE256", "", True, "natively (arm bf16)"),   # Graviton 3
    ({"fp", "asimd", "crc32"}, "aarch64", "DEFAULT", "", False, "no native bf16 (arm, default)"),      # Graviton 2
    ({"bf16"}, "arm64", "DEFAULT", "", True, "natively (arm bf16)"),                                    # Apple M2
    (set(), "arm64", "DEFAULT", "", False, "no native bf16"),                                           # Apple M1
])
def test_choice_by_cpu_features(flags, machine, aten, isa, native, words):
    got, why = cpu.decide(flags, machine, aten, isa)
    assert got is native and words in why


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_and_bf16_still_forces(monkeypatch, native):
    monkeypatch.setattr(cpu, "native_bf16", lambda: (native, "the reason"))
    device = torch.device("cpu")
    assert train.resolve_amp("auto", device) == (torch.bfloat16 if native else None)
    assert train.amp_choice("auto", device)[1] == "the reason"
    dtype, why = train.amp_choice("bf16", device)
    assert dtype == torch.bfloat16 and (("emulated" in why) is not native)
    assert train.resolve_amp("off", device) is None
    assert train.resolve_amp("auto", torch.device("cuda")) == torch.float16   # CUDA: the reference's fp16


def run_small(tmp_path, env_extra, *flags):
    """run.py on a small generated set in a subprocess with env_extra: (exit code, output, config.json)."""
    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    data = tmp_path / "IEMOCAP.pkl"
    if not data.exists():
        make_synthetic_dataset(str(data), seed=0, n_train=6, n_test=3, min_len=4, max_len=12)
        make_synthetic_anchor_cache(str(tmp_path / "anchor.pt"), clip_dim=512, seed=0)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    cmd = [sys.executable, "run.py", "--data_path", str(data), "--anchor_path", str(tmp_path / "anchor.pt"),
           "--hidden_dim", "32", "--n_head", "4", "--epochs", "1", "--output_dir", str(out), "--no_progress", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env_extra})
    configs = list(out.glob("*/*/config.json"))
    return proc.returncode, proc.stdout + proc.stderr, json.load(open(configs[0])) if configs else None


def test_narrowed_to_avx2_trains_in_float32_and_bf16_says_emulated(tmp_path):
    """With the CPU narrowed to AVX2 (as on most laptops), auto trains in float32 and says why on its first
    training line and in config.json; --amp bf16 still runs, with one line saying it is emulated."""
    code, out, saved = run_small(tmp_path, NARROWED)
    assert code == 0, out
    first = next(line for line in out.splitlines() if line.startswith("training in"))
    assert first.startswith("training in float32: ") and "bf16" in first
    assert saved["train_precision"] == "float32" and saved["train_precision_reason"] == first.split(": ", 1)[1]
    code, out, saved = run_small(tmp_path, NARROWED, "--amp", "bf16")
    assert code == 0, out
    assert "training in bfloat16: --amp bf16, though" in out and "emulated and will be slow here" in out
    assert saved["train_precision"] == "bfloat16"
