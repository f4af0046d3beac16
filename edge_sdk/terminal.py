"""Single-keypress feedback in a terminal: after each prediction, one key answers it.

    angry (83 %)   [u] right  [d] wrong  [1] angry  [2] happy  [3] neutral  [4] sad  [space] skip

In a real terminal the key is read without Enter (raw mode, restored on
exit); on a pipe, one line per answer works the same. The prompt speaks the catalogue it is given
(:func:`edge_sdk.i18n.terminal_catalogue`: ``[feedback] language`` or the locale), the keys stay the same:

    złość (83 %)   [u] dobrze  [d] źle  [1] złość  [2] radość  [3] neutralnie  [4] smutek  [spacja] pomiń
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from edge_sdk.errors import FedserError
from edge_sdk.i18n import Catalogue, bundled_catalogues

__all__ = ["TerminalFeedback", "key_map"]


def key_map(labels) -> dict[str, str]:
    """Key -> answer: ``u`` up, ``d`` down, ``1``..``9`` the labels in order."""
    keys = {"u": "up", "d": "down"}
    keys.update({str(i + 1): lab for i, lab in enumerate(labels[:9])})
    return keys


class TerminalFeedback:
    def __init__(self, device, *, stdin=None, stdout=None, stop: threading.Event | None = None,
                 catalogue: Catalogue | None = None) -> None:
        """``stop``: the event q (or Ctrl-C, Ctrl-D) sets; the caller's, so that the same event
        can also cancel a personalisation under way (``Device.personalize(cancel=...)``). ``catalogue``: the
        language of the prompt (default English)."""
        self.device = device
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.catalogue = catalogue or bundled_catalogues()["en"]
        self._latest: str | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = stop if stop is not None else threading.Event()
        self.answers = 0

    def prompt(self, prediction, _audio=None) -> None:
        labels = list(self.device.metadata.labels)
        cat = self.catalogue
        keys = "  ".join(f"[{k}] {cat.label(v)}" for k, v in key_map(labels).items() if k not in "ud")
        conf = round(100 * max(prediction.probs.values()))
        with self._lock:
            self._latest = prediction.id
        self._say(cat.text("terminal_prompt", label=cat.label(prediction.label), percent=conf, labels=keys))

    def handle_key(self, key: str) -> str | None:
        """Apply one key to the latest prediction; returns the stored answer, or None."""
        labels = list(self.device.metadata.labels)
        answer = key_map(labels).get(key.lower())
        with self._lock:
            # after a bare "down" the prediction stays open for its label (which replaces the "down"): a named
            # emotion is what personalises; any other answer closes it
            pid = self._latest
            if answer is not None and answer != "down":
                self._latest = None
        if answer is None or pid is None:
            return None
        try:
            self.device.feedback(pid, answer)
        except FedserError as exc:
            self._say(self.catalogue.text("terminal_not_stored", error=exc))
            return None
        self.answers += 1
        acc = self.device.store.personal_accuracy()
        cat = self.catalogue
        shown = (cat.text("terminal_up") if answer == "up" else cat.text("terminal_down") if answer == "down"
                 else cat.label(answer))
        self._say(cat.text("terminal_stored", answer=shown, right=acc["right"], answered=acc["answered"]))
        if answer == "down":
            self._say(cat.text("terminal_name_it"))
        return answer

    def _say(self, line: str) -> None:
        """One line, on its own line even in raw mode; a letter the terminal's encoding lacks becomes "?"."""
        text = f"\r\n{line}\r\n"
        try:
            self.stdout.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stdout, "encoding", None) or "ascii"
            self.stdout.write(text.encode(encoding, "replace").decode(encoding))
        self.stdout.flush()

    def _read_loop(self) -> None:
        fd = self.stdin.fileno() if hasattr(self.stdin, "fileno") else None
        raw = fd is not None and os.isatty(fd)
        with _raw_mode(fd) if raw else contextlib.nullcontext():
            while not self._stop.is_set():
                ch = os.read(fd, 1).decode(errors="ignore") if raw else self.stdin.readline()[:1]
                if ch == "":
                    return  # end of input
                if ch in ("\x03", "\x04", "q"):  # Ctrl-C, Ctrl-D, q
                    self._stop.set()
                    return
                self.handle_key(ch)

    def start(self) -> TerminalFeedback:
        self._thread = threading.Thread(target=self._read_loop, name="fedser-keys", daemon=True)
        self._thread.start()
        return self

    @property
    def quit_requested(self) -> bool:
        return self._stop.is_set()


@contextlib.contextmanager
def _raw_mode(fd: int):
    import termios
    import tty

    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
