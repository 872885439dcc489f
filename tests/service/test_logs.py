"""service.logs: the text and JSON-lines formats of the server's log."""

from __future__ import annotations

import json
import logging

from service.logs import JsonFormatter, TextFormatter


def _record(request_id: str | None, **extra: object) -> logging.LogRecord:
    """A record as uvicorn's "Started server process" is made, stamped with ``request_id``."""
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (7,), None
    )
    record.request_id = request_id
    record.__dict__.update(extra)
    return record


def test_a_json_line_holds_the_fields_and_no_terminal_colours() -> None:
    # uvicorn passes the message again with colour codes as extra={"color_message": ...}.
    record = _record(None, color_message="Started server process [\x1b[36m%d\x1b[0m]", port=1)
    line = json.loads(JsonFormatter().format(record))
    assert set(line) == {"time", "level", "logger", "message", "request_id", "port"}
    assert (line["message"], line["request_id"], line["port"]) == (
        "Started server process [7]",
        None,
        1,
    )


def test_a_text_line_marks_no_request_with_a_dash() -> None:
    formatter = TextFormatter()
    assert formatter.format(_record(None)) == (
        "INFO:     [-] uvicorn.error: Started server process [7]"
    )
    assert formatter.format(_record("abc-1")) == (
        "INFO:     [abc-1] uvicorn.error: Started server process [7]"
    )
