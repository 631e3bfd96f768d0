"""The server's access log: lines batched into few writes, none lost at exit."""

from __future__ import annotations

import io
import logging
import logging.config
import time

from llmhost.server.logs import BatchedStreamHandler, uvicorn_log_config
from servers import wait_for


class Counted(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def logger(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(f"llmhost-test.{name}")
    log.propagate, log.level = False, logging.INFO
    log.handlers = [handler]
    return log


def test_a_burst_of_lines_is_one_write_soon_after() -> None:
    stream = Counted()
    handler = BatchedStreamHandler(stream, every=0.2)
    log = logger(handler, "burst")
    try:
        for i in range(50):
            log.info("request %d", i)
        assert stream.writes == 0  # nothing on the caller's thread
        assert wait_for(lambda: stream.getvalue().count("\n") == 50, 5)
        assert stream.writes == 1
        assert stream.getvalue().splitlines() == [f"request {i}" for i in range(50)]
        log.info("a lone one")  # does not wait for more company than `every`
        assert wait_for(lambda: stream.getvalue().endswith("a lone one\n"), 5)
    finally:
        handler.close()


def test_what_waits_goes_out_at_close_and_a_gone_reader_is_no_error() -> None:
    stream = Counted()
    handler = BatchedStreamHandler(stream, every=60)
    log = logger(handler, "close")
    log.info("the last request")
    time.sleep(0.1)
    assert stream.getvalue() == ""
    handler.close()  # what logging.shutdown does at exit
    assert stream.getvalue() == "the last request\n"

    gone = io.StringIO()
    gone.close()
    handler = BatchedStreamHandler(gone, every=0.01)
    log = logger(handler, "gone")
    log.info("nobody reads this")
    time.sleep(0.1)
    handler.close()  # no exception, here or on the writer thread


def test_uvicorn_access_lines_go_through_it(capsys) -> None:
    config = uvicorn_log_config()
    # uvicorn's access logger's set-up, on a logger of the test's own (the real one is global)
    config["loggers"] = {"llmhost-test.access": config["loggers"]["uvicorn.access"]}
    logging.config.dictConfig(config)
    access = logging.getLogger("llmhost-test.access")
    (handler,) = access.handlers
    try:
        assert isinstance(handler, BatchedStreamHandler)
        args = ("127.0.0.1:5000", "POST", "/v1/embeddings", "1.1", 200)
        access.info('%s - "%s %s HTTP/%s" %d', *args)
        handler.flush()
        assert '127.0.0.1:5000 - "POST /v1/embeddings HTTP/1.1" 200' in capsys.readouterr().out
    finally:
        handler.close()
        access.handlers = []
