"""The shape of the package: one direction of imports, no circles, backends named after their
`--engine` values, and a model reference resolved once per load."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "llmhost"

# layer → the llmhost layers it may import (itself included); anything else is a violation
ALLOWED = {
    "cli": {"cli", "server", "web", "finetune", "engine", "store", "config", "hardware", "errors", "installs",
            "procs", "portable"},
    "server": {"server", "engine", "store", "config", "hardware", "errors", "portable"},
    "web": {"web", "engine", "store", "config", "errors", "procs", "server", "portable"},
    "finetune": {"finetune", "engine", "store", "config", "hardware", "errors", "portable"},
    "engine": {"engine", "store", "config", "hardware", "errors", "installs", "procs", "portable"},
    "store": {"store", "config", "hardware", "errors", "installs", "portable"},
    "testing": {"testing"},  # model builders for tests and benches; nothing imports it
}  # fmt: skip
FRAMEWORKS = ("fastapi", "starlette", "uvicorn", "streamlit", "typer", "rich")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports, at module level or inside functions (lazy imports count)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, level - 1 packages up
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i for i in imports(p, known) if i in known and i != m} for m, p in known.items()}


def test_no_import_circles() -> None:
    g = graph()
    # a package importing its own submodules (re-exports) is not a circle with them
    edges = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    assert circles == []


def test_the_graph_sees_lazy_imports() -> None:
    # the test above would pass vacuously if imports inside functions were missed
    assert "llmhost.engine.backends.gguf" in graph()["llmhost.engine.ref"]


def test_imports_go_one_way() -> None:
    wrong = []
    for m, deps in graph().items():
        layer = m.split(".")[1] if m.count(".") else ""
        allowed = ALLOWED.get(layer)
        if allowed is None:
            continue
        for d in deps:
            target = d.split(".")[1] if d.count(".") else ""
            if target and target not in allowed:
                wrong.append(f"{m} → {d}")
    assert wrong == []


#: where OS-specific calls may live: the portability module, and the vLLM wrapper (vLLM runs on
#: Linux only, and the wrapper runs under vLLM's Python, without llmhost)
OS_SPECIFIC = {"llmhost.portable", "llmhost.engine.backends.vllm_child"}


def test_linux_only_calls_live_in_the_portability_module() -> None:
    # ruff's banned-API rule (pyproject.toml) covers imported names; these two are a path and a
    # libc function reached through ctypes, which no import rule sees
    found = []
    for m, path in modules().items():
        if m in OS_SPECIFIC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("/proc/")
            ):
                found.append(f"{m}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in ("prctl", "malloc_trim"):
                found.append(f"{m}: .{node.attr}")
    assert found == []


def test_the_os_rule_sees_what_it_bans() -> None:
    # the test above would pass vacuously if the walk missed these
    text = (PACKAGE / "portable.py").read_text(encoding="utf-8")
    assert '"/proc/cpuinfo"' in text and ".prctl(" in text


def test_nothing_in_the_package_imports_its_test_helpers() -> None:
    users = sorted(m for m, deps in graph().items() if "llmhost.testing" in deps)
    assert users == []


def test_benches_use_the_package_not_the_tests() -> None:
    """A bench imports llmhost (llmhost.testing for built models), never tests/ or conftest (it
    may read the tests' data files)."""
    import re

    wrong = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"sys\.path\.(insert|append)\(.*tests|^\s*(from|import) conftest", line):
                wrong.append(f"{path.name}: {line.strip()}")
    assert wrong == []


def test_no_source_file_is_longer_than_500_lines() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert long == {}


def test_engines_take_one_request_value() -> None:
    """Every engine's stream / astream / generate takes the one GenerationRequest, and no function
    threads a request's fields (messages and prompt, params and cancel) as separate arguments."""
    wrong = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = [a.arg for a in node.args.args + node.args.kwonlyargs]
            method = m.startswith("llmhost.engine") and names[:1] == ["self"]
            if method and node.name in ("stream", "astream", "generate") and names != ["self", "request"]:
                wrong.append(f"{m}.{node.name}({', '.join(names)})")
            if {"messages", "prompt"} <= set(names) or {"params", "cancel"} <= set(names):
                wrong.append(f"{m}.{node.name}({', '.join(names)})")
    assert wrong == []


