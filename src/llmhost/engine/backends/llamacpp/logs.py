"""llama.cpp's own reason when it refuses a file. llama-cpp-python says only "Failed to load
model from file" and, unless verbose, sends llama.cpp's log to /dev/null while it loads; the log
callback here keeps llama.cpp's warning and error lines (and hands every line on to
llama-cpp-python's own callback, which prints as before) so that the one-line error can say why:
an architecture this llama.cpp does not know, memory it could not get."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

#: ggml's log levels: WARN and ERROR (DEBUG 1, INFO 2, CONT 5).
KEPT_LEVELS = (3, 4)


class ErrorLog:
    """The last warning and error lines llama.cpp logged in this process."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=16)
        self._callback: Any = None
        self._lock = threading.Lock()

    def install(self) -> None:
        """Hook llama.cpp's log (once per process: llama.cpp has one log callback)."""
        with self._lock:
            if self._callback is not None:
                return
            import ctypes

            import llama_cpp

            previous = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)

            @llama_cpp.llama_log_callback
            def callback(level: int, text: bytes, user_data: Any) -> None:
                if level in KEPT_LEVELS:
                    self.lines.append(text.decode("utf-8", "replace").strip())
                if previous is not None:
                    previous(level, text, user_data)

            self._callback = callback  # ctypes calls it for as long as the process lives: kept
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def reason(self) -> str | None:
        """Why the last load failed, in llama.cpp's words, where it said."""
        for line in reversed(self.lines):
            if "error loading model:" in line:
                return line.split("error loading model:", 1)[1].strip()
        return None


#: The process's one hook on llama.cpp's log.
ERRORS = ErrorLog()
