"""llama.cpp's weight repack on this CPU (store/probes.py, engine/backends/llamacpp/repack.py): the
decision on recorded /proc/cpuinfo texts of an AMX machine and of an AMD one, the verdict cache,
and the probe child, crashing for real and running for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmhost.hardware import CpuInfo, parse_cpuinfo
from llmhost.store.probes import FILE, Verdicts, decide_repack, repack_key

CPUINFO = Path(__file__).parent / "fixtures" / "cpuinfo"


@pytest.fixture
def amd() -> CpuInfo:
    return parse_cpuinfo((CPUINFO / "amd-epyc-kvm-2cpu.txt").read_text())


@pytest.fixture
def intel() -> CpuInfo:
    return parse_cpuinfo((CPUINFO / "intel-sapphire-rapids-kvm-2cpu.txt").read_text())


@pytest.fixture
def verdicts(tmp_path, monkeypatch) -> Verdicts:
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path))
    return Verdicts()


def test_cpuinfo_is_read_from_the_first_cpu(amd, intel) -> None:
    assert amd.model == "AMD EPYC" and "avx512f" in amd.flags and not amd.amx
    assert intel.model.startswith("Intel(R) Xeon(R) Platinum 8481C") and intel.amx
    assert {"amx_int8", "amx_bf16", "avx512_vnni"} <= intel.flags


def test_no_amx_repacks_without_a_probe(amd) -> None:
    decision = decide_repack("auto", amd, None)
    assert decision.use is True and "no AMX" in decision.reason


def test_amx_is_probed_once_then_the_verdict_decides(intel) -> None:
    unknown = decide_repack("auto", intel, None)
    assert unknown.use is None and "probed once" in unknown.reason
    crashed = decide_repack("auto", intel, {"works": False, "detail": "was killed by SIGSEGV", "at": 0})
    assert crashed.use is False and "SIGSEGV" in crashed.reason and "faults" in crashed.reason
    assert decide_repack("auto", intel, {"works": True, "at": 0}).use is True


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_setting_overrides_what_is_known(amd, intel, setting) -> None:
    for cpu in (amd, intel):
        for verdict in (None, {"works": False}, {"works": True}):
            decision = decide_repack(setting, cpu, verdict)
            assert decision.use is (setting == "on") and f"--weight-repack {setting}" in decision.reason


def test_a_verdict_belongs_to_one_binding_and_one_cpu(amd, intel) -> None:
    keys = {repack_key(v, c) for v in ("0.3.36", "0.3.37") for c in (amd, intel)}
    assert len(keys) == 4
    flagless = CpuInfo(intel.model, intel.flags - {"amx_tile"})  # a hypervisor hides AMX
    assert repack_key("0.3.36", flagless) != repack_key("0.3.36", intel)


def test_verdicts_survive_a_damaged_file_and_leave_no_temporary(verdicts) -> None:
    verdicts.put("a", {"works": False, "detail": "x"})
    verdicts.put("b", {"works": True})
    assert verdicts.get("a")["works"] is False and verdicts.get("b")["works"] is True
    assert [p.name for p in verdicts.path.parent.iterdir()] == [FILE]
    verdicts.path.write_text("{not json")
    assert verdicts.get("a") is None
    verdicts.put("c", {"works": True})  # and a new verdict replaces the damaged file
    assert json.loads(verdicts.path.read_text())["c"]["works"] is True


def test_a_probe_that_crashes_turns_the_repack_off_and_is_remembered(verdicts) -> None:
    """A real segmentation fault in the child (what ggml's AMX kernels do on some virtual
    machines): this process carries on, and the verdict is kept for this binding and CPU."""
    from llmhost.engine.backends.llamacpp.repack import probe
    from llmhost.hardware import cpu_info
    from llmhost.store.probes import llama_cpp_version

    crash = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
    decision = probe(Path("unused.gguf"), child=crash)
    assert decision.use is False and "SIGSEGV" in decision.reason
    kept = verdicts.get(repack_key(llama_cpp_version() or "?", cpu_info()))
    assert kept is not None and kept["works"] is False and "SIGSEGV" in kept["detail"]
    if cpu_info().amx:  # what a later load decides here without probing again
        assert decide_repack("auto", cpu_info(), kept).use is False


def test_a_probe_that_cannot_start_decides_nothing_for_good(verdicts, tmp_path) -> None:
    from llmhost.engine.backends.llamacpp.repack import probe

    decision = probe(tmp_path / "no-such.gguf")  # the real child: it cannot load the file
    assert decision.use is False and "could not run" in decision.reason
    assert not verdicts.path.exists()


def test_a_hung_probe_is_stopped(verdicts) -> None:
    from llmhost.engine.backends.llamacpp.repack import probe

    decision = probe(Path("unused.gguf"), timeout=1, child=[sys.executable, "-c", "while True: pass"])
    assert decision.use is False and "did not finish within 1 s" in decision.reason


def test_the_real_probe_runs_the_repack_on_the_embedded_model(verdicts) -> None:
    """The child this machine's first load runs on an AMX CPU, run here: it loads the embedded
    model with the repack on, evaluates a batch and decodes a step."""
    from engines import require

    require("llamacpp")
    from llmhost.engine.backends.llamacpp.repack import probe
    from llmhost.hardware import cpu_info
    from llmhost.store.embedded import embedded_gguf

    decision = probe(embedded_gguf()[0])
    if cpu_info().amx and decision.use is False:
        pytest.skip(f"the repack faults on this machine, as the probe is there to find: {decision.reason}")
    assert decision.use is True and "probed now" in decision.reason, decision.reason


def test_an_amx_machine_whose_probe_crashes_loads_without_the_repack_and_probes_once(
    verdicts, intel, monkeypatch
) -> None:
    """The whole decision at load, on an AMX CPU (the recorded one) whose probe faults for real:
    the first load probes and turns the repack off; later loads read the verdict, no child."""
    from llmhost import hardware
    from llmhost.engine.backends.llamacpp import repack as ggml_repack

    monkeypatch.setattr(hardware, "cpu_info", lambda: intel)
    monkeypatch.setattr(ggml_repack, "cpu_info", lambda: intel)
    runs: list[Path] = []

    def crashing(model: Path) -> list[str]:
        runs.append(model)
        return [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]

    monkeypatch.setattr(ggml_repack, "_child_command", crashing)
    first = ggml_repack.decide("auto", Path("model.gguf"))
    assert first.use is False and "SIGSEGV" in first.reason and len(runs) == 1
    later = ggml_repack.decide("auto", Path("other.gguf"))
    assert later.use is False and "AMX faults on this machine" in later.reason and len(runs) == 1
    assert ggml_repack.decide("on", Path("model.gguf")).use is True and len(runs) == 1
