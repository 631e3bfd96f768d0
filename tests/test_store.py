"""Catalog, names, the local store and `llmhost pull` against a fake Hugging Face hub on
127.0.0.1 (the real `huggingface_hub` client does the transfer), with faults injected."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from fakehub import FakeHub
from llmhost.errors import InvalidRequestError
from llmhost.store.catalog import catalog, find
from llmhost.store.hubs import RemoteFile
from llmhost.store.local import Store, import_path
from llmhost.store.names import check_name, check_relative, folder_name
from llmhost.store.pull import plan, select_files
from servers import wait_for

REPO = "test-org/tiny-chat"


@pytest.fixture
def hub(tiny_dir: Path):
    hub = FakeHub()
    # junk a pull must leave behind: pickles and exported variants
    hub.add_repo(REPO, tiny_dir, {"pytorch_model.bin": b"pickle" * 100, "onnx/model.onnx": b"onnx" * 100})
    yield hub
    hub.close()


@pytest.fixture
def store_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


#: What a pull needs of the environment (the session runs offline).
HUB_ENV = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}


def llmhost(home: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`llmhost ARGS` with `home` as its home and the hub reachable, in this process (tests/cli.py);
    the tests of a kill mid-download start a real one."""
    return cli.llmhost(*args, home=home, env=HUB_ENV, input=input)


def stored_names(home: Path) -> list[str]:
    return [m.name for m in Store(home / "models").list()]


# --- catalog and names -----------------------------------------------------------------------


