"""What a remote party wrote reaches a terminal inert: in rich output and in text logs."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from common.cli_support import PrintableFormatter, inert, printable

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202e\u200b\x9b31m[link=file:///etc/passwd]x[/link]"


def test_printable_shows_control_and_format_characters_as_escapes() -> None:
    assert printable(HOSTILE) == (
        "\\x1b]0;pwned\\x07\\x1b[2J\\u202e\\u200b\\x9b31m[link=file:///etc/passwd]x[/link]"
    )
    assert printable("two\nlines\tand é ü 中") == "two\\nlines\\tand é ü 中"
    assert printable("two\nlines", newlines=True) == "two\nlines"


def test_inert_text_renders_as_itself_in_rich() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=300, emoji=False, highlight=False)
    console.print(f"[bold]job[/] {inert(HOSTILE)}")
    rendered = buf.getvalue()
    assert "\x1b]" not in rendered and "\x07" not in rendered and "\u202e" not in rendered
    assert "[link=file:///etc/passwd]x[/link]" in rendered  # literal, not a hyperlink


def test_text_logs_escape_what_a_message_quotes() -> None:
    record = logging.LogRecord(
        "dpfed", logging.WARNING, __file__, 1, "site %s failed: %s", ("s", HOSTILE), None
    )
    line = PrintableFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING site s failed: " + printable(HOSTILE)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "\nTraceback" in PrintableFormatter("%(message)s").format(record)  # lines kept
