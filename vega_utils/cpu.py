"""What this CPU multiplies natively: the one rule every CPU precision choice in the project follows.

bf16 autocast pays off only where the CPU has bf16 dot-product instructions (x86: AVX512-BF16 or AMX-BF16;
Arm: the BF16 extension). Elsewhere torch emulates bf16 products by converting to float32 and back, and a bf16
epoch ran 17x slower than a float32 one on an AVX2-only AMD EPYC. The choice follows what torch will really run:
ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA narrow ATen's and oneDNN's kernels below what the chip has, and a CPU so
narrowed counts as the narrower one.

    native_bf16()          -> (True/False, "this CPU multiplies bf16 natively (amx_bf16)")
    cpu_dtype("auto")      -> (torch.bfloat16 or None for float32, the reason in words)
"""
import os
import platform
import subprocess
from functools import lru_cache

import torch

X86_BF16 = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo flag names, strongest first
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow its bf16 dot-product kernels
ONEDNN_BF16_ISAS = {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"}


def cpu_flags():
    """The CPU's feature names as the operating system lists them (lower case), or an empty set when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):   # x86, Arm
                    return set(value.lower().split())
    except OSError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return {"bf16"} if out == "1" else set()
        except (OSError, subprocess.SubprocessError):
            return set()
    flags = set()   # other systems: what torch's own cpuinfo reports
    if torch.cpu._is_avx512_bf16_supported():
        flags.add("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        flags.add("amx_bf16")
    return flags


def decide(flags, machine, aten_capability, onednn_isa):
    """(native, reason) from the facts alone, so that the rule can be tested on any CPU.

    flags: feature names (lower case); machine: platform.machine(); aten_capability: what
    torch.backends.cpu.get_cpu_capability() says ("AVX2", "AVX512", "DEFAULT", "SVE256", ...); onednn_isa: the
    ONEDNN_MAX_CPU_ISA variable or ""."""
    capability = aten_capability.lower()
    if machine.lower() in ("arm64", "aarch64"):
        if "bf16" in flags:
            return True, "this CPU multiplies bf16 natively (arm bf16)"
        return False, f"this CPU has no native bf16 (arm, {capability})"
    have = next((f for f in X86_BF16 if f in flags), None)
    if have is None:
        return False, f"this CPU has no native bf16 ({capability})"
    narrowed = []
    if not capability.startswith("avx512"):
        narrowed.append(f"ATEN_CPU_CAPABILITY gives {capability}")
    if onednn_isa and onednn_isa.upper() not in ONEDNN_BF16_ISAS:
        narrowed.append(f"ONEDNN_MAX_CPU_ISA={onednn_isa}")
    if narrowed:
        return False, f"this CPU has {have} but torch is narrowed below it ({', '.join(narrowed)}), so bf16 is " \
                      f"emulated ({capability})"
    return True, f"this CPU multiplies bf16 natively ({have})"


@lru_cache(maxsize=1)
def native_bf16():
    """(native, reason) for this process's CPU, as torch will run it."""
    return decide(cpu_flags(), platform.machine(), torch.backends.cpu.get_cpu_capability(),
                  os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip())


def cpu_dtype(amp):
    """(autocast dtype or None for float32, reason) for a CPU precision setting: auto, off or bf16."""
    if amp == "off":
        return None, "--amp off"
    native, why = native_bf16()
    if amp == "bf16":
        return torch.bfloat16, ("--amp bf16" if native else
                                f"--amp bf16, though {why}: it is emulated and will be slow here")
    return (torch.bfloat16 if native else None), why
