"""The wheel is the product: build the wheel and sdist, then follow the README's pip section for
Linux as a new user would (a fresh venv, no checkout on the path, run from another folder) and
use what it installed: doctor, estimate, list, show, a reply from the embedded model, the API,
and `llmhost web` itself, whose children must end with it.

Run by `make package-check` (part of `make test`, beside its other installs) with any Python
3.10+; stdlib only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"package-check [{time.monotonic() - STARTED:5.0f} s] {text}", flush=True)


def fail(text: str) -> None:
    print(f"package-check: FAILED: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


def readme_steps() -> list[str]:
    """The commands of the README's Linux pip block (between its markers), in order."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- pip-linux -->\s*```bash\n(.*?)```\s*<!-- /pip-linux -->", text, re.S)
    if not m:
        fail("README.md has no <!-- pip-linux --> block")
    steps = [line.split("  #")[0].strip() for line in m.group(1).splitlines()]
    return [s for s in steps if s]


def build(out: Path) -> tuple[Path, Path]:
    """PyPA's `build` (in a venv of its own: this check needs nothing installed beforehand, so it
    runs beside `make test`'s other installs)."""
    say("building the sdist and wheel")
    tools = out.parent / "build-env"
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
    subprocess.run([str(tools / "bin" / "pip"), "install", "-q", "build>=1.2,<2"], check=True)
    subprocess.run(
        [str(tools / "bin" / "python"), "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wheel, sdist = next(out.glob("llmhost-*.whl")), next(out.glob("llmhost-*.tar.gz"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("llmhost/store/catalog.toml", "llmhost/py.typed", "llmhost/web/page.py"):
        if needed not in names:
            fail(f"the wheel lacks {needed}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        fail("the wheel lacks its LICENSE")
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    for needed in ("LICENSE", "src/llmhost/store/catalog.toml", "README.md"):
        if needed not in members:
            fail(f"the sdist lacks {needed}")
    return wheel, sdist


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llmhost-package-"))
    wheel, _ = build(work / "dist")
    user = work / "user"  # where the user's shell is: nowhere near the checkout
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    env["LLMHOST_HOME"] = str(work / "home")
    steps = readme_steps()
    if steps[-1] != "llmhost web":
        fail(f"the README's pip block should end with `llmhost web`, not {steps[-1]!r}")
    # the README's steps, verbatim but for the package: this wheel instead of PyPI's llmhost
    mine = [s.replace("pip install llmhost", f"pip install {wheel}") for s in steps[:-1]]
    script = "\n".join(["set -euo pipefail", *mine])
    say("following the README: " + " | ".join(steps[:-1]))
    log = work / "install.log"
    with open(log, "w") as out:
        done = subprocess.run(["bash", "-c", script], cwd=user, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        fail(f"the README's steps failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    venv = next(p.parent.parent for p in user.glob("*/bin/activate"))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)

    def llmhost(*args: str, timeout: float = 600) -> str:
        r = subprocess.run(
            ["llmhost", *args], cwd=user, env=env, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0 or "Traceback" in r.stderr:
            fail(f"llmhost {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r.stdout if "--json" in args else r.stdout + r.stderr

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import llmhost; print(llmhost.__file__)"],
        cwd=user,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(venv)):
        fail(f"llmhost imports from {where}, not from the installed wheel")
    say(f"installed: {where}")
    report = json.loads(llmhost("doctor", "--json"))
    if report["ram_total_gib"] <= 0 or not report["fits"]:
        fail(f"doctor found no RAM or no model that fits: {report['ram_total_gib']}")
    out = llmhost("estimate", "qwen2.5-7b-instruct")
    if "GiB" not in out:
        fail(f"estimate printed no sizes: {out}")
    names = {m["name"] for m in json.loads(llmhost("show", "--catalog", "--json"))}
    if not {"qwen-1.8b-chat", "qwen2.5-7b-instruct", "smollm2-135m-instruct"} <= names:
        fail(f"show --catalog lacks the tutorial's models: {sorted(names)}")
    if json.loads(llmhost("list", "--json")) != []:
        fail("a fresh store lists models")
    say("doctor, estimate, show --catalog, list: ok; a reply from the embedded model (fetched once)")
    reply = json.loads(
        llmhost("generate", "Say hello.", "--temperature", "0", "--max-new-tokens", "8", "--json")
    )
    if not reply["text"].strip():
        fail(f"the embedded model gave an empty reply: {reply}")
    served(env, user)
    web(env, user)
    shutil.rmtree(work, ignore_errors=True)
    say("the wheel works as the README says")


def wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            fail(f"{proc.args} exited before `{pattern}`:\n{''.join(seen)}")
        seen.append(line)
        if m := re.search(pattern, line):
            return m.group(1)
    fail(f"no `{pattern}` within {timeout:g} s:\n{''.join(seen)}")
    raise AssertionError


def get(url: str, body: dict | None = None, key: str | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")


def start(cmd: list[str], ready: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, str]:
    """A long-running command of the installed llmhost, and the URL its `ready` line names."""
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc, wait_line(proc, ready, 300)
    except BaseException:
        proc.kill()
        raise


def served(env: dict[str, str], cwd: Path) -> None:
    proc, url = start(["llmhost", "serve", "--port", "0"], r"llmhost: serving on (http://\S+)", env, cwd)
    try:
        get(url + "/health")
        hi = [{"role": "user", "content": "Hi"}]
        r = get(
            url + "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": hi, "max_tokens": 8}
        )
        if not r["choices"][0]["message"]["content"]:
            fail(f"the API gave an empty reply: {r}")
        say(f"llmhost serve: /health and a chat completion on {url}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def web(env: dict[str, str], cwd: Path) -> None:
    """`llmhost web`, the README's last step: the page answers; killed, it leaves no child."""
    import contextlib

    cmd = ["llmhost", "web", "--port", "0", "--no-open-browser"]
    proc, url = start(cmd, r"open (http://\S+) in your browser", env, cwd)
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=30) as r:
            if r.status != 200:
                fail(f"the page's health answered {r.status}")
        children = _children(proc.pid)
        say(f"llmhost web: the page answers on {url}; children {children}")
    finally:
        proc.kill()  # not a clean stop: its children must still go
        proc.wait(30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        fail(f"a SIGKILLed llmhost web left children running: {left}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