def test_catalog_has_the_tutorial_models_and_their_successors() -> None:
    entries = catalog()
    for name in [
        "qwen-1.8b-chat", "qwen-7b-chat", "smollm2-135m-instruct", "smollm2-360m-instruct",
        "smollm2-1.7b-instruct", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct",
        "qwen2.5-7b-instruct", "qwen2.5-14b-instruct", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b",
    ]:  # fmt: skip
        assert name in entries, name
    old = entries["qwen-1.8b-chat"]
    assert not old.remote_code and old.repos["modelscope"] == "qwen/Qwen-1_8B-Chat"  # converted, no code
    assert entries[old.successor].remote_code is False
    assert entries["smollm2-135m-instruct"].embedded
    assert find("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b-instruct"


def test_plan_defaults_and_errors() -> None:
    p = plan("qwen2.5-1.5b-instruct")
    assert (p.source, p.repo, p.revision, p.name) == (
        "modelscope",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "master",
        p.name,
    )
    p = plan("qwen2.5-1.5b-instruct", source="hf", quant="q4_k_m")
    assert p.repo == "Qwen/Qwen2.5-1.5B-Instruct-GGUF" and p.include == ("qwen2.5-1.5b-instruct-q4_k_m.gguf",)
    assert p.name == "qwen2.5-1.5b-instruct-q4_k_m"
    assert plan("Someone/Model-X").source == "hf"
    with pytest.raises(InvalidRequestError, match=r"did you mean qwen2\.5-1\.5b-instruct"):
        plan("qwen2.5-1.5b-instrct")
    with pytest.raises(InvalidRequestError, match="no GGUF quantization 'q2'"):
        plan("qwen2.5-1.5b-instruct", quant="q2")


@pytest.mark.parametrize(
    "bad", ["..", "../x", "/etc", "a/../b", "a\\b", "C:x", "a/b/c", ".hidden", "", "a b"]
)
def test_names_that_could_escape_the_store_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        check_name(bad)


@pytest.mark.parametrize("bad", ["../evil", "/abs", "a/../../b", "a\\b", "C:/x", "", "a//b", "./a"])
def test_hub_file_paths_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        check_relative(bad)


def test_good_names() -> None:
    assert folder_name("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen--Qwen2.5-1.5B-Instruct"
    assert check_relative("sub/model-00001-of-00002.safetensors")


def test_file_selection_prefers_safetensors_and_refuses_pickles() -> None:
    files = [RemoteFile(p, 1) for p in ["config.json", "model.safetensors", "pytorch_model.bin",
                                        "onnx/model.onnx", "tokenizer.json", "README.md"]]  # fmt: skip
    assert [f.path for f in select_files(files, ())] == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    with pytest.raises(InvalidRequestError, match="only pickled weights"):
        select_files([RemoteFile("config.json", 1), RemoteFile("pytorch_model.bin", 1)], ())
    ggufs = [RemoteFile("m-q4_k_m.gguf", 1), RemoteFile("m-q8_0.gguf", 1)]
    with pytest.raises(InvalidRequestError, match="several GGUF files"):
        select_files(ggufs, ())
    assert [f.path for f in select_files(ggufs, ("*q8_0.gguf",))] == ["m-q8_0.gguf"]


# --- pulls against the fake hub ---------------------------------------------------------------


def test_pull_list_show_load_and_rm(hub: FakeHub, store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert r.returncode == 0, r.stderr
    model = Store(home / "models").get(REPO)
    assert model is not None and model.revision and len(model.revision) == 40
    on_disk = {p.relative_to(model.folder).as_posix() for p in model.folder.rglob("*") if p.is_file()}
    assert on_disk == {f.path for f in model.files} | {"llmhost-model.json"}
    assert {f.path for f in model.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not (model.folder / "pytorch_model.bin").exists() and not (model.folder / "onnx").exists()
    assert (model.folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()

    listed = json.loads(llmhost(home, "list", "--json").stdout)
    assert [m["name"] for m in listed] == [REPO] and listed[0]["source"] == "hf"
    shown = json.loads(llmhost(home, "show", REPO, "--json").stdout)
    assert shown["local"]["revision"] == model.revision

    r = llmhost(home, "generate", REPO, "hello", "--max-new-tokens", "3", "--json", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == REPO and out["usage"]["completion_tokens"] == 3

    assert llmhost(home, "rm", REPO, "-y").returncode == 0
    assert stored_names(home) == []


def test_dropped_connection_resumes_with_a_range_request(
    hub: FakeHub, store_home: Path, tiny_dir: Path
) -> None:
    home = store_home
    size = (tiny_dir / "model.safetensors").stat().st_size
    cut = 10 * 2**20 + 12345  # past the client's first 10 MiB chunk, so it has bytes to keep
    hub.faults.drop_after["model.safetensors"] = cut
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert r.returncode == 0, r.stderr
    ranges = hub.gets("/model.safetensors")
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 10 * 2**20
    assert hub.bytes_sent < size * 1.3  # resumed, not downloaded twice
    model = Store(home / "models").get(REPO)
    assert (model.folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_corrupted_download_is_never_stored(hub: FakeHub, store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    import_path(Store(home / "models"), tiny_dir, "earlier")  # must survive untouched
    hub.faults.corrupt.add("model.safetensors")
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert r.returncode == 1
    assert "model.safetensors" in r.stderr and "failed its check twice (sha256 mismatch)" in r.stderr
    assert stored_names(home) == ["earlier"]
    assert len(hub.gets("/model.safetensors")) == 2  # retried once from scratch
    staging = Store(home / "models").staging(REPO)
    assert not (staging / "model.safetensors").exists()
    earlier = Store(home / "models").get("earlier")
    assert (earlier.folder / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "was not found on"),
        (403, "is gated: accept its license"),
        (404, "was not found on"),
        (500, "cannot download from"),
    ],
)
def test_hub_errors_are_one_line_and_actionable(
    hub: FakeHub, store_home: Path, status: int, message: str
) -> None:
    home = store_home
    hub.faults.status[REPO] = status
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and stored_names(home) == []


def test_network_down_hints_at_mirror_and_source(store_home: Path) -> None:
    home = store_home
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = llmhost(home, "pull", REPO, "--endpoint", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and "--mirror or --source modelscope" in r.stderr, r.stderr


def test_unknown_revision_and_unknown_name(hub: FakeHub, store_home: Path) -> None:
    home = store_home
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url, "--revision", "nope")
    assert r.returncode == 1 and "has no revision 'nope'" in r.stderr
    r = llmhost(home, "pull", "qwen2.5-1.5b-instrct")
    assert r.returncode == 2 and "did you mean qwen2.5-1.5b-instruct" in r.stderr


@pytest.mark.parametrize(
    ("source", "sig"), [("hf", signal.SIGINT), ("modelscope", signal.SIGINT), ("hf", signal.SIGKILL)]
)
def test_interrupted_pull_resumes(
    hub: FakeHub, store_home: Path, tiny_dir: Path, source: str, sig: int
) -> None:
    home = store_home
    hub.faults.delay_per_chunk = 0.02  # ~3 MiB/s: slow enough to interrupt mid-file
    env = {**os.environ, "LLMHOST_HOME": str(home), **HUB_ENV}
    cmd = [sys.executable, "-m", "llmhost", "pull", REPO, "--endpoint", hub.url, "--source", source]
    # SIGINT as a terminal delivers it, even when this suite runs as a background job (which
    # starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert wait_for(lambda: hub.bytes_sent > 10 * 2**20 + 2**20, timeout=60)
    hub.faults.delay_per_chunk = 0.5  # the rest crawls: on a loaded machine the signal still lands mid-file
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    assert sig != signal.SIGINT or "interrupted" in err
    assert stored_names(home) == []  # a half-done pull is never a model
    hub.faults.delay_per_chunk = 0
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url, "--source", source)
    assert r.returncode == 0, r.stderr
    ranges = hub.gets("/model.safetensors")
    assert ranges[-1].startswith("bytes=") and int(ranges[-1][6:-1]) >= 10 * 2**20, ranges
    model = Store(home / "models").get(REPO)
    assert (model.folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_concurrent_pulls_of_one_model_do_not_collide(hub: FakeHub, store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    hub.faults.delay_per_chunk = 0.005
    env = {**os.environ, "LLMHOST_HOME": str(home), **HUB_ENV}
    cmd = [sys.executable, "-m", "llmhost", "pull", REPO, "--endpoint", hub.url]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: hub.bytes_sent > 0, timeout=60)
    second = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert second.returncode == 1 and "another llmhost process is writing" in second.stderr
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    model = Store(home / "models").get(REPO)
    assert (model.folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_download_removes_partial_files_and_keeps_the_store(
    hub: FakeHub, small_disk: Path, tiny_dir: Path
) -> None:
    home = small_disk / "home"
    import_path(Store(home / "models"), tiny_dir, "earlier")
    hub.faults.delay_per_chunk = 0.02
    env = {**os.environ, "LLMHOST_HOME": str(home), **HUB_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmhost", "pull", REPO, "--endpoint", hub.url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_for(lambda: hub.bytes_sent > 2**20, timeout=60)
    filler = small_disk / "filler"  # another program fills the disk meanwhile
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 2**20)
        except OSError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "is full; the partial download was removed" in err, err
    assert not Store(home / "models").staging(REPO).exists()
    assert stored_names(home) == ["earlier"]
    earlier = Store(home / "models").get("earlier")
    assert (earlier.folder / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()
    filler.unlink()


def test_not_enough_space_is_refused_before_downloading(hub: FakeHub, small_disk: Path) -> None:
    home = small_disk / "home"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 200 * 2**20)  # 100 MiB left, less than the model plus the margin
    r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    assert r.returncode == 1 and "not enough disk space" in r.stderr, r.stderr
    assert hub.bytes_sent == 0


def test_a_hub_listing_with_an_escaping_path_is_refused(store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    hub = FakeHub()
    hub.add_repo(REPO, tiny_dir, {"../../evil.json": b"{}"})
    try:
        r = llmhost(home, "pull", REPO, "--endpoint", hub.url)
    finally:
        hub.close()
    assert r.returncode == 2 and "could escape the store" in r.stderr
    assert not (home.parent / "evil.json").exists() and stored_names(home) == []


# --- import and the loader ---------------------------------------------------------------------


def test_import_folder_and_gguf_then_load_by_name(
    store_home: Path, tiny_dir: Path, embedded_dir: Path
) -> None:
    home = store_home
    from llmhost.store.embedded import embedded_gguf

    r = llmhost(home, "import", str(tiny_dir), "--name", "my-tiny")
    assert r.returncode == 0, r.stderr
    r = llmhost(home, "import", str(tiny_dir), "--name", "my-tiny")
    assert r.returncode == 2 and "already has 'my-tiny'" in r.stderr
    gguf, _ = embedded_gguf()
    assert llmhost(home, "import", str(gguf)).returncode == 0
    models = {m.name: m for m in Store(home / "models").list()}
    assert models["my-tiny"].format == "hf" and models[gguf.stem.lower()].format == "gguf"
    r = llmhost(home, "generate", "my-tiny", "hi", "--max-new-tokens", "2", "--json", "--dtype", "float32")
    assert r.returncode == 0 and json.loads(r.stdout)["model"] == "my-tiny", r.stderr


def test_import_refuses_pickles_and_non_models(tmp_path: Path, store_home: Path) -> None:
    home = store_home
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    r = llmhost(home, "import", str(folder))
    assert r.returncode == 2 and "no .safetensors weights" in r.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    r = llmhost(home, "import", str(fake))
    assert r.returncode == 2 and "is not a GGUF file" in r.stderr


def test_catalog_model_not_pulled_says_how(store_home: Path) -> None:
    home = store_home
    r = llmhost(home, "generate", "qwen2.5-0.5b-instruct", "hi")
    assert r.returncode == 1 and "run `llmhost pull qwen2.5-0.5b-instruct`" in r.stderr


def test_rm_asks_unless_yes(store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    import_path(Store(home / "models"), tiny_dir, "keep-me")
    r = llmhost(home, "rm", "keep-me", input="n\n")
    assert r.returncode == 1 and stored_names(home) == ["keep-me"]
    r = llmhost(home, "rm", "nope", "-y")
    assert r.returncode == 1 and "no model 'nope' in the store" in r.stderr


def test_partial_folders_are_never_listed(store_home: Path, tiny_dir: Path) -> None:
    home = store_home
    store = Store(home / "models")
    shutil.copytree(tiny_dir, store.root / "half-copied")  # no manifest: not a model
    assert store.list() == [] and store.get("half-copied") is None


# --- ModelScope, through its own client library ------------------------------------------------


def test_pull_from_modelscope(hub: FakeHub, store_home: Path, tiny_dir: Path) -> None:
    r = llmhost(store_home, "pull", REPO, "--source", "modelscope", "--endpoint", hub.url)
    assert r.returncode == 0, r.stderr
    model = Store(store_home / "models").get(REPO)
    assert model.source == "modelscope" and model.revision == "master"
    assert all(f.sha256 for f in model.files)  # ModelScope lists sha256 for every file
    on_disk = {p.relative_to(model.folder).as_posix() for p in model.folder.rglob("*") if p.is_file()}
    assert on_disk == {f.path for f in model.files} | {"llmhost-model.json"}  # no bookkeeping left
    assert not (model.folder / "pytorch_model.bin").exists()
    assert (model.folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert any(p.startswith("/api/v1/models/") for _, p, _ in hub.log)


@pytest.mark.parametrize(("status", "message"), [(401, "refused access"), (404, "was not found on")])
def test_modelscope_errors(hub: FakeHub, store_home: Path, status: int, message: str) -> None:
    hub.faults.status[REPO] = status
    r = llmhost(store_home, "pull", REPO, "--source", "modelscope", "--endpoint", hub.url)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and stored_names(store_home) == []


def test_modelscope_corrupted_download_is_never_stored(hub: FakeHub, store_home: Path) -> None:
    hub.faults.corrupt.add("model.safetensors")
    r = llmhost(store_home, "pull", REPO, "--source", "modelscope", "--endpoint", hub.url)
    assert r.returncode == 1 and "model.safetensors" in r.stderr, r.stderr
    assert stored_names(store_home) == []


def test_gguf_pull_with_include_and_mirror_endpoint(store_home: Path) -> None:
    from llmhost.store.embedded import embedded_gguf
    from llmhost.store.hubs import HF_MIRROR, make_hub

    assert make_hub("hf", None, None, mirror=True).endpoint == HF_MIRROR  # passed to every call
    assert make_hub("hf", "http://127.0.0.1:9", None, mirror=True).endpoint == "http://127.0.0.1:9"
    gguf, _ = embedded_gguf()
    hub = FakeHub()
    hub.add_repo(
        "test-org/tiny-GGUF", files={"m-q4_1.gguf": gguf.read_bytes(), "m-q8_0.gguf": b"GGUF" + b"0" * 64}
    )
    try:
        r = llmhost(store_home, "pull", "test-org/tiny-GGUF", "--endpoint", hub.url)
        assert r.returncode == 2 and "several GGUF files" in r.stderr
        r = llmhost(
            store_home,
            "pull",
            "test-org/tiny-GGUF",
            "--endpoint",
            hub.url,
            "--include",
            "*q4_1.gguf",
            "--name",
            "tiny-q4",
        )
        assert r.returncode == 0, r.stderr
    finally:
        hub.close()
    model = Store(store_home / "models").get("tiny-q4")
    assert model.format == "gguf" and model.load_path.name == "m-q4_1.gguf"
    assert [f.path for f in model.files] == ["m-q4_1.gguf"]


def test_remote_code_is_refused_without_the_flag_and_failing_code_is_one_line(
    store_home: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    """The tutorial's Qwen-1 models no longer need remote code (tests/test_qwen1.py); any other
    model that ships its own code is refused without --trust-remote-code, and code that fails
    under it (a missing package, an incompatible transformers) is one line, never a traceback."""
    remote = tmp_path / "remote-code-model"
    shutil.copytree(tiny_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_custom.py").write_text("import package_nobody_installed\n")
    hub = FakeHub()
    hub.add_repo("someone/remote-model", remote)
    try:
        r = llmhost(store_home, "pull", "someone/remote-model", "--source", "hf", "--endpoint", hub.url)
    finally:
        hub.close()
    assert r.returncode == 0, r.stderr
    r = llmhost(store_home, "generate", "someone/remote-model", "hi")
    assert r.returncode == 1 and "ships its own Python code" in r.stderr and "--trust-remote-code" in r.stderr
    r = llmhost(store_home, "generate", "someone/remote-model", "hi", "--trust-remote-code")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "package_nobody_installed" in r.stderr and "its own code" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
