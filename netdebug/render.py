"""Output for `corral net`: colour only on a terminal, a progress line for slow steps, JSON."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, TextIO

COLOURS = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "bold": "1", "dim": "2"}


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class Out:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.colour = use_colour(self.stream)

    def c(self, text: str, colour: str) -> str:
        if not self.colour:
            return text
        return f"\033[{COLOURS[colour]}m{text}\033[0m"

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)


def _json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, default=str)


def dump_json(doc: Any) -> None:
    print(_json(doc))


class JsonStream:
    """`dump_json(head | {key: items})`, the same text, written item by item as items come
    (a capture's packets): nothing is kept, and what was written is whole once closed.
    `key` must sort after every key of `head`."""

    def __init__(self, head: dict[str, Any], key: str, stream: TextIO | None = None) -> None:
        assert all(k < key for k in head), "the streamed list is the document's last key"
        self.stream = stream or sys.stdout
        self._n = 0
        opening = _json(head)[:-2] if head else "{"  # without its closing "\n}"
        self._write(opening + ("," if head else "") + f"\n  {json.dumps(key)}: [")

    def item(self, doc: Any) -> None:
        text = _json(doc).replace("\n", "\n    ")
        self._write(("," if self._n else "") + "\n    " + text)
        self._n += 1

    def close(self) -> None:
        self._write(("\n  ]" if self._n else "]") + "\n}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class Progress:
    """`with Progress("reading nodes") as p: p.step("node-2")`: after a second, a line on
    stderr (a terminal only) that says what is being waited for; erased at the end."""

    def __init__(self, what: str, stream: TextIO | None = None, after: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.what = what
        self.detail = ""
        self.after = after
        self.t0 = time.monotonic()
        self._shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        with self._lock:
            if self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def step(self, detail: str) -> None:
        self.detail = detail

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            if time.monotonic() - self.t0 < self.after:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                s = time.monotonic() - self.t0
                msg = f"{self.what}{': ' + self.detail if self.detail else ''} ({s:.0f}s)"
                self.stream.write("\r\033[K" + msg[:120])
                self.stream.flush()
                self._shown = True
