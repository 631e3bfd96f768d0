"""A Linux-only call outside llmhost.portable fails `make lint`: mypy reads src/ as Windows and as
macOS would (typeshed marks `os.killpg`, `signal.SIGKILL`, `fcntl`, ... per platform), and any
error those readings find that the Linux reading does not is a call that breaks there.

portable.py branches on flags the tests flip (so its fallbacks run here), which mypy cannot
narrow, and vllm_child.py runs under vLLM, which is Linux-only: both are left out, by design.
Imports are not followed (each module is read against typeshed alone): ≈8 s per platform.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmhost"
LEFT_OUT = {SRC / "portable.py", SRC / "engine" / "backends" / "vllm_child.py"}
PLATFORMS = ("win32", "darwin")


def errors(platform: str, files: list[Path]) -> set[str]:
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--platform",
        platform,
        "--ignore-missing-imports",
        "--follow-imports=skip",
        "--no-incremental",
        "--no-error-summary",
        "--hide-error-context",
        *map(str, files),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    return {line for line in out.splitlines() if re.search(r":\d+: error:", line)}


def main() -> None:
    # the check must see what it is for: a call Windows lacks, in a file of its own
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text("import os\nimport signal\n\nos.killpg(1, signal.SIGKILL)\n")
        if not errors("win32", [probe]) or errors("linux", [probe]):
            sys.exit("platform-types: mypy does not tell Windows' os from Linux's here; is mypy installed?")
    files = [p for p in sorted(SRC.rglob("*.py")) if p not in LEFT_OUT]
    linux = errors("linux", files)
    found = []
    for platform in PLATFORMS:
        found += [f"{platform}: {e}" for e in sorted(errors(platform, files) - linux)]
    if found:
        print("Calls that do not exist on every OS (move them into llmhost.portable, with a fallback):")
        print("\n".join(found))
        sys.exit(1)
    print(f"platform-types: src/ reads the same on {', '.join(PLATFORMS)} as on linux")


if __name__ == "__main__":
    main()
