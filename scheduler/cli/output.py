"""How a command shows its result: a table for a person, JSON or YAML for a program.

``-o table`` and ``-o wide`` (more columns) render with rich; on a terminal the
table fits its width, piped it never wraps (a row stays one line for grep).
``-o json`` and ``-o yaml`` print protobuf's JSON mapping of the scheduler's
answer (lowerCamelCase, every field, enums by name), so one casing runs through
every command; results that are not messages use the same casing.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Collection, Mapping
from typing import IO, Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

#: Piped output is never wrapped: a row stays one line however wide.
_UNWRAPPED_WIDTH = 100_000


def message_dict(msg: Message) -> dict[str, Any]:
    """A message in protobuf's JSON mapping, fields left at their default included."""
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


def render_table(table: Table, width: int | None = None) -> str:
    """``table`` as plain text, ``width`` columns at most (None: as wide as it needs)."""
    console = Console(
        file=io.StringIO(),
        width=width or _UNWRAPPED_WIDTH,
        color_system=None,
        highlight=False,
        soft_wrap=False,
    )
    console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in str(text).splitlines())


def new_table(headers: list[str], *, wrap: Collection[str] = ()) -> Table:
    """A borderless table, kubectl's look: headers, then a row per line.

    Args:
        headers: the columns.
        wrap: the columns that may wrap when the table is wider than the
            terminal; the others (ids, names, states) stay whole.
    """
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold", no_wrap=header not in wrap)
    return table


class Output:
    """Prints a command's result in the format the user chose, and its errors in one line."""

    def __init__(
        self, fmt: str, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None
    ) -> None:
        self.format = fmt
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr

    @property
    def structured(self) -> bool:
        """Whether the result is printed as a document (JSON or YAML), not a table."""
        return self.format in ("json", "yaml")

    @property
    def wide(self) -> bool:
        """Whether tables show every column."""
        return self.format == "wide"

    def document(self, doc: Mapping[str, Any]) -> None:
        """A result as JSON or YAML."""
        if self.format == "yaml":
            self._stdout.write(yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True))
        else:
            self._stdout.write(json.dumps(doc, indent=2) + "\n")

    def message(self, msg: Message) -> None:
        """A scheduler's answer as JSON or YAML."""
        self.document(message_dict(msg))

    def answer(self, result: Message | Mapping[str, Any], text: str) -> None:
        """A one-line result: ``result`` as a document, or ``text`` for a person."""
        if not self.structured:
            self.line(text)
        elif isinstance(result, Message):
            self.message(result)
        else:
            self.document(result)

    def table(self, table: Table) -> None:
        """A table: fitted to a terminal, unwrapped when piped."""
        if self._stdout.isatty():
            Console(file=self._stdout, highlight=False).print(table)
        else:
            self._stdout.write(render_table(table) + "\n")

    def line(self, text: str) -> None:
        """A line of text for a person."""
        self._stdout.write(text + "\n")

    def error(self, text: str) -> None:
        """One line on standard error, whatever the terminal's width."""
        line = " ".join(text.split())
        if self._stderr.isatty():
            Console(file=self._stderr, highlight=False, soft_wrap=True).print(
                line, style="red", markup=False
            )
        else:
            self._stderr.write(line + "\n")