def test_the_engine_imports_no_framework() -> None:
    known = modules()
    used = {
        (m, i)
        for m, p in known.items()
        if m.startswith("llmhost.engine")
        for i in imports(p, known)
        if i.split(".")[0] in FRAMEWORKS
    }
    assert used == set()


def test_backends_are_named_after_their_engine() -> None:
    from llmhost.config import LoadSettings
    from llmhost.engine.backends import ENGINES

    values = set(LoadSettings.model_fields["engine"].annotation.__args__) - {"auto"}
    assert set(ENGINES) == values
    folder = PACKAGE / "engine" / "backends"
    # besides the engines: the converters (GGUF, Qwen-1), the script vLLM's Python runs and the
    # transformers engine's per-row LoRA, prefix cache, folder reading, speculation's checks, q8_0 cache
    others = {"__init__", "gguf", "qwen1", "vllm_child", "lora", "prefix"}
    others |= {"hf_folder", "hf_verify", "hf_kvcache"}
    found = {p.stem for p in folder.glob("*.py")} | {
        p.name for p in folder.iterdir() if (p / "__init__.py").exists()
    }
    assert found == values | others
    for engine in ENGINES:
        module = (
            folder / f"{engine}.py" if (folder / f"{engine}.py").exists() else folder / engine / "__init__.py"
        )
        assert hasattr(importlib.import_module(f"llmhost.engine.backends.{engine}"), "load"), module
        assert "load" in module.read_text(encoding="utf-8"), f"{module} defines or exports no load()"


def test_no_module_shadows_the_standard_library() -> None:
    import sys

    clashes = {m for m in modules() if m.rsplit(".", 1)[-1] in sys.stdlib_module_names}
    assert clashes == set()


# -- one resolution per load ------------------------------------------------------------------


@pytest.fixture
def count_reads(monkeypatch):
    """Counts manifest reads: every way of asking the store about a model goes through one."""
    from llmhost.store import local

    reads: list[Path] = []
    real = local._read

    def counting(folder: Path):
        reads.append(folder)
        return real(folder)

    monkeypatch.setattr(local, "_read", counting)
    return reads


@pytest.fixture(scope="module")
def stored(home: Path, embedded_dir: Path) -> dict[str, str]:
    from llmhost.store.embedded import embedded_gguf
    from llmhost.store.local import Store, import_path

    store = Store()
    names = {"hf": "layout-hf", "gguf": "layout-gguf", "lora": "layout-lora"}
    for fmt, source in (("hf", embedded_dir), ("gguf", embedded_gguf()[0])):
        if store.get(names[fmt]) is None:
            import_path(store, source, names[fmt])
    with store.write(names["lora"]) as w:  # only a record: enough to resolve, not to load
        (w.staging / "adapter_config.json").write_text("{}")
        w.commit("lora", "finetune", extra={"base": names["hf"]})
    return names


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_store_model_is_read_once_per_load(stored, count_reads, fmt) -> None:
    from llmhost.config import LoadSettings
    from llmhost.engine import load

    engine = load(stored[fmt], LoadSettings(engine="auto", context_length=256))
    try:
        assert engine.name == stored[fmt]
        assert len(count_reads) == 1, count_reads
    finally:
        engine.close()


def test_an_adapter_reads_itself_and_its_base_once(stored, count_reads) -> None:
    from llmhost.engine.ref import resolve_ref

    ref = resolve_ref(stored["lora"])
    assert ref.is_adapter and ref.base is not None and ref.base.name == stored["hf"]
    assert ref.base.key == stored["hf"]
    assert len(count_reads) == 2, count_reads
