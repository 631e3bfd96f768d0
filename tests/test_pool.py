"""One server, many models (server/pool.py), as a client sees it: a real `llmhost serve --all`
on a store of tiny models and LoRA adapters. Models load on their first request, stay within
the memory budget, unload after --keep-alive; adapters decode on their loaded base, in one batch
with it, exactly as each does alone; a store entry added while the server runs is served."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import cli
from llmhost.engine.request import GenerationRequest
from llmhost.store.local import Store, import_path
from llmhost.testing import build_adapter, build_tiny_model
from servers import LocalServer, ServerProcess, wait_for

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def add_adapter(store: Store, name: str, base: str, folder: Path) -> None:
    """Register an adapter as `llmhost finetune` stores one (format lora, its base's name)."""
    import shutil

    with store.write(name) as w:
        for file in folder.iterdir():
            shutil.copy2(file, w.staging / file.name)
        w.commit("lora", "finetune", extra={"base": base})


@pytest.fixture(scope="module")
def pool_home(tmp_path_factory: pytest.TempPathFactory, home: Path, embedded_dir: Path) -> Path:
    """A home whose store holds three tiny models and two adapters of the first."""
    root = tmp_path_factory.mktemp("pool-home")
    (root / "converted").symlink_to(home / "converted")
    store = Store(root / "models")
    built = tmp_path_factory.mktemp("pool-models")
    for seed in range(3):
        import_path(store, build_tiny_model(built / f"m{seed}", embedded_dir, seed=seed + 10), f"tiny{seed}")
    tiny0 = store.get("tiny0").folder
    for seed, name in ((1, "ft-a"), (2, "ft-b")):
        add_adapter(store, name, "tiny0", build_adapter(built / name, tiny0, seed))
    return root


def llmhost(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return cli.llmhost(*args, home=home, env=env)  # in this process (tests/cli.py)


FLAGS = ("--all", "--engine", "transformers", "--dtype", "float32")


def serve(home: Path, *flags: str) -> LocalServer:
    return LocalServer(*FLAGS, *flags, home=home)  # in this process (tests/servers.py)


def serve_process(home: Path, *flags: str) -> ServerProcess:
    """For what another process sees: `llmhost ps` finds the server through its run entry."""
    return ServerProcess(*FLAGS, *flags, env={"LLMHOST_HOME": str(home)})


def reply(server: LocalServer | ServerProcess, model: str, max_tokens: int = 16) -> str:
    r = server.client().chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].message.content


def ps(server: LocalServer | ServerProcess, key: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with server.http(headers=headers) as http:
        return http.get("/api/ps").json()["models"]


def test_every_store_model_is_listed_and_loads_on_its_first_request(pool_home: Path) -> None:
    server = serve(pool_home)
    try:
        with server.http() as http:
            listed = {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}
        assert {"tiny0", "tiny1", "tiny2", "ft-a", "ft-b"} <= set(listed)
        assert not any(listed.values())  # nothing is loaded before it is asked for
        assert ps(server) == []
        assert reply(server, "tiny1")
        assert [m["name"] for m in ps(server)] == ["tiny1"]
        assert "loading tiny1 on transformers" in server.log
        with server.http() as http:
            listed = {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}
        assert listed["tiny1"] and not listed["tiny0"]
        # a request never names a path: only the names served resolve
        with server.http() as http:
            r = http.post("/v1/chat/completions", json={"model": str(pool_home), "messages": HELLO})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        server.stop()


def test_the_budget_holds_one_model_and_idle_models_unload(pool_home: Path) -> None:
    # each tiny model is estimated at about 0.26 GiB (mostly the runtime's overhead): 0.45 GiB
    # holds one, never two
    server = serve(pool_home, "--memory-gib", "0.45", "--keep-alive", "3s")
    try:
        seen = []
        for name in ("tiny0", "tiny1", "tiny2", "tiny0"):
            assert reply(server, name)
            loaded = ps(server)
            seen.append([m["name"] for m in loaded])
            assert sum(m["memory_gib"] for m in loaded) <= 0.45
        assert seen == [["tiny0"], ["tiny1"], ["tiny2"], ["tiny0"]]
        assert server.log.count("to make room") == 3
        row = ps(server)[0]
        assert row["estimated_gib"] > 0 and row["measured_gib"] is not None and row["idle_s"] >= 0
        # idle past --keep-alive: unloaded
        assert wait_for(lambda: ps(server) == [], timeout=10)
        assert "idle longer than --keep-alive 3s" in server.log
    finally:
        server.stop()


def test_a_model_too_large_for_the_budget_is_refused_with_the_numbers(pool_home: Path) -> None:
    server = serve(pool_home, "--memory-gib", "0.1")
    try:
        with server.http() as http:
            r = http.post("/v1/chat/completions", json={"model": "tiny0", "messages": HELLO})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "model_too_large"
        assert "needs about 0.2" in error["message"] and "0.10 GiB" in error["message"]
        assert ps(server) == []
    finally:
        server.stop()


def stream_text(server: LocalServer | ServerProcess, model: str, marks: dict, max_tokens: int) -> str:
    """A streamed greedy reply; `marks[model]` gets the times of its first and last chunk."""
    parts, first = [], None
    stream = server.client().chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=max_tokens, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic()
            parts.append(chunk.choices[0].delta.content)
    marks[model] = (first, time.monotonic())
    return "".join(parts)


def test_adapters_and_their_base_decode_together_exactly_as_alone(pool_home: Path) -> None:
    server = serve(pool_home)
    try:
        names = ("tiny0", "ft-a", "ft-b")
        alone = {name: reply(server, name, 40) for name in names}
        assert len(set(alone.values())) == 3  # each adapter steers the model its own way
        loaded = ps(server)
        assert len(loaded) == 1 and loaded[0]["name"] == "tiny0"  # one copy of the weights
        assert loaded[0]["adapters"] == ["ft-a", "ft-b"]
        marks: dict = {}
        got: dict = {}
        threads = [
            threading.Thread(target=lambda n=n: got.__setitem__(n, stream_text(server, n, marks, 40)))
            for n in names
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == alone
        # they ran at the same time: every stream started before any ended
        assert max(first for first, _ in marks.values()) < min(last for _, last in marks.values())
    finally:
        server.stop()


def test_a_finetune_that_ends_while_the_server_runs_is_served_at_once(pool_home: Path) -> None:
    data = Path(__file__).parent / "data" / "zorblax.jsonl"
    server = serve(pool_home)
    try:
        before = reply(server, "tiny2")
        args = ["--data", str(data), "--epochs", "2", "--lr", "1e-2", "--name", "fresh"]
        r = llmhost(pool_home, "finetune", "tiny2", *args)
        assert r.returncode == 0, r.stderr[-2000:]
        with server.http() as http:
            assert "fresh" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        after = reply(server, "fresh")
        assert after and after != before
        assert [m["adapters"] for m in ps(server) if m["name"] == "tiny2"] == [["fresh"]]
    finally:
        server.stop()


def test_llmhost_ps_shows_what_each_server_has_loaded(pool_home: Path) -> None:
    server = serve_process(pool_home, "--api-key", "k1")
    try:
        client = server.client(key="k1")
        client.chat.completions.create(model="ft-a", messages=HELLO, max_tokens=4)
        assert "needs its API key" in llmhost(pool_home, "ps").stdout
        r = llmhost(pool_home, "ps", "--json", LLMHOST_API_KEY="k1")
        assert r.returncode == 0, r.stderr
        servers = json.loads(r.stdout)
        mine = [s for s in servers if s["url"] == server.url]
        assert len(mine) == 1
        (row,) = mine[0]["models"]
        assert row["name"] == "tiny0" and row["adapters"] == ["ft-a"] and row["engine"] == "transformers"
        assert row["device"] == "cpu" and row["kv_cache"] == "f16"  # cuda:0, mps, llama.cpp's split; q8_0
        table = llmhost(pool_home, "ps", "--api-key", "k1")
        assert "tiny0" in table.stdout and "ft-a" in table.stdout and server.url in table.stdout
        assert "DEVICE" in table.stdout
    finally:
        server.stop()
    r = llmhost(pool_home, "ps", "--json")
    assert server.url not in r.stdout  # a stopped server is no longer listed


def test_unknown_and_wrong_flags_say_what_to_do(pool_home: Path) -> None:
    r = llmhost(pool_home, "serve", "--all", "--keep-alive", "soon")
    assert r.returncode == 2 and "--keep-alive" in r.stderr and "Traceback" not in r.stderr
    assert "30s, 5m, 1h" in r.stderr


def test_models_named_at_start_load_together_and_a_failure_stops_serve(
    pool_home: Path, tmp_path: Path, monkeypatch
) -> None:
    """`serve A B` loads both before it serves (side by side); a named model that cannot load
    ends the start with its reason, once the others' loads have ended, and leaves none leased."""
    import shutil

    from llmhost.config import LoadSettings
    from llmhost.errors import LlmhostError
    from llmhost.server.pool import ModelPool

    broken = tmp_path / "broken"
    shutil.copytree(Store(pool_home / "models").get("tiny1").folder, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("LLMHOST_HOME", str(pool_home))
    pool = ModelPool(LoadSettings(engine="transformers", dtype="float32"))
    try:
        assert pool.add_named("tiny0", "tiny2") == ["tiny0", "tiny2"]
        with pytest.raises(LlmhostError, match="broken"):
            pool.add_named("tiny1", str(broken))
        loaded = {u.label: u for u in pool.loaded()}
        assert set(loaded) == {"tiny0", "tiny1", "tiny2"}
        assert all(u.leases == 0 and u.pinned for u in loaded.values())
    finally:
        pool.close()
    done = llmhost(pool_home, "serve", "tiny0", str(broken), "--engine", "transformers", "--port", "0")
    assert done.returncode == 1 and "broken" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_page_offers_every_model_and_loads_the_one_picked(pool_home: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).parents[1] / "src" / "llmhost" / "web" / "app.py"
    server = serve(pool_home, "--api-key", "page-key")
    try:
        monkeypatch.setenv("LLMHOST_WEB_SERVER", server.url + "/v1")
        monkeypatch.setenv("LLMHOST_WEB_API_KEY", "page-key")
        monkeypatch.setenv("LLMHOST_WEB_DB", str(pool_home / "page.db"))
        at = AppTest.from_file(str(app), default_timeout=180).run()
        options = at.selectbox(key="model").options
        assert "ft-b (loads on first message)" in options and "tiny2 (loads on first message)" in options
        at.selectbox(key="model").set_value("ft-b")
        at.slider(key="max_tokens").set_value(8)
        at.run()
        at.chat_input(key="prompt").set_value("Hello").run()
        assert not at.exception, at.exception
        assert at.chat_message[1].markdown[0].value.strip()
        assert [m["adapters"] for m in ps(server, "page-key")] == [["ft-b"]]
        at.run()
        assert "ft-b" in at.selectbox(key="model").options  # now loaded: no note
    finally:
        server.stop()


def at_once(models: list, params) -> list[str]:
    """Each model's reply to HELLO, all requested at the same time (one thread each)."""
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = models[i].generate(GenerationRequest(HELLO, params)).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [got[i] for i in range(len(models))]


@pytest.fixture(scope="module")
def embedded_adapters(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> list[Path]:
    """Two adapters of the embedded model on every projection, as `llmhost finetune` trains."""
    root = tmp_path_factory.mktemp("embedded-adapters")
    return [
        build_adapter(root / f"ft{seed}", embedded_dir, seed, rank=8, every_projection=True, scale=0.05)
        for seed in (1, 2)
    ]


def test_llamacpp_applies_each_rows_adapter_as_transformers_does(embedded_adapters: list[Path]) -> None:
    """llama.cpp applies LoRA adapters to a whole context, so each decode step evaluates one
    adapter's rows at a time: base and adapters requested together must give what each gives
    alone. The adapter is converted to llama.cpp's GGUF form (q and k rows reordered as its
    conversion of the base reordered them): it steers the GGUF model as it steers the
    transformers one (their base replies part only where the 4-bit kernels round differently)."""
    from engines import require
    from llmhost.config import LoadSettings
    from llmhost.engine import GenerationParams, load

    require("llamacpp")
    greedy = GenerationParams(temperature=0, max_new_tokens=20)
    replies = {}
    for kind in ("llamacpp", "transformers"):
        engine = load(None, LoadSettings(engine=kind, dtype="float32"))
        try:
            models = [engine, *(engine.add_adapter(f"ft{i}", p) for i, p in enumerate(embedded_adapters))]
            alone = [m.generate(GenerationRequest(HELLO, greedy)).text for m in models]
            assert at_once(models, greedy) == alone, kind
            assert engine.scheduler.peak_batch == 3, kind
            assert len(set(alone)) == 3, kind
            replies[kind] = alone
        finally:
            engine.close()
    # the adapters' replies agree across engines for their first words
    for gguf, hf in zip(replies["llamacpp"][1:], replies["transformers"][1:], strict=True):
        assert gguf.split()[:12] == hf.split()[:12], (gguf, hf)


@pytest.fixture(scope="module")
def embedded_home(
    tmp_path_factory: pytest.TempPathFactory, home: Path, embedded_adapters: list[Path]
) -> Path:
    """A home whose store holds the two adapters of the embedded model."""
    root = tmp_path_factory.mktemp("embedded-home")
    (root / "converted").symlink_to(home / "converted")
    for i, folder in enumerate(embedded_adapters):
        add_adapter(Store(root / "models"), f"ft{i}", "default", folder)
    return root


def test_vllm_serves_adapters_on_its_base_as_transformers_does(embedded_home: Path) -> None:
    """vLLM starts with LoRA enabled and gets each adapter through its runtime loading route the
    first time it is asked for; greedy replies equal the transformers engine's. Then llmhost dies
    (SIGKILL): none of vLLM's processes outlive it (their death signal and process group). The
    shared vLLM server's teardown checks the same for a SIGTERM (engines.Served.stop)."""
    from engines import MODEL, VLLM_FLAGS, require, until_gone, vllm_children

    require("vllm")
    names = (MODEL, "ft0", "ft1")
    reference = serve(embedded_home)
    try:
        expected = {name: reply(reference, name, 24) for name in names}
    finally:
        reference.stop()
    assert len(set(expected.values())) == 3
    flags = ("--all", *VLLM_FLAGS, "--max-model-len", "1024")
    server = ServerProcess(*flags, env={"LLMHOST_HOME": str(embedded_home)}, timeout=600)
    try:
        got = {name: reply(server, name, 24) for name in names}
        assert got == expected
        [row] = ps(server)
        assert row["engine"] == "vllm" and row["adapters"] == ["ft0", "ft1"] and row["device"] == "cpu"
        assert "added adapter ft0" in server.log
        children = vllm_children(server)
        assert any(
            "VLLM::EngineCore" in " ".join(p.cmdline()) or p.name() == "VLLM::EngineCore" for p in children
        )
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
        assert not until_gone(children), [p.cmdline() for p in children]
    finally:
        server.stop()


def test_model_alias_entries_map_names_and_a_bad_entry_is_refused() -> None:
    from llmhost.cli.options import build
    from llmhost.config import PoolSettings
    from llmhost.errors import InvalidRequestError

    settings = PoolSettings(model_alias=["claude-*", "gpt-4*=qwen"])
    assert settings.alias("claude-opus-4", "smol") == ("smol", "claude-*")
    assert settings.alias("gpt-4o", "smol") == ("qwen", "gpt-4*=qwen")
    assert settings.alias("llama", "smol") is None
    assert settings.alias("claude-x", None) is None  # nothing served to answer it
    assert PoolSettings().model_alias == ["claude-*"]
    with pytest.raises(InvalidRequestError) as err:
        build(PoolSettings, {"model_alias": ["=qwen"]})
    assert "--model-alias" in str(err.value) and "has no pattern" in str(err.value)
