"""Setting a bad item aside so that a shared loop goes on.

The control plane's loops (the rollout controller, the metric roll-up, the MQTT bridge, the
notify listener) and its report readers each handle many items that came, in the end, from
agents. One of them that cannot be used must cost only itself: it is set aside with its reason,
counted, logged once, and the loop goes on with the others. What this module decides:

- :func:`is_transient`: whether a failure is the database or the network going away (leave the
  item where it is and try again later) or something about the item itself (set it aside);
- :func:`reason_of`: an exception as a short, printable reason to store or log;
- :class:`SeenOnce`: a bounded memory of items already reported, so a bad stored row that is
  read again every tick is logged and counted once, not once a tick.
"""

from __future__ import annotations

from collections.abc import Hashable

from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

MAX_REASON = 500

# A cause of one of these types means the item's values were refused (an integer too large for
# its column, a string the driver could not encode), whatever wrapper the driver raised.
_DATA_FAULTS = (ValueError, TypeError, OverflowError, UnicodeError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is the database or the network failing, not the item being handled.

    Transient: connection and pool failures, timeouts, a database that is restarting, an
    error that says when to retry (``retry_after_s``, e.g. the database being busy); the item
    is kept and tried again. Not transient: a value the database or its driver refused
    (IntegrityError, DataError, or any error caused by a ValueError-like refusal), and every
    other exception.
    """
    if hasattr(exc, "retry_after_s"):
        return True
    if not isinstance(exc, SQLAlchemyError | OSError | TimeoutError):
        return False
    if isinstance(exc, IntegrityError | DataError):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, _DATA_FAULTS):
            return False
        cause = getattr(cause, "orig", None) or cause.__cause__
    return True


def reason_of(exc: BaseException) -> str:
    """``Type: message``, cut to ``MAX_REASON`` characters, control characters escaped."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return printable(text)


def printable(text: str, limit: int = MAX_REASON) -> str:
    """``text`` with anything but printable ASCII escaped, cut to ``limit`` characters."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class SeenOnce:
    """Remembers up to ``capacity`` keys, oldest forgotten first.

    ``first(key)`` is True the first time a key is offered (and again once it has been
    forgotten), so a bad row read on every tick is logged and counted about once.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._keys: dict[Hashable, None] = {}

    def first(self, key: Hashable) -> bool:
        """Whether ``key`` is new; remember it either way."""
        if key in self._keys:
            return False
        if len(self._keys) >= self.capacity:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = None
        return True

    def forget(self, key: Hashable) -> None:
        """Forget ``key``, so that it counts as new the next time."""
        self._keys.pop(key, None)
