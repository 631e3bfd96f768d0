"""Run by vLLM's own Python (llmhost is not installed there; stdlib only):
`python vllm_child.py PARENT_PID [vLLM server flags...]`.

It starts vLLM's OpenAI-compatible server and guarantees that the server's whole process tree
(engine core, tensor-parallel workers) ends with it. vLLM's workers outlive a SIGKILLed server,
so this process leads their process group and, when llmhost goes away (the death signal below),
when llmhost asks (SIGTERM) or when the server exits on its own, ends the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0


def _arm_death_signal() -> None:
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _end_group(server: subprocess.Popen[bytes], code: int) -> None:
    """Ask the server to stop, give it GRACE_S, then kill every process in the group."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if server.poll() is None:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(GRACE_S)
    print(f"llmhost-vllm: the vLLM server exited with code {server.poll()}", flush=True)
    sys.stdout.flush()
    os.killpg(0, signal.SIGKILL)  # this process too: nothing of the tree is left
    sys.exit(code)


def main() -> None:
    parent = int(sys.argv[1])
    _arm_death_signal()
    if os.getppid() != parent:  # llmhost died before the death signal was armed
        sys.exit(1)
    if os.getpgrp() != os.getpid():
        os.setpgrp()
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[2:]])
    signal.signal(signal.SIGTERM, lambda *_: _end_group(server, 0))
    signal.signal(signal.SIGINT, lambda *_: _end_group(server, 0))
    while server.poll() is None:
        time.sleep(0.2)
    _end_group(server, server.returncode or 1)


if __name__ == "__main__":
    main()
