"""minisup: a process supervisor in one file that speaks Circus's protocol.

minisup starts the programs an INI file describes, restarts them when they
die, stops them cleanly and answers a ZeroMQ control socket in Circus's JSON
protocol, so ``circusctl``, ``circus.client.CircusClient`` and ``python -m
minisup ctl`` all drive it.

Threads
-------
Each piece of mutable state has exactly one owning thread; threads meet only
at a ``queue`` plus a wake-up pipe (``Waker``), never at a lock around
shared state.

* The **main thread** runs the CLI and alone installs signal handlers
  (``SysHandler``).  A handler only queues a call and wakes the worker.
* The **controller thread** (``Controller``) alone touches zmq sockets.  It
  blocks in a ``zmq.Poller`` over the ROUTER control socket and its own
  wake-up pipe, decodes and validates each request, hands it to the worker
  as a ``Job`` and sends back whatever replies the worker has posted.  It
  answers ``list``, ``status`` and the counts itself, from the immutable
  ``View`` the worker publishes as each tick ends: no handoff for a read.
* The **worker thread** (``Arbiter``) alone touches watchers and processes.
  It blocks in a selector over its wake-up pipe and one pidfd per child, so a
  child's death is seen the moment it happens.  Each tick its ``JobRunner``
  runs every queued job and call, its ``Reaper`` reaps what died, then
  ``manage_watchers`` spawns, signals and kills against deadlines on a
  monotonic (injectable) clock, and its ``SystemdNotifier`` reports.  It
  never sleeps: the selector's timeout is the time to the next deadline.
* The **output thread** (``Pump``) alone touches the children's stdout and
  stderr pipes and the log files, so a slow disk never stalls supervision.
  It hands results back with ``Arbiter.call_on_worker``.
* The **spawner thread** (``Spawner``) forks each child for the worker,
  which waits for it, from a private fd table that holds almost nothing:
  a fork's cost grows with the forking thread's table, and the worker's
  holds a pidfd per child.  Fds cross between the tables by SCM_RIGHTS.

Two references are shared on purpose, each an immutable value swapped
whole by one thread and read by others: ``Controller.view`` (written by
the worker) and ``Controller.subscribed`` (written by the controller, read
to skip events no one wants).  Everything else crosses by a queue.  Three
locks exist.  ``PLACEMENT.lock``: a process sits in one cgroup, so the
spawner threads of several Daemons in one process take turns moving it
into a new child's cgroup for the fork (see Cgroups).  ``HOOK_IMPORT_LOCK``:
the threads that run Circus's hooks (see Hooks; each hands its outcome
back by a queue) take turns loading a hook module from the config folder.
``GC_HOLD``'s: the spawner threads hold the garbage collector off while
they run Python in their private fd tables (see Spawner).

Life of a process
-----------------
A watcher in state ``starting`` or ``active`` keeps ``numprocesses`` children
running.  Each child leads its own process group, so a Ctrl-C at the terminal
reaches only the daemon, and (in cgroup mode) is born in a cgroup of its
own.  Stopping a child sends ``stop_signal`` and sets a deadline
``graceful_timeout`` ahead; a child still alive then gets SIGKILL, with all
it started (its cgroup, else its group and descendants), and a stop is
over once its cgroup is empty.  The worker alone waits for children, one
pid at a time, so an in-process daemon never reaps its host's other
children and a pid is never signalled after it was reaped (and could have
been reused).
A child that dies while wanted is replaced at once; one that keeps dying
young is replaced after a growing delay, so a crash loop never spins.  A
child with a ``ready`` check counts as starting until it passes (a watcher
is ``active`` once all are); ``depends_on`` orders starts and stops by it,
and systemd hears of it through ``sd_notify`` when it runs minisup.

Protocol
--------
A request is one JSON frame ``{"id", "command", "properties", "msg_type"}``
on a ROUTER socket; the reply carries ``status``, ``time``, ``id`` and, on
error, ``reason`` and Circus's ``errno``.  A command with ``waiting: true``
is answered when its action completes, later, without blocking any loop.

Sections
--------
Each uses only what stands above it (``Daemon.client`` makes a ``Client``,
which stands below: the one late binding).

* Errors: ``MinisupError`` and its kinds, the wire errnos, ``Reply``.
* Helpers: signals, ``Waker``, endpoints and their checks.
* Config: option types, ``WatcherConfig``, ``Config``, the INI reader
  (Circus's rules, includes, plugins mapped or refused), ``parse_config``.
* Process: spawning (``spawn_process``, the exec helper), ``Process``, /proc.
* Cgroups: containment, a cgroup v2 subtree (``CgroupTree``), each child
  born in its own cgroup (``Placement``), and the fallback's tag.
* Output: ``Sink`` (log files, rotation) and ``Pump`` (the output thread).
* Watcher: one program's children, its states, restart policy and watchdog.
* Hooks: Circus's hooks, each call in a thread of its own (``HookRunner``).
* Arbiter: ``JobRunner``, ``Reaper``, ``SystemdNotifier`` and ``Arbiter``
  (the worker thread).
* Commands: one ``handle_<command>`` per wire command, ``COMMANDS``, the
  View, and the figures of the metrics.
* Controller: request checks, the metrics endpoint (``MetricsServer``) and
  ``Controller`` (the controller thread).
* SysHandler: the signal handlers.
* Daemon: the threads put together, for the CLI and for Python callers.
* Client: ``Client``, a DEALER on the control socket.
* CLI: ``run``, ``ctl`` (and ``ctl top``), ``keygen``, ``completion`` and ``main``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import collections
import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import gc
import glob
import grp
import itertools
import json
import logging
import math
import os
import pwd
import queue
import random
import re
import resource
import select
import selectors
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Self

import zmq

__all__ = ["CallError", "Client", "Config", "ConfigError", "Daemon", "MinisupError",
           "WatcherConfig", "load_config", "main", "parse_config"]

logger = logging.getLogger("minisup")

#: pidfd_open (Linux 5.3+) lets the worker's selector see a child's death.
HAS_PIDFD = hasattr(os, "pidfd_open")
_RANDOM = random.Random()  # jitter; our own: a host's random state is not ours to move


# ============================================================== Errors ======

# Circus's wire error numbers, 0 to 6.
NOT_SPECIFIED = 0
INVALID_JSON = 1
UNKNOWN_COMMAND = 2
MESSAGE_ERROR = 3
OS_ERROR = 4
COMMAND_ERROR = 5
BAD_MSG_DATA_ERROR = 6


class MinisupError(Exception):
    """Base of every error minisup raises; ``errno`` is the wire number."""

    errno = COMMAND_ERROR

    def __init__(self, reason: str, errno: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if errno is not None:
            self.errno = errno


class MessageError(MinisupError):
    """A request that is malformed or names something that does not exist."""

    errno = MESSAGE_ERROR


class ConfigError(MessageError):
    """A bad configuration, from a file or from ``add``/``set``: names the
    file, section, option and value (cut short if long)."""

    def __init__(self, reason: str, source: str | None = None,
                 section: str | None = None, option: str | None = None,
                 value: Any = None) -> None:
        """Keep each part, and make the message from those given:
        ``SOURCE: [SECTION]: OPTION = VALUE: REASON``."""
        self.source = source
        self.section = section
        self.option = option
        self.value = value
        self.detail = reason  # alone: a caller may re-raise it with its own place
        message = reason
        if option:
            shown = repr(value)
            if len(shown) > 100:  # a whole megabyte of cmd helps no one
                shown = shown[:100] + "..."
            message = f"{option} = {shown}: {reason}"
        places = []
        if source:
            places.append(source)
        if section:
            places.append(f"[{section}]")
        super().__init__(": ".join([*places, message]))


class CallError(MinisupError):
    """The client got no answer from the daemon in time."""

    errno = NOT_SPECIFIED


class Reply(NamedTuple):
    """What a command answers, for the controller to send: the ``fields``
    of an ok reply, or an error's ``errno``, ``reason`` and traceback."""

    fields: dict[str, Any]
    errno: int | None = None  # None: ok
    reason: str = ""
    tb: str | None = None

    @classmethod
    def refusal(cls, error: MinisupError) -> Reply:
        """The error reply that says why ``error`` was raised."""
        return cls({}, error.errno, error.reason)

    @property
    def ok(self) -> bool:
        """Whether this is an ok reply."""
        return self.errno is None

    def to_json(self, message_id: Any) -> dict[str, Any]:
        """The reply as Circus shapes it, echoing ``message_id``."""
        if self.ok:
            return {"status": "ok", "time": time.time(), **self.fields, "id": message_id}
        return {"status": "error", "reason": self.reason, "tb": self.tb, "time": time.time(),
                "errno": self.errno, "id": message_id}


def server_error(command: str, exc: Exception) -> Reply:
    """Log an unexpected failure of ``command`` with its traceback and make
    the errno 5 reply that carries it: a bug answers, never silences."""
    logger.error("command %r failed", command, exc_info=exc)
    return Reply({}, COMMAND_ERROR, f"command {command!r} failed: {exc!r}",
                 "".join(traceback.format_exception(exc)))


# ============================================================= Helpers ======

def parse_signal(value: str | int) -> int:
    """Return the signal number for 9, "9", "KILL" or "SIGKILL"; raise
    ValueError for an unknown name or number (or a bool).  Pure: any thread."""
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError("not a signal name") from None
    if isinstance(value, bool) or int(value) not in signal.valid_signals():
        raise ValueError("not a valid signal number")
    return int(value)


class Waker:
    """A non-blocking pipe that wakes a thread blocked in poll or select:
    ``wake`` from any thread or signal handler, ``drain`` by its owner."""

    def __init__(self) -> None:
        """Open the pipe, both ends non-blocking and closed on exec."""
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        """The read end, for the owner's selector (-1 once closed)."""
        return self.read_fd

    def wake(self) -> None:
        """Make the read end readable; any thread or a signal handler may
        call it, even after ``close``.  Never blocks, never raises."""
        # OSError: a full pipe (a wake-up is pending) or a closed one: then
        # write_fd is -1, never a number that may have been reused.
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        """Read every pending wake-up, so that the next poll blocks again;
        by the owner only.  Never blocks."""
        # BlockingIOError: the pipe is empty, every wake-up is consumed.
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        """Close both ends, by the owner; a second call does nothing."""
        fds = (self.read_fd, self.write_fd)
        # -1 before closing: a closed fd's number may be reused at once.
        self.read_fd = -1
        self.write_fd = -1
        close_fds(fds)


def close_fds(fds: Iterable[int | None]) -> None:
    """Close each fd that is open: None and -1 stand for none."""
    for fd in fds:
        if fd is not None and fd >= 0:
            os.close(fd)


def default_endpoint() -> str:
    """The private ipc endpoint that ``run`` and ``ctl`` agree on by default."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        folder = os.path.join(runtime, "minisup")
    else:
        temp = os.environ.get("TMPDIR") or "/tmp"  # not tempfile: ctl starts faster
        folder = os.path.join(temp, f"minisup-{os.geteuid()}")
    return "ipc://" + os.path.join(folder, "control.sock")


def check_endpoint(endpoint: str, curve: bool = False) -> str:
    """Return ``endpoint`` if minisup may bind it; raise ConfigError if not.
    ipc:// and loopback tcp://, or any tcp:// with ``curve`` (CURVE keys):
    whoever reaches the socket can run commands as the daemon's user."""
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    match = re.fullmatch(r"tcp://\[?([^\]]+?)\]?:(\d+|\*)", endpoint)
    if not match:
        raise ConfigError("use ipc://PATH or tcp://127.0.0.1:PORT",
                          option="endpoint", value=endpoint)
    host = match.group(1)
    try:
        import ipaddress
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}
    if not loopback and not curve:
        raise ConfigError("refusing to listen beyond loopback without authentication: set "
                          "[circus] curve_secret_key and curve_authorized_keys (python -m "
                          "minisup keygen makes key pairs)", option="endpoint", value=endpoint)
    return endpoint


def check_endpoint_owner(uid: int | None) -> None:
    """Raise ConfigError unless ``endpoint_owner`` gives nothing away.
    Whoever holds the control socket has every power of the daemon's user
    (``add`` and ``set`` run any program as it, write any file it may), so
    the socket of a daemon running as root is root's alone; and only root
    could give a socket to another user."""
    if uid is None or uid == os.geteuid():
        return
    if os.geteuid() == 0:
        reason = ("the control socket's owner controls the daemon, so uid "
                  f"{uid} would have root's power: run the daemon as that user instead")
    else:
        reason = f"a daemon running as uid {os.geteuid()} cannot give its socket away"
    raise ConfigError(reason, option="endpoint_owner", value=uid)


def check_udp_endpoint(endpoint: str) -> tuple[str, int]:
    """Split a discovery endpoint ``udp://HOST:PORT``; raise ConfigError.
    HOST is a loopback address or a multicast group (which is joined)."""
    match = re.fullmatch(r"udp://([\d.]+):(\d+)", endpoint)
    if not match or not _loopback_or_multicast(match.group(1)):
        raise ConfigError("use udp://127.0.0.1:PORT or udp://MULTICAST-GROUP:PORT",
                          option="multicast_endpoint", value=endpoint)
    return match.group(1), int(match.group(2))


def check_metrics_endpoint(text: str) -> tuple[str, int]:
    """Split ``metrics_endpoint`` (``HOST:PORT``, ``[IPv6]:PORT``); raise
    ConfigError naming it."""
    split = text.rpartition(":")
    host = split[0].removeprefix("[").removesuffix("]")
    port = split[2]
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("use HOST:PORT, as 127.0.0.1:9101", option="metrics_endpoint",
                          value=text)
    return host, int(port)


def _loopback_or_multicast(host: str) -> bool:
    """Whether the dotted address ``host`` is a loopback or a multicast one
    (not if it is no address at all)."""
    import ipaddress  # here: ctl starts faster
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # 999.0.0.1, 1.2.3: no address at all
        return False
    return address.is_loopback or address.is_multicast


def prepare_ipc_endpoint(endpoint: str) -> str | None:
    """Make the private folder of an ipc endpoint; return the socket path.
    A folder owned by another user is refused (its owner could swap the
    socket), so is one that others may write in (or one above it), and so
    is a socket a live daemon answers on (libzmq would silently unlink and
    steal it)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = os.path.abspath(endpoint[len("ipc://"):])
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ConfigError(f"{folder} is not a folder of uid {os.geteuid()}",
                          option="endpoint", value=endpoint)
    swappable = _writable_by_others(folder)
    if swappable:
        raise ConfigError(f"anyone may write in {swappable}, and so replace the socket: "
                          "use a folder only its owner may write in (or one with the "
                          "sticky bit, as /tmp)", option="endpoint", value=endpoint)
    if endpoint == default_endpoint() and stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, contextlib.suppress(OSError):
        probe.settimeout(1.0)  # no answer: a stale file, safe to reuse (odd paths: see bind)
        if probe.connect_ex(path) == 0:
            raise ConfigError("another daemon is already listening there",
                              option="endpoint", value=endpoint)
    return path


def _writable_by_others(folder: str) -> str | None:
    """The first of ``folder`` and its parents in which any user may rename
    or delete entries (world-writable without the sticky bit), or None: such
    a folder lets anyone swap what is below.  (A group-writable folder is
    left to the admin who shared it with that group.)"""
    while True:
        mode = os.lstat(folder).st_mode
        shared = mode & stat.S_IWOTH and not mode & stat.S_ISVTX
        if shared:
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def set_child_subreaper() -> None:
    """Make orphaned descendants re-parent to this process (Linux 3.4+),
    as they would to PID 1; raise OSError if the kernel refuses."""
    import ctypes  # here: a ctl never needs it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # 36: PR_SET_CHILD_SUBREAPER (linux/prctl.h)
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


# ============================================================== Config ======

class OptionType(NamedTuple):
    """How one option is read from INI text (``from_text``) and checked
    from JSON (``from_json``); each returns the value the config keeps and
    raises ValueError or TypeError with the reason a value is refused."""

    from_text: Callable[[str], Any]
    from_json: Callable[[Any], Any]


#: The bounds of numbers.  Larger values are typing errors, and unbounded
#: ones would let one request make the daemon loop or allocate for hours.
MAX_INT = 2**31 - 1
#: A year: the longest time any option or request may name (the worker's
#: deadlines and the selector's timeout stay far from overflowing).
MAX_SECONDS = 365 * 86400.0
#: The kernel's own ceiling on pids (PID_MAX_LIMIT, 64-bit Linux): no
#: watcher ever wants more processes; the daemon's own limit is lower
#: (``Config.max_processes``, derived from its fd and pid limits).
MAX_PROCESSES = 1 << 22
#: A line longer than this is always split: a child's unfinished line is
#: kept in memory, and joined to each new read, until it ends.
MAX_LINE = 1 << 20
#: The most lines ``tail_lines`` keeps and ``tail`` returns.
MAX_TAIL = 100_000
#: The most backup files a rotating stream keeps (each rotation renames them all).
MAX_BACKUPS = 1000
#: The largest limit ``rlimit_NAME`` takes (unset is unlimited): what rlim_t holds.
MAX_RLIMIT = 2**63 - 1


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer, and not JSON's true or false."""
    return isinstance(value, int) and not isinstance(value, bool)


# The JSON checks: each returns the value (a list copied, a signal as its
# number) or raises ValueError with the reason it is refused.

def _json_int(value: Any) -> int:
    """Check a JSON integer (true and false are none); raise ValueError."""
    if not _is_int(value):
        raise ValueError("isn't an integer")
    return value


def _json_number(value: Any) -> int | float:
    """Check a JSON number, integer or float; raise ValueError."""
    if not (_is_int(value) or isinstance(value, float)):
        raise ValueError("isn't a number")
    return value


def _json_bool(value: Any) -> bool:
    """Check a JSON boolean; raise ValueError."""
    if not isinstance(value, bool):
        raise ValueError("isn't a boolean")  # noqa: TRY004 - ValueError, as every check
    return value


def _json_str(value: Any) -> str:
    """Check a JSON string; raise ValueError."""
    if not isinstance(value, str):
        raise ValueError("isn't a string")  # noqa: TRY004 - ValueError, as every check
    return value


def _json_signal(value: Any) -> int:
    """Check a JSON signal, a number or a name, and return its number;
    raise ValueError."""
    if not (_is_int(value) or isinstance(value, str)):
        raise ValueError("isn't a signal")
    return parse_signal(value)


def _json_args(value: Any) -> list[str]:
    """Check JSON ``args``: a string, split as a shell would, or a list of
    strings (copied); raise ValueError."""
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a string or a list of strings")
    return list(value)


def _json_env(value: Any) -> dict[str, str]:
    """Check a JSON ``env``: an object whose values are strings; raise ValueError."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("must be an object of strings")
    return value


def _json_codes(value: Any) -> list[int]:
    """Check JSON exit codes: a list of integers 0-255; raise ValueError."""
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v < 256 for v in value):
        raise ValueError("must be a list of exit codes 0-255")
    return value


def _not_in_ini(text: str) -> Any:
    """Refuse an option that an INI section may not set; raise ValueError."""
    raise ValueError("set it in an [env] or [env:NAME] section")


def _option_type(convert: Callable[[str], Any], what: str,
                 check: Callable[[Any], Any]) -> OptionType:
    """An OptionType whose INI text is stripped and ``convert``-ed (a
    ValueError or KeyError from ``convert`` says the text is not ``what``),
    then checked by ``check``, as the same option sent as JSON is."""
    def parse(text: str) -> Any:
        """Convert and check INI ``text``; raise ValueError or TypeError."""
        try:
            value = convert(text.strip())
        except (ValueError, KeyError):
            raise ValueError(f"not {what}") from None
        return check(value)
    return OptionType(parse, check)


def _plain(number: float) -> int | float:
    """``number`` as a message shows it: 31536000, not 31536000.0 or 3.1536e+07."""
    if float(number).is_integer():
        return int(number)
    return number


def _in_range(minimum: float, maximum: float) -> Callable[[Any], Any]:
    """A JSON check that a number lies from ``minimum`` to ``maximum``: every
    number an option or a request takes has an upper bound, so that nothing
    the daemon is sent can make it work or allocate without end."""
    def check(value: Any) -> Any:
        """Return the number ``value`` if it is in range; raise ValueError."""
        if not minimum <= value <= maximum:  # False for NaN too
            if maximum == MAX_INT:
                raise ValueError(f"must be at least {_plain(minimum)}")
            raise ValueError(f"must be from {_plain(minimum)} to {_plain(maximum)}")
        return value
    return check


def _integer(minimum: int, maximum: int = MAX_INT) -> OptionType:
    """The OptionType of an integer option from ``minimum`` to ``maximum``."""
    in_range = _in_range(minimum, maximum)

    def check(value: Any) -> int:
        """Check a JSON integer in range; raise ValueError."""
        return in_range(_json_int(value))
    return _option_type(int, "an integer", check)


def _number(minimum: float, maximum: float, what: str) -> OptionType:
    """The OptionType of a number (``what``: "a number of seconds", say)
    from ``minimum`` to ``maximum``, read as a float."""
    in_range = _in_range(minimum, maximum)

    def check(value: Any) -> float:
        """Check a JSON number in range and return it as a float; raise ValueError."""
        return float(in_range(_json_number(value)))
    return _option_type(float, what, check)


def _account_id(by_number: Callable[[int], Any], by_name: Callable[[str], Any],
                field: str, what: str) -> OptionType:
    """The OptionType of a user (or group, ``what``) given by name or number,
    checked to exist, as Circus's to_uid / to_gid: ``by_number`` and
    ``by_name`` look up its entry, whose ``field`` is the id kept."""
    def parse(value: Any) -> int:
        """Return the id of the account ``value`` names (INI text or JSON);
        raise TypeError or ValueError."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError("isn't an integer or string")
        name = str(value).strip()
        try:
            if name.isdigit():
                entry = by_number(int(value))
            else:
                entry = by_name(name)
        except (KeyError, OverflowError):
            raise ValueError(f"no such {what}") from None
        return getattr(entry, field)
    return OptionType(parse, parse)


def _choice(*words: str) -> OptionType:
    """The OptionType of one of ``words``, in any case (kept in lower case)."""
    def check(value: Any) -> str:
        """Return ``value`` in lower case if it is one of the words; raise ValueError."""
        if not isinstance(value, str) or value.strip().lower() not in words:
            raise ValueError(f"use one of {', '.join(words)}")
        return value.strip().lower()
    return OptionType(check, check)


INT = _integer(-MAX_INT)
COUNT = _integer(0)
RETRIES = _integer(-1)  # -1: retry without end
POSITIVE = _integer(1)
SECONDS = _number(0, MAX_SECONDS, "a number of seconds")
OCTAL = _option_type(functools.partial(int, base=8), "an octal number",
                     _integer(0, 0o777).from_json)
#: libzmq counts a handshake's time in whole milliseconds (a C int), and
#: 0 ms means no limit at all: so at least 1 ms, at most a day.
HANDSHAKE = _number(0.001, 86400.0, "a number of seconds")
BOOLEANS = {**dict.fromkeys(["1", "true", "yes", "on", "y", "t"], True),  # as Circus
            **dict.fromkeys(["0", "false", "no", "off", "n", "f", ""], False)}


def _text_bool(text: str) -> bool:
    """The boolean an INI word stands for (BOOLEANS); raise KeyError."""
    return BOOLEANS[text.lower()]


BOOL = _option_type(_text_bool, "a boolean (use true or false)", _json_bool)
STR = OptionType(str.strip, _json_str)
SIGNAL = OptionType(parse_signal, _json_signal)
ARGS = OptionType(shlex.split, _json_args)
LIST = ARGS  # shell_args, redact_env, depends_on: words, read as args are
ENV = OptionType(_not_in_ini, _json_env)
USER = _account_id(pwd.getpwuid, pwd.getpwnam, "pw_uid", "user")
GROUP = _account_id(grp.getgrgid, grp.getgrnam, "gr_gid", "group")


def _text_rlimit(text: str) -> int | None:
    """An INI ``rlimit_NAME``: an integer, or None (unlimited) if empty;
    raise ValueError."""
    if not text:
        return None
    return int(text)


def _json_rlimit(value: Any) -> int | None:
    """Check a JSON ``rlimit_NAME``: None (unlimited) or an integer from 0
    to MAX_RLIMIT; raise ValueError."""
    if value is None:
        return None
    return _integer(0, MAX_RLIMIT).from_json(value)


def _text_codes(text: str) -> list[int]:
    """INI exit codes, separated by commas or spaces; raise ValueError."""
    return [int(code) for code in re.split(r"[\s,]+", text) if code]


RLIMIT = _option_type(_text_rlimit, "an integer", _json_rlimit)

#: ``memory_max`` suffixes: powers of 1024, as systemd's MemoryMax= reads them.
BYTE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _text_bytes(text: str) -> int:
    """An INI size (``memory_max``): bytes with an optional K, M, G or T
    suffix; raise ValueError (KeyError for an unknown suffix)."""
    number = text.upper().removesuffix("B")
    suffix = number[-1:]
    if suffix.isdigit():
        suffix = ""
    return int(number[:len(number) - len(suffix)]) * BYTE_SUFFIXES[suffix]


def size_text(count: int) -> str:
    """A size as ``memory_max`` reads it, in the largest unit that divides
    it: 64M for 67108864, 1536K for 1.5 MiB."""
    for suffix, unit in sorted(BYTE_SUFFIXES.items(), key=_second, reverse=True):
        if count % unit == 0:
            return f"{count // unit}{suffix}"
    return str(count)  # unreachable: the unit of "" is 1


def _second(item: tuple[Any, Any]) -> Any:
    """Sort key: the second of a pair."""
    return item[1]


def _no_limit_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An INI reader of a limit: "" or "max" (as in cgroup files) is None,
    no limit; anything else is ``convert``-ed."""
    def parse(text: str) -> Any:
        """None for "" or "max", else ``convert(text)``; raise as it does."""
        if text.lower() in ("", "max"):
            return None
        return convert(text)
    return parse


def _json_limit(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON checker of a limit: None (no limit), or what ``check`` takes."""
    def parse(value: Any) -> Any:
        """None, or ``check(value)``; raise ValueError."""
        if value is None:
            return None
        return check(value)
    return parse


def _json_bytes(value: Any) -> int:
    """Check a JSON size: bytes, at least a page, or INI text ("64M")."""
    if isinstance(value, str):
        try:
            value = _text_bytes(value.strip())
        except (ValueError, KeyError):
            raise ValueError("not a size in bytes (with K, M, G or T)") from None
    return _integer(4096, MAX_RLIMIT).from_json(value)


MEMORY = _option_type(_no_limit_or(_text_bytes), "a size in bytes (with K, M, G or T)",
                      _json_limit(_json_bytes))
PIDS = _option_type(_no_limit_or(int), "an integer",
                    _json_limit(_integer(1, MAX_PROCESSES).from_json))
# A percent of one CPU, 1000 CPUs at most: cpu.max gets a quota per 100 ms
# period, and 1% of it (1 ms) is the least that is not a typing error.
PERCENT = _option_type(_no_limit_or(float), "a percent of one CPU",
                       _json_limit(_number(1, 100_000, "a percent of one CPU").from_json))
CODES = _option_type(_text_codes, "a list of exit codes", _json_codes)

STREAM_CLASSES = ("filestream", "timedrotatingfilestream", "watchedfilestream", "stdoutstream")
ROTATE_WHEN = ("s", "m", "h", "d", "midnight", *(f"w{day}" for day in range(7)))
_STREAM_CLASS = _choice(*STREAM_CLASSES)


def _text_stream_class(text: str) -> str:
    """An INI stream class: "circus.stream.FileStream" and "FileStream"
    both name the FileStream; raise ValueError."""
    return _STREAM_CLASS.from_text(text.rsplit(".", 1)[-1])


def _json_stream_class(value: Any) -> str:
    """Check a JSON stream class, dotted or not (as the INI's); raise ValueError."""
    return _STREAM_CLASS.from_json(_json_str(value).rsplit(".", 1)[-1])


#: ``stdout_stream.*`` / ``stderr_stream.*`` options: name -> OptionType.
STREAM_OPTIONS: dict[str, OptionType] = {
    "class": OptionType(_text_stream_class, _json_stream_class),
    "filename": STR, "max_bytes": _integer(0, MAX_RLIMIT), "backup_count": _integer(0, MAX_BACKUPS),
    "time_format": STR, "rotate_when": _choice(*ROTATE_WHEN),
    "rotate_interval": _integer(0, 100_000), "utc": BOOL,  # 100,000 days: the clock's range
}


def _json_stream(value: Any) -> dict[str, Any]:
    """Check a JSON ``stdout_stream`` or ``stderr_stream`` object, each of its
    options by STREAM_OPTIONS; raise TypeError or ValueError."""
    if not isinstance(value, dict):
        raise TypeError("isn't a valid object")
    unknown = sorted(value.keys() - STREAM_OPTIONS.keys())
    if unknown:
        raise ValueError(f"has no option {unknown[0]!r}")
    return {key: STREAM_OPTIONS[key].from_json(v) for key, v in value.items()}


STREAM = OptionType(_not_in_ini, _json_stream)

#: Circus's hooks: each ``hooks.NAME`` option names a callable (see Hooks).
HOOK_NAMES = ("before_start", "after_start", "before_spawn", "after_spawn", "before_stop",
              "after_stop", "before_signal", "after_signal", "before_reap", "after_reap",
              "extended_stats")


def _hook_spec(name: str, ignore_failure: bool) -> list[Any]:
    """A hook's value as WatcherConfig keeps it, [NAME, IGNORE_FAILURE];
    raise ValueError for a name that is not ``module.callable`` (or
    ``module:callable``)."""
    name = name.strip()
    if not re.fullmatch(r"[\w.]+[.:][\w.]+", name):
        raise ValueError("name a callable as package.module.function (or module:function)")
    return [name, ignore_failure]


def _text_hook(text: str) -> list[Any]:
    """``hooks.NAME = module.function[, true|false]`` as Circus reads it:
    true says a failure of the hook is ignored."""
    parts = text.split(",", 1)
    ignore = False
    if len(parts) == 2:
        ignore = BOOL.from_text(parts[1])
    return _hook_spec(parts[0], ignore)


def _json_hook(value: Any) -> list[Any]:
    """A hook sent as JSON: the INI's text, or [NAME, IGNORE_FAILURE]."""
    if isinstance(value, str):
        return _text_hook(value)
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return _hook_spec(value[0], _json_bool(value[1]))
    raise TypeError('isn\'t "module.function[, true]" or [name, ignore_failure]')


def _json_hooks(value: Any) -> dict[str, list[Any]]:
    """A JSON ``hooks`` object: hook name -> its callable (see _json_hook)."""
    if not isinstance(value, dict):
        raise TypeError("isn't a valid object")
    return {str(name): _json_hook(spec) for name, spec in value.items()}


HOOK = OptionType(_text_hook, _json_hook)
HOOKS = OptionType(_not_in_ini, _json_hooks)

PREFIXED = {"rlimit_": "rlimits", "stdout_stream.": "stdout_stream",
            "stderr_stream.": "stderr_stream", "hooks.": "hooks"}


def watcher_option_type(key: str) -> OptionType | None:
    """The OptionType of watcher option ``key``, or None if there is no such
    option: ``rlimit_NAME`` for any limit the ``resource`` module knows,
    ``stdout_stream.NAME`` for a stream's."""
    if key.startswith("rlimit_"):
        if hasattr(resource, "RLIMIT_" + key[7:].upper()):
            return RLIMIT
        return None
    if key.startswith(("stdout_stream.", "stderr_stream.")):
        return STREAM_OPTIONS.get(key.split(".", 1)[1])
    if key.startswith("hooks."):
        return HOOK
    return WATCHER_OPTIONS.get(key)


def gather_prefixed(values: dict[str, Any], base: WatcherConfig | None = None) -> dict[str, Any]:
    """Fold ``rlimit_NAME`` and ``stdout_stream.NAME`` entries of ``values``
    into the dicts WatcherConfig keeps (on top of ``base``'s); check each
    stream that results.  Raise ValueError."""
    values = dict(values)
    for prefix, field in PREFIXED.items():
        merged = dict(values.pop(field, getattr(base, field, {})))
        for key in [k for k in values if k.startswith(prefix)]:
            merged[key[len(prefix):].lower()] = values.pop(key)
        if merged or field in values or base is not None:
            values[field] = merged
    for field in ("stdout_stream", "stderr_stream"):
        stream = values.get(field)
        if stream and stream.get("class") is None:
            raise ValueError(f"{field} needs a class")
        if stream and stream["class"] != "stdoutstream" and not stream.get("filename"):
            raise ValueError(f"{field} needs a filename")
    return values


def meta(option_type: OptionType | None, reload: bool = False) -> dict[str, Any]:
    """A config field's metadata: the INI file and ``add``/``set`` read it
    by ``option_type`` (None: not an option of its own); ``reload``:
    changing it needs new processes."""
    return {"option_type": option_type, "reload": reload}


def option(option_type: OptionType | None, default: Any = dataclasses.MISSING, *,
           reload: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with an immutable default (``meta`` says the rest)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata=meta(option_type, reload))


def _json_ready(value: Any) -> str | None:
    """Check a ``ready`` value, INI text or JSON: None for "" or "none",
    else tcp:[HOST:]PORT, file:PATH or notify; raise ValueError."""
    text = _json_str(value).strip()
    if text in ("", "none"):
        return None
    if re.fullmatch(r"notify|file:.+|tcp:(.+:)?\d{1,5}", text):
        return text
    raise ValueError("use tcp:PORT, tcp:HOST:PORT, file:PATH or notify")


READY = OptionType(_json_ready, _json_ready)


def _success_codes() -> list[int]:
    """A new list of the default ``exit_codes``: only 0 counts as success."""
    return [0]


@dataclasses.dataclass
class WatcherConfig:
    """What one ``[watcher:NAME]`` section (or an ``add``) asks for: each
    field's metadata says how it is read, so this is the option table."""

    name: str
    cmd: str = option(STR, reload=True)
    args: list[str] = dataclasses.field(default_factory=list, metadata=meta(ARGS, True))
    numprocesses: int = option(_integer(0, MAX_PROCESSES), 1)
    working_dir: str | None = option(STR, None, reload=True)
    shell: bool = option(BOOL, False, reload=True)
    copy_env: bool = option(BOOL, False, reload=True)
    env: dict[str, str] = dataclasses.field(default_factory=dict, metadata=meta(ENV, True))
    graceful_timeout: float = option(SECONDS, 30.0)
    stop_signal: int = option(SIGNAL, int(signal.SIGTERM))
    respawn: bool = option(BOOL, True)
    autostart: bool = option(BOOL, True)
    warmup_delay: float = option(SECONDS, 0.0)
    priority: int = option(INT, 0)
    singleton: bool = option(BOOL, False)
    max_retry: int = option(RETRIES, 5)
    retry_in: float = option(SECONDS, 1.0)
    send_hup: bool = option(BOOL, False)
    stop_children: bool = option(BOOL, False)
    use_sockets: bool = option(BOOL, False, reload=True)
    uid: int | None = option(USER, None, reload=True)
    gid: int | None = option(GROUP, None, reload=True)
    umask: int | None = option(OCTAL, None, reload=True)
    shell_args: list[str] = dataclasses.field(default_factory=list, metadata=meta(LIST, True))
    executable: str | None = option(STR, None, reload=True)
    copy_path: bool = option(BOOL, False, reload=True)
    rlimits: dict[str, int | None] = dataclasses.field(  # from rlimit_NAME options
        default_factory=dict, metadata=meta(None, True))
    close_child_stdin: bool = option(BOOL, True, reload=True)
    close_child_stdout: bool = option(BOOL, False, reload=True)
    close_child_stderr: bool = option(BOOL, False, reload=True)
    stdin_socket: str | None = option(STR, None, reload=True)
    stdout_stream: dict[str, Any] = dataclasses.field(default_factory=dict,
                                                      metadata=meta(STREAM, True))
    stderr_stream: dict[str, Any] = dataclasses.field(default_factory=dict,
                                                      metadata=meta(STREAM, True))
    # A line is held back until it ends, up to max_line bytes: a longer one
    # is written in pieces of that size (nothing added).
    max_line: int = option(_integer(1, MAX_LINE), 65536, reload=True)
    tail_lines: int = option(_integer(0, MAX_TAIL), 100)  # kept in memory for ``tail``
    # minisup's own: env names (glob patterns) whose values options/get hide.
    redact_env: list[str] = dataclasses.field(default_factory=list, metadata=meta(LIST))
    max_age: float = option(SECONDS, 0.0)
    max_age_variance: float = option(SECONDS, 30.0)
    # Restart policy (minisup's own): which exits are replaced, and how a
    # crash loop backs off or, past flapping_attempts, pauses and gives up.
    restart: str = option(_choice("always", "on-failure", "never"), "always")
    exit_codes: list[int] = dataclasses.field(default_factory=_success_codes, metadata=meta(CODES))
    min_uptime: float = option(SECONDS, 1.0)
    backoff_delay: float = option(SECONDS, 0.1)
    backoff_factor: float = option(_number(1, 100, "a number"), 2.0)
    backoff_max: float = option(SECONDS, 5.0)
    backoff_jitter: float = option(_number(0, 1, "a fraction"), 0.1)
    flapping_attempts: int = option(COUNT, 0)
    flapping_window: float = option(SECONDS, 1.0)
    flapping_retry_in: float = option(SECONDS, 7.0)
    flapping_max_retry: int = option(RETRIES, 5)
    # minisup's own: when a process is ready (tcp:PORT, file:PATH, notify;
    # none: at spawn), replaced if not within ready_timeout; the watchers
    # this one starts after (once ready) and stops before.
    ready: str | None = option(READY, None)
    ready_timeout: float = option(SECONDS, 30.0)
    # minisup's own, as systemd's WatchdogSec: once ready, a process must
    # send WATCHDOG=1 to its NOTIFY_SOCKET this often (0: no watchdog).
    watchdog_sec: float = option(SECONDS, 0.0, reload=True)
    depends_on: list[str] = dataclasses.field(default_factory=list, metadata=meta(LIST))
    # Circus's hooks (see Hooks): name -> [callable's name, ignore_failure],
    # from ``hooks.NAME`` options; each runs off the worker, for at most
    # hook_timeout seconds (minisup's own), past which it has failed.
    hooks: dict[str, list[Any]] = dataclasses.field(default_factory=dict, metadata=meta(HOOKS))
    hook_timeout: float = option(_number(0.001, MAX_SECONDS, "a number of seconds"), 30.0)
    # minisup's own (cgroup v2 mode, see Cgroups): whether what a process
    # left in its cgroup dies with it, and the kernel's limits on each
    # process with all its descendants.
    kill_leftovers: bool = option(BOOL, True)
    memory_max: int | None = option(MEMORY, None, reload=True)
    cpu_quota: float | None = option(PERCENT, None, reload=True)
    pids_max: int | None = option(PIDS, None, reload=True)

    def __post_init__(self) -> None:
        """Complete ``__init__``: names in lower case, and what singleton
        and respawn = false imply for numprocesses and restart."""
        self.name = self.name.lower()
        self.depends_on = [name.lower() for name in self.depends_on]
        if self.singleton:
            self.numprocesses = min(self.numprocesses, 1)
        if not self.respawn:  # Circus's respawn = false is restart = never
            self.restart = "never"

    def options(self) -> dict[str, Any]:
        """Every option as JSON-ready values (what ``options`` replies);
        limits appear as ``rlimit_NAME``."""
        options = {k: v for k, v in dataclasses.asdict(self).items()
                   if k not in ("name", "rlimits")}
        options.update((f"rlimit_{k}", v) for k, v in self.rlimits.items())
        env = dict(self.env)
        for name in env:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.redact_env):
                env[name] = "<redacted>"
        options["env"] = env
        return options


@dataclasses.dataclass
class SocketConfig:
    """One ``[socket:NAME]``: a socket the daemon binds for its watchers."""

    name: str
    host: str = option(STR, "127.0.0.1")
    port: int = option(_integer(0, 65535), 0)
    path: str | None = option(STR, None)
    family: str = option(_choice("af_inet", "af_inet6", "af_unix"), "af_inet")
    type: str = option(_choice("sock_stream", "sock_dgram"), "sock_stream")
    backlog: int = option(_integer(0, 65535), 2048)
    umask: int | None = option(OCTAL, None)
    replace: bool = option(BOOL, False)
    so_reuseport: bool = option(BOOL, False)


@dataclasses.dataclass
class Config:
    """A whole daemon configuration; ``load_config`` makes one from a file.
    The fields with an OptionType are the ``[circus]`` options."""

    watchers: list[WatcherConfig] = dataclasses.field(default_factory=list)
    sockets: list[SocketConfig] = dataclasses.field(default_factory=list)
    endpoint: str = option(STR, factory=default_endpoint)
    pubsub_endpoint: str | None = option(STR, None)
    multicast_endpoint: str | None = option(STR, None)
    endpoint_owner: int | None = option(USER, None)
    # minisup's own: a larger request gets an errno 3 reply; 64 times larger,
    # libzmq drops it (and its connection) before it is read into memory.
    max_message_size: int = option(_integer(1, 1 << 24), 1 << 20)
    # minisup's own: how many processes, over every watcher, the daemon may
    # keep (0: what its fd and pid limits allow); a request for more is refused.
    max_processes: int = option(_integer(0, MAX_PROCESSES), 0)
    # CURVE on every zmq socket: the daemon's key pair (keygen's .key_secret
    # file) and the folder of the public .key files of the clients let in.
    curve_secret_key: str | None = option(STR, None)
    curve_authorized_keys: str | None = option(STR, None)
    # minisup's own: libzmq drops a connection (CURVE or not) whose ZMTP
    # handshake is not done by then, so idle raw connections cannot hold the
    # daemon's fds for long (libzmq's default: 30 s).  A real client finishes
    # in milliseconds on loopback, in well under a second over a slow link:
    # 5 s leaves it a wide margin.  0 is refused (libzmq: no limit at all).
    handshake_timeout: float = option(HANDSHAKE, 5.0)
    # minisup's own: HOST:PORT where GET /metrics answers in Prometheus's
    # text format (unset: no listener).
    metrics_endpoint: str | None = option(STR, None)
    guardian: bool = option(BOOL, True)  # children die with the daemon
    # minisup's own: a cgroup v2 subtree holds every process (auto: where the
    # daemon can write one; required: or it does not start; off: never).
    cgroup: str = option(_choice("auto", "required", "off"), "auto")
    # At or below 0, as in Circus: no periodic check (deaths need none here).
    check_delay: float = option(_number(-MAX_SECONDS, MAX_SECONDS, "a number of seconds"), 5.0)
    # Circus's daemon umask, which its children inherit: here, the umask of
    # each watcher of the file that sets none.
    umask: int | None = option(OCTAL, None)
    warmup_delay: float = option(SECONDS, 0.0)
    loglevel: str = option(STR, "info")
    logoutput: str = option(STR, "-")
    pidfile: str | None = option(STR, None)
    # Circus's WatchDog plugin, where a config has one: the loopback UDP
    # address its heartbeats come to, and the pattern that finds the pid.
    heartbeat_address: tuple[str, int] | None = None
    heartbeat_pattern: str | None = None
    source: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


def _option_table(cls: type) -> dict[str, OptionType]:
    """Name -> OptionType of the option fields of dataclass ``cls``."""
    return {field.name: field.metadata["option_type"] for field in dataclasses.fields(cls)
            if field.metadata.get("option_type")}


#: The option tables: name -> OptionType, from the dataclasses above.
WATCHER_OPTIONS = _option_table(WatcherConfig)
SOCKET_OPTIONS = _option_table(SocketConfig)
GLOBAL_OPTIONS = _option_table(Config)
#: Options whose change needs new processes (``set`` reloads gracefully).
RELOAD_OPTIONS = {f.name for f in dataclasses.fields(WatcherConfig) if f.metadata.get("reload")}


#: ``$(circus.KEY)`` or ``((circus.KEY))``: Circus's two spellings, any case.
SUBSTITUTION = re.compile(r"\$\(circus\.([\w.-]+)\)|\(\(circus\.([\w.-]+)\)\)", re.IGNORECASE)


def _variable(name: str, envs: tuple[dict[str, str], ...]) -> str | None:
    """The value of variable ``name`` in the first of ``envs`` that has it,
    its case ignored as Circus ignores it (an exact match first); None if
    none has it."""
    lowered = name.lower()
    for env in envs:
        if name in env:
            return env[name]
        for key, value in env.items():
            if key.lower() == lowered:
                return value
    return None


def substitute(text: str, values: dict[str, str], *envs: dict[str, str]) -> str:
    """Expand ``$(circus.KEY)`` in ``text``: KEY from ``values`` (``wid``,
    ``sockets.NAME``, in lower case), ``env.NAME`` from the first of
    ``envs`` that has NAME.  Anything else in that form is left as written,
    as Circus leaves it.  Pure."""
    def replace(match: re.Match[str]) -> str:
        """The text of one match, for SUBSTITUTION.sub."""
        key = match.group(1) or match.group(2)
        if key.lower() in values:
            return values[key.lower()]
        found = None
        if key.lower().startswith("env."):
            found = _variable(key[4:], envs)
        if found is None:
            return match.group(0)
        return found
    return SUBSTITUTION.sub(replace, text)


INI_SECTION = re.compile(r"\[(?P<name>.+)\]")  # what follows the "]" is ignored
INI_OPTION = re.compile(r"(?P<name>.*?)\s*[=:]\s*(?P<value>.*)$")


@dataclasses.dataclass
class IniSection:
    """One section as Circus's reader leaves it: option names as written
    (case kept), each with the lines of its value and the file it came from."""

    name: str
    source: str  # the file that began it
    lines: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def items(self) -> list[tuple[str, str]]:
        """(name, value) pairs in the order read; a value's lines are joined by newlines."""
        return [(name, "\n".join(lines)) for name, lines in self.lines.items()]

    def get(self, name: str, default: str = "") -> str:
        """The value of option ``name``, or ``default`` if it is not set."""
        if name not in self.lines:
            return default
        return "\n".join(self.lines[name])


def _is_comment(line: str) -> bool:
    """True for a line Circus's reader skips: blank, starting with ``#`` or
    ``;``, or a ``rem`` line (the word at the very start, in any case)."""
    if not line.strip() or line[0] in "#;":
        return True
    return line[0] in "rR" and line.split(None, 1)[0].lower() == "rem"


def _ini_value(text: str) -> str:
    """An option's value as Circus cuts it: only the first ``;`` may start a
    comment, and only after whitespace; ``""`` is the empty value."""
    cut = text.find(";")
    # At 0, Circus looks at text[-1] (a trailing blank cuts all): the same here.
    if cut >= 0 and text[cut - 1].isspace():
        text = text[:cut]
    text = text.strip()
    if text == '""':
        return ""
    return text


def read_ini(text: str, source: str, sections: dict[str, IniSection],
             warnings: list[str]) -> None:
    """Add the sections of INI ``text`` to ``sections`` by Circus's rules,
    not configparser's: comments as ``_is_comment`` says; a line that starts
    with whitespace continues the last option; a section read before is
    added to; a repeated option keeps its first value (with a warning), and
    the repeat's continuation lines go to that first value, as in Circus.
    Pure; raise ConfigError naming the first line that is none of these."""
    current: IniSection | None = None
    option = None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as readline
    for number, line in enumerate(lines, 1):
        if _is_comment(line):
            continue
        if line[0].isspace() and current is not None and option is not None:
            if line.strip():
                current.lines[option].append(line.strip())
            continue
        header = INI_SECTION.match(line)
        if header:
            current = _ini_section(header["name"], source, number, sections)
            option = None
            continue
        found = INI_OPTION.match(line)
        if not found:
            raise ConfigError(f"line {number}: not a [section] or option = value: "
                              f"{line.strip()[:100]!r}", source)
        if current is None:
            raise ConfigError(f"line {number}: an option before any [section]: "
                              f"{line.strip()[:100]!r}", source)
        option = found["name"]
        if option in current.lines:
            warnings.append(f"{source}: line {number}: [{current.name}]: {option!r} is set "
                            "again; the first value stands, as in Circus")
            continue
        current.lines[option] = [_ini_value(found["value"])]
        current.sources[option] = source


def _ini_section(name: str, source: str, number: int,
                 sections: dict[str, IniSection]) -> IniSection:
    """The section ``[name]`` starts or continues (Circus merges sections of
    one name, in one file or across includes).  Raise ConfigError for
    ``[DEFAULT]``, whose options configparser would copy into every section."""
    if name == "DEFAULT":
        raise ConfigError(f"line {number}: a [DEFAULT] section is not supported: "
                          "set its options in each section", source)
    if name not in sections:
        sections[name] = IniSection(name, source)
    return sections[name]


def read_ini_file(path: str, sections: dict[str, IniSection], warnings: list[str]) -> None:
    """Read the INI file at ``path`` into ``sections`` (see ``read_ini``);
    raise ConfigError if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path) from None
    read_ini(text, path, sections, warnings)


def included_files(circus: IniSection, source: str, env: dict[str, str],
                   warnings: list[str]) -> list[str]:
    """The files ``[circus] include`` (glob patterns) and ``include_dir``
    (folders, each read as ``FOLDER/*.ini``) name, relative to the folder
    of ``source`` (the including file) unless absolute, in that order, each pattern's
    sorted (Circus leaves them in the order the folder lists them).  A
    pattern that matches nothing is a warning, as in Circus."""
    patterns = substitute(circus.get("include"), {}, env).split()
    for folder_name in substitute(circus.get("include_dir"), {}, env).split():
        patterns.append(os.path.join(folder_name, "*.ini"))
    folder = os.path.dirname(source)
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(folder, pattern)))
        if not matches:
            warnings.append(f"{source}: [circus]: include {pattern!r} names no file "
                            f"(relative to {folder or '.'})")
        for path in matches:
            if path not in found:
                found.append(path)
    return found


def load_config(path: str | os.PathLike) -> Config:
    """Read and check an INI file and the files it includes; raise
    ConfigError.  Starts nothing."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", source) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>",
                 environ: dict[str, str] | None = None) -> Config:
    """Check Circus-style INI ``text`` and return a Config; starts nothing.
    The files ``[circus] include`` and ``include_dir`` name are read too,
    relative to ``source``'s folder.  ``environ`` (default ``os.environ``)
    expands ``$VAR`` in env sections and ``$(circus.env.NAME)`` in every
    section.  An unknown option is a warning in ``Config.warnings``; a bad
    value is a ConfigError naming the file, section, option and value."""
    if environ is None:
        environ = os.environ
    config = Config(source=source)
    sections = _read_ini_files(text, source, environ, config.warnings)
    envs = _read_envs(sections, environ)
    daemon_env = {**environ, **_global_variables(envs)}  # as Circus: [env] over the daemon's
    if "circus" in sections:
        _read_global(config, sections["circus"], daemon_env)
    plugins = [_read_plugin(config, s, daemon_env) for s in _sections_of(config, sections, "plugin")]
    defaults = _plugin_defaults(config, plugins)
    watchdogs = _watchdog_plugin(config, plugins)
    for section in _sections_of(config, sections, "socket"):
        config.sockets.append(_read_socket(config, section, daemon_env))
    for section in _sections_of(config, sections, "watcher"):
        name = section.name.partition(":")[2]
        given = {**defaults, **_watchdog_defaults(watchdogs, name)}
        config.watchers.append(_read_watcher(config, section, envs, daemon_env, given))
    _warn_unknown_sections(config, sections)
    if not config.watchers:
        raise ConfigError(_no_watcher_reason(list(sections)), source)
    _check_socket_names(config)
    try:
        check_dependencies(config.watchers)
    except ValueError as exc:
        raise ConfigError(str(exc), source) from None
    return config


def _read_ini_files(text: str, source: str, environ: dict[str, str],
                    warnings: list[str]) -> dict[str, IniSection]:
    """The sections of INI ``text`` merged with those of the files its
    ``[circus]`` includes (Circus reads the includes of the first file
    only, and so does minisup); raise ConfigError."""
    sections: dict[str, IniSection] = {}
    read_ini(text, source, sections, warnings)
    if "circus" in sections:
        for path in included_files(sections["circus"], source, environ, warnings):
            if os.path.abspath(path) != os.path.abspath(source):
                read_ini_file(path, sections, warnings)
    return sections


KNOWN_SECTIONS = ("circus", "env", "watcher", "socket", "plugin")


def _sections_of(config: Config, sections: dict[str, IniSection], kind: str) -> list[IniSection]:
    """The sections named ``[KIND:...]``, in the order read.  One with no
    option is skipped with a warning, as Circus skips it (silently)."""
    found = []
    for section in sections.values():
        if section.name.partition(":")[0] != kind:
            continue
        if section.lines:
            found.append(section)
        else:
            config.warnings.append(f"{config.source}: [{section.name}]: no option, "
                                   "ignored (as Circus ignores an empty section)")
    return found


def _warn_unknown_sections(config: Config, sections: dict[str, IniSection]) -> None:
    """Warn in ``config`` of each section that is none of KNOWN_SECTIONS
    (Circus ignores them; its names are case-sensitive, as here)."""
    for name in sections:
        if name.partition(":")[0] not in KNOWN_SECTIONS:
            config.warnings.append(f"{config.source}: [{name}]: section not supported, ignored")


def _read_envs(sections: dict[str, IniSection],
               environ: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The ``[env]`` and ``[env:PATTERNS]`` sections, in file order, as
    (patterns, variables) pairs: patterns "" for ``[env]``, and each value
    with its ``$(circus.env.NAME)``, ``$VAR`` and ``${VAR}`` expanded from
    ``environ``."""
    envs = []
    for name, section in sections.items():
        if name == "env" or name.startswith("env:"):
            variables = {key: expand_vars(substitute(value, {}, environ), environ)
                         for key, value in section.items()}
            envs.append((name[3:].lstrip(":"), variables))
    return envs


def _global_variables(envs: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """The variables of the ``[env]`` section (patterns ""), which Circus
    also lets every section's ``$(circus.env.NAME)`` see."""
    variables: dict[str, str] = {}
    for patterns, values in envs:
        if not patterns:
            variables.update(values)
    return variables


#: Circus options that tune only Circus's own side processes (its stats,
#: web and statsd helpers, its logging setup): accepted with a warning that
#: names what minisup offers instead.
_NO_STATS_PROCESS = "minisup runs no stats process: the stats command answers from the daemon"
_NO_WEB_CONSOLE = "minisup has no web console: use ctl status, ctl watch and ctl tail"
CIRCUS_SIDE_OPTIONS = {
    "stats_endpoint": _NO_STATS_PROCESS, "statsd": _NO_STATS_PROCESS,
    "fqdn_prefix": "it prefixes statsd names, and minisup sends none",
    "httpd": _NO_WEB_CONSOLE, "httpd_host": _NO_WEB_CONSOLE, "httpd_port": _NO_WEB_CONSOLE,
    "debug": "use loglevel = debug", "debug_gc": "use loglevel = debug",
    "loggerconfig": "use loglevel and logoutput",
    "stdout_stream.refresh_time": "minisup writes output as it arrives",
    "stderr_stream.refresh_time": "minisup writes output as it arrives",
}
#: Circus watcher options that change how a watcher runs and that minisup
#: does not offer: a config that sets them is refused, never half-honoured.
_USE_VENV_PYTHON = ("run the virtualenv's own interpreter (cmd = /srv/venv/bin/python "
                    "app.py): it needs no PATH or PYTHONPATH set for it")
REFUSED_OPTIONS = {
    "virtualenv": _USE_VENV_PYTHON, "virtualenv_py_ver": _USE_VENV_PYTHON,
    "on_demand": "minisup starts a watcher with the daemon or, with autostart = false, "
                 "on a start command; it does not wait for a first connection",
}
#: Circus's ``flapping.NAME`` watcher options (read by its Flapping plugin).
FLAPPING_ALIASES = {f"flapping.{name}": f"flapping_{name}"
                    for name in ("attempts", "window", "retry_in", "max_retry")}
#: The replacements named when a ``[plugin:NAME]`` is refused, by its class.
_EVENTS = "subscribe to the events minisup publishes on pubsub_endpoint instead"
PLUGIN_REPLACEMENTS = {
    "circus.plugins.statsd.StatsdEmitter": "use the stats command (ctl stats)",
    "circus.plugins.statsd.FullStats": "use the stats command (ctl stats)",
    "circus.plugins.resource_watcher.ResourceWatcher":
        "use the cgroup limits memory_max, cpu_quota and pids_max",
    "circus.plugins.http_observer.HttpObserver": "use ready = tcp:PORT and the health command",
    "circus.plugins.redis_observer.RedisObserver": "use ready = tcp:PORT and the health command",
    "circus.plugins.command_reloader.CommandReloader":
        "use reloadconfig (ctl reloadconfig), which restarts what changed",
}
FLAPPING_PLUGIN = "circus.plugins.flapping.Flapping"
WATCHDOG_PLUGIN = "circus.plugins.watchdog.WatchDog"
#: The WatchDog plugin's options minisup honours, with Circus's defaults.
WATCHDOG_PLUGIN_OPTIONS = {"loop_rate": "60", "max_count": "3", "watchers_regex": ".*",
                           "msg_regex": "^(?P<pid>.*);(?P<timestamp>.*)$",
                           "ip": "127.0.0.1", "port": "1664", "use": "", "priority": "0"}
#: The Flapping plugin's options: the watcher option each sets, and
#: Circus's default for it.
FLAPPING_PLUGIN_OPTIONS = {"attempts": ("flapping_attempts", "2"),
                           "window": ("flapping_window", "1"),
                           "retry_in": ("flapping_retry_in", "7"),
                           "max_retry": ("flapping_max_retry", "5")}
#: Options of the ``[watcher:NAME]`` section that only Circus's INI file
#: has (not ``add`` or ``set``): read, then folded into minisup's own.
INI_ONLY_OPTIONS = {"check_flapping": BOOL, "on_demand": BOOL}
#: Watcher options expanded at each spawn (with the child's env and wid),
#: so not when the file is read.
SPAWN_SUBSTITUTED = {"cmd", "args", "shell_args"}


def _read_options(config: Config, section: IniSection,
                  type_of: Callable[[str], OptionType | None],
                  envs: tuple[dict[str, str], ...]) -> dict[str, Any]:
    """Parse a section's options, each by the OptionType ``type_of`` its
    name gives, after expanding ``$(circus.env.NAME)`` from ``envs``; warn
    about unknown ones in ``config``; raise ConfigError."""
    values: dict[str, Any] = {}
    for option, text in section.items():
        option_type = type_of(option)
        if option_type is None or option_type is ENV:
            _warn_unknown_option(config, section, option, type_of)
            continue
        if option not in SPAWN_SUBSTITUTED:
            text = substitute(text, {}, *envs)
        try:
            values[option] = option_type.from_text(text)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc), section.sources[option], section.name,
                              option, text) from None
    return values


def _warn_unknown_option(config: Config, section: IniSection, option: str,
                         type_of: Callable[[str], OptionType | None]) -> None:
    """Warn in ``config`` of ``option``, which ``type_of`` does not know:
    what minisup offers for a Circus-only one; the name it may mean for one
    in another case (option names are case-sensitive, as in Circus)."""
    where = f"{section.sources[option]}: [{section.name}]"
    if option in CIRCUS_SIDE_OPTIONS:
        reason = f"Circus's own, ignored: {CIRCUS_SIDE_OPTIONS[option]}"
    elif option.lower() != option and type_of(option.lower()) is not None:
        reason = (f"ignored: option names are case-sensitive, as in Circus "
                  f"(did you mean {option.lower()!r}?)")
    else:
        reason = "ignored"
    config.warnings.append(f"{where}: unknown or unsupported option {option!r}, {reason}")


def _global_option_type(key: str) -> OptionType | None:
    """The OptionType of ``[circus]`` option ``key`` (``include`` and
    ``include_dir`` too: read before the rest, by ``included_files``)."""
    if key in ("include", "include_dir"):
        return STR
    return GLOBAL_OPTIONS.get(key)


def _read_global(config: Config, section: IniSection, env: dict[str, str]) -> None:
    """Read the ``[circus]`` section into ``config``, ``$(circus.env.NAME)``
    expanded from ``env``; raise ConfigError for a bad value, half a CURVE
    setup, an endpoint_owner that gives the daemon away, or an endpoint it
    may not bind."""
    values = _read_options(config, section, _global_option_type, (env,))
    values.pop("include", None)
    values.pop("include_dir", None)
    for key, value in values.items():
        setattr(config, key, value)
    if bool(config.curve_secret_key) != bool(config.curve_authorized_keys):
        raise ConfigError("set both curve_secret_key and curve_authorized_keys, or neither",
                          config.source, "circus")
    try:
        check_endpoint_owner(config.endpoint_owner)
    except ConfigError as exc:
        raise ConfigError(exc.detail, config.source, "circus", exc.option, exc.value) from None
    for key in ("endpoint", "pubsub_endpoint", "multicast_endpoint", "metrics_endpoint"):
        value = getattr(config, key)
        try:
            if key == "metrics_endpoint" and value:
                check_metrics_endpoint(value)
            elif key == "multicast_endpoint" and value:  # empty: off, as in Circus
                check_udp_endpoint(value)
            elif value:
                check_endpoint(value, bool(config.curve_secret_key))
        except ConfigError as exc:
            raise ConfigError(exc.detail, config.source, "circus", key, value) from None


def _read_socket(config: Config, section: IniSection, env: dict[str, str]) -> SocketConfig:
    """Read a ``[socket:NAME]`` section (a path makes it af_unix),
    ``$(circus.env.NAME)`` expanded from ``env``; raise ConfigError."""
    values = _read_options(config, section, SOCKET_OPTIONS.get, (env,))
    if values.get("path"):
        values.setdefault("family", "af_unix")
    if values.get("family") == "af_unix" and not values.get("path"):
        raise ConfigError("a unix socket needs a path", config.source, section.name, "path", "")
    return SocketConfig(name=section.name.partition(":")[2].strip().lower(), **values)


def _read_plugin(config: Config, section: IniSection,
                 env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Read a ``[plugin:NAME]`` section: its options (``$(circus.env.NAME)``
    expanded from ``env``), for a plugin minisup maps onto its own options.
    Raise ConfigError naming what minisup offers for any other: minisup runs
    no plugin, and one silently dropped would change what the config does."""
    options = {key: substitute(value, {}, env) for key, value in section.items()}
    use = options.get("use", "")
    if use in (FLAPPING_PLUGIN, WATCHDOG_PLUGIN):
        return section.name, options
    offer = PLUGIN_REPLACEMENTS.get(use, f"minisup runs no plugin: {_EVENTS}")
    raise ConfigError(f"the plugin {use or '(no use = CLASS)'} is not supported: {offer}",
                      section.sources.get("use", config.source), section.name, "use", use)


def _plugin_defaults(config: Config,
                     plugins: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """The watcher options the mapped plugins set for every watcher (each
    watcher's own win): Circus's Flapping plugin, unless ``active = false``,
    sets the flapping options.  Raise ConfigError for a bad value."""
    defaults: dict[str, Any] = {}
    for section, plugin in plugins:
        if plugin["use"] != FLAPPING_PLUGIN:
            continue
        types = {"active": (BOOL, plugin.get("active", "true"))}
        for key, (option, default) in FLAPPING_PLUGIN_OPTIONS.items():
            types[key] = (WATCHER_OPTIONS[option], plugin.get(key, default))
        try:
            values = {key: kind.from_text(text) for key, (kind, text) in types.items()}
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc), config.source, section) from None
        if values.pop("active"):
            defaults.update((FLAPPING_PLUGIN_OPTIONS[key][0], v) for key, v in values.items())
    return defaults


def _watchdog_plugin(config: Config,
                     plugins: list[tuple[str, dict[str, str]]]) -> tuple[str, float] | None:
    """Take Circus's WatchDog plugin, if there is one: set the UDP address
    (loopback only) and pattern of its heartbeats in ``config``; return its
    watchers' pattern and interval (loop_rate times max_count).  Raise
    ConfigError for an option minisup cannot honour or a bad value."""
    found = [(name, options) for name, options in plugins if options["use"] == WATCHDOG_PLUGIN]
    if not found:
        return None
    section, given = found[-1]
    for key, value in given.items():
        if key not in WATCHDOG_PLUGIN_OPTIONS:
            raise ConfigError("not supported by minisup: its watchdog sends SIGABRT, then "
                              "SIGKILL after the watcher's graceful_timeout", config.source,
                              section, key, value)
    options = {**WATCHDOG_PLUGIN_OPTIONS, **given}
    numbers = {}
    for key, option_type in (("loop_rate", SECONDS), ("max_count", POSITIVE),
                             ("port", _integer(1, 65535))):
        try:
            numbers[key] = option_type.from_text(options[key])
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc), config.source, section, key, options[key]) from None
    problems = _watchdog_pattern_problems(options)
    for key, problem in problems.items():
        raise ConfigError(problem, config.source, section, key, options[key])
    interval = numbers["loop_rate"] * numbers["max_count"]
    port = numbers["port"]
    config.heartbeat_address = (options["ip"], port)
    config.heartbeat_pattern = options["msg_regex"]
    return options["watchers_regex"], interval


def _watchdog_pattern_problems(options: dict[str, str]) -> dict[str, str]:
    """What is wrong with the WatchDog plugin's patterns and address, by
    option: a regex that does not compile, a msg_regex with no ``pid``
    group, an ip that is not loopback (heartbeats come from this host)."""
    import ipaddress  # here, as elsewhere: ctl starts faster
    problems = {}
    for key in ("msg_regex", "watchers_regex"):
        try:
            pattern = re.compile(options[key])
        except re.error as exc:
            problems[key] = f"not a regular expression: {exc}"
            continue
        if key == "msg_regex" and "pid" not in pattern.groupindex:
            problems[key] = "needs a (?P<pid>...) group"
    try:
        if not ipaddress.ip_address(options["ip"]).is_loopback:
            problems["ip"] = "heartbeats come from this host: use a loopback address"
    except ValueError as exc:
        problems["ip"] = str(exc)
    return problems


def _watchdog_defaults(watchdogs: tuple[str, float] | None, name: str) -> dict[str, Any]:
    """The ``watchdog_sec`` the WatchDog plugin gives watcher ``name``, if
    its ``watchers_regex`` matches the name (from the start, as Circus's
    ``re.match``)."""
    if watchdogs is None or not re.match(watchdogs[0], name):
        return {}
    return {"watchdog_sec": watchdogs[1]}


def _ini_watcher_option_type(key: str) -> OptionType | None:
    """The OptionType of ``[watcher:NAME]`` option ``key`` as the INI file
    has it: every watcher option, Circus's ``flapping.NAME`` spelling, and
    the INI-only switches."""
    if key in INI_ONLY_OPTIONS:
        return INI_ONLY_OPTIONS[key]
    return watcher_option_type(FLAPPING_ALIASES.get(key, key))


def _watcher_env(name: str, envs: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """Watcher ``name``'s env: merged from each of ``envs`` (in order) whose
    patterns match its name (``[env]``: every watcher's)."""
    env: dict[str, str] = {}
    for patterns, variables in envs:
        if not patterns or any(fnmatch.fnmatch(name.lower(), p.strip().lower())
                               for p in patterns.split(",")):
            env.update(variables)
    return env


def _fold_circus_options(values: dict[str, Any], section: IniSection,
                         defaults: dict[str, Any], umask: int | None) -> dict[str, Any]:
    """Fold a watcher's Circus-only options into minisup's: ``flapping.NAME``
    is ``flapping_NAME``, ``check_flapping = false`` turns flapping off, the
    plugins' ``defaults`` and the daemon's ``umask`` apply where the watcher
    sets none.  Raise ConfigError for ``on_demand = true`` and any option of
    REFUSED_OPTIONS."""
    for option, text in section.items():
        refused = option in REFUSED_OPTIONS and option != "on_demand"
        if refused or (option == "on_demand" and values.get("on_demand")):
            raise ConfigError(f"not supported by minisup: {REFUSED_OPTIONS[option]}",
                              section.sources[option], section.name, option, text)
    values.pop("on_demand", None)
    folded = {**defaults}
    if umask is not None:
        folded["umask"] = umask
    for key, value in values.items():
        folded[FLAPPING_ALIASES.get(key, key)] = value
    if not folded.pop("check_flapping", True):
        folded["flapping_attempts"] = 0
    return folded


def _read_watcher(config: Config, section: IniSection, envs: list[tuple[str, dict[str, str]]],
                  daemon_env: dict[str, str], defaults: dict[str, Any]) -> WatcherConfig:
    """Read a ``[watcher:NAME]`` section (``$(circus.env.NAME)`` expanded
    from its env, then ``daemon_env``), on top of the plugins' ``defaults``;
    raise ConfigError."""
    name = section.name[len("watcher:"):].strip()
    if not name:
        raise ConfigError("a watcher needs a name", section.source, section.name)
    env = _watcher_env(name, envs)
    values = _read_options(config, section, _ini_watcher_option_type, (env, daemon_env))
    values = _fold_circus_options(values, section, defaults, config.umask)
    try:
        values = gather_prefixed(values)
    except ValueError as exc:
        raise ConfigError(str(exc), section.source, section.name) from None
    if not values.get("cmd"):
        raise ConfigError("cmd is required", section.source, section.name, "cmd", "")
    watcher = WatcherConfig(name=name, env=env, **values)
    check_watcher_values(watcher, section.source)
    _check_hook_modules(watcher, section, os.path.dirname(os.path.abspath(config.source or ".")))
    return watcher


def _check_hook_modules(watcher: WatcherConfig, section: IniSection, folder: str) -> None:
    """Raise ConfigError for a hook whose module is neither on ``sys.path``
    nor in ``folder`` (the config file's), as Circus refuses to load it.
    Runs no module's code: only the top-level name is looked for."""
    import importlib.machinery  # here: only a config with hooks looks
    import importlib.util
    for hook, (name, _) in watcher.hooks.items():
        top = re.split(r"[.:]", name, maxsplit=1)[0]
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue
        if importlib.machinery.PathFinder.find_spec(top, [folder]) is None:
            option = f"hooks.{hook}"
            raise ConfigError(f"no module {top!r} on sys.path or in {folder}",
                              section.sources.get(option), section.name, option, name)


def _no_watcher_reason(sections: list[str]) -> str:
    """Why a file without a ``[watcher:NAME]`` is refused (a daemon with
    nothing to run is a mistake), with a hint for a supervisord file."""
    if any(section.startswith("program:") for section in sections):
        return ("no [watcher:NAME] section; this looks like a supervisord file: "
                "[program:x] is [watcher:x], command is cmd, numprocs is numprocesses")
    return "no [watcher:NAME] section: nothing to run"


def check_dependencies(watchers: Iterable[WatcherConfig]) -> None:
    """Raise ValueError if a ``depends_on`` names no watcher or closes a cycle."""
    import graphlib  # here: only a daemon reads configurations
    graph = {w.name: w.depends_on for w in watchers}
    for name, needed in graph.items():
        for missing in set(needed) - graph.keys():
            raise ValueError(f"[watcher:{name}]: depends_on names {missing!r}, not a watcher")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise ValueError("depends_on makes a cycle: " + " -> ".join(exc.args[1])) from None


SOCKET_REFERENCE = re.compile(r"\$\(circus\.sockets\.([\w-]+)\)", re.IGNORECASE)


def _check_socket_names(config: Config) -> None:
    """Raise ConfigError if a watcher's ``stdin_socket``, or a socket its
    command refers to, names no ``[socket:NAME]``."""
    names = {s.name for s in config.sockets}
    for watcher in config.watchers:
        stdin = set()
        if watcher.stdin_socket:
            stdin.add(watcher.stdin_socket.lower())
        for key, wanted in (("stdin_socket", stdin), ("cmd", socket_users(watcher))):
            for name in wanted - names:
                raise ConfigError(f"no [socket:{name}] section", config.source,
                                  f"watcher:{watcher.name}", key, getattr(watcher, key))


def expand_vars(text: str, environ: dict[str, str]) -> str:
    """Replace ``$VAR`` and ``${VAR}`` from ``environ`` (unknown: empty)."""
    def value_of(match: re.Match[str]) -> str:
        """The value of the variable ``match`` names ("" if unknown)."""
        name = match.group(1) or match.group(2)  # ${VAR} or $VAR
        return environ.get(name, "")
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value_of, text)


def watcher_config_from_json(name: Any, cmd: Any, args: Any, options: Any) -> WatcherConfig:
    """Build a WatcherConfig from ``add`` properties; raise ConfigError (a
    MessageError) in the INI's format.  Types are strict, as in Circus:
    ``"3"`` is not an integer."""
    if options is not None and not isinstance(options, dict):
        raise MessageError("'options' must be an object")
    given = {}
    if options is not None:
        given.update(options)
    given["cmd"] = cmd
    if args is not None:
        given["args"] = args
    values = {key: check_json_option(name, key, value) for key, value in given.items()}
    if not values["cmd"].strip():
        raise ConfigError("must not be empty", section=f"watcher:{name}", option="cmd", value=cmd)
    try:
        config = WatcherConfig(name=name, **gather_prefixed(values))
    except ValueError as exc:
        raise ConfigError(str(exc), section=f"watcher:{name}") from None
    check_watcher_values(config)
    return config


def check_json_option(name: str, key: str, value: Any) -> Any:
    """Check and convert one option of watcher ``name`` sent as JSON (by
    ``add`` or ``set``); raise ConfigError naming it."""
    option_type = watcher_option_type(key)
    section = f"watcher:{name}"
    if option_type is None:
        raise ConfigError(f"unknown option {key!r}", section=section)
    try:
        return option_type.from_json(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), section=section, option=key, value=value) from None


def check_watcher_values(config: WatcherConfig, source: str | None = None) -> None:
    """Raise ConfigError for what would otherwise fail only at each spawn: a
    NUL byte in a command, a name or a path; an env name with '='; a ``cmd``
    with an open quote; a log file in a folder that does not exist."""
    section = f"watcher:{config.name}"
    texts = {"cmd": [config.cmd], "args": config.args, "shell_args": config.shell_args,
             "executable": [config.executable or ""], "working_dir": [config.working_dir or ""],
             "env": [*config.env, *config.env.values()], "ready": [config.ready or ""]}
    for option, values in texts.items():
        for value in values:
            if "\0" in value:
                raise ConfigError("must not hold a NUL byte", source, section, option, value)
    for hook in config.hooks:
        if hook not in HOOK_NAMES:
            raise ConfigError(f"no such hook: use one of {', '.join(HOOK_NAMES)}",
                              source, section, f"hooks.{hook}", config.hooks[hook][0])
    for variable in config.env:
        if not variable or "=" in variable:
            raise ConfigError("a variable's name is not empty and holds no '='",
                              source, section, "env", variable)
    if not config.shell:
        try:
            shlex.split(config.cmd)
        except ValueError as exc:  # "No closing quotation", say
            raise ConfigError(str(exc), source, section, "cmd", config.cmd) from None
    for stream in ("stdout_stream", "stderr_stream"):
        filename = getattr(config, stream).get("filename")
        folder = os.path.dirname(os.path.abspath(filename or "."))
        if filename and not os.path.isdir(folder):
            raise ConfigError(f"no folder {folder}", source, section,
                              f"{stream}.filename", filename)


def socket_users(config: WatcherConfig) -> set[str]:
    """The names (in lower case) of the sockets that watcher ``config``'s
    cmd and args refer to as ``$(circus.sockets.NAME)``; pure."""
    return {n.lower() for text in [config.cmd, *config.args]
            for n in SOCKET_REFERENCE.findall(text)}




# ============================================================= Process ======

def child_env(config: WatcherConfig, values: dict[str, str]) -> dict[str, str]:
    """The environment of one child: only the configured variables unless
    ``copy_env``, as in Circus."""
    base: dict[str, str] = {}
    if config.copy_env:
        base = dict(os.environ)
    env = dict(base)
    for name, value in config.env.items():
        env[name] = substitute(value, values, base, os.environ)
    if config.copy_path:  # Circus: the daemon's sys.path as PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def child_argv(config: WatcherConfig, values: dict[str, str], env: dict[str, str]) -> list[str]:
    """The command line of one child.  Under a shell, the first item is
    the script and ``shell_args`` become its ``$0 $1 ...``."""
    cmd = substitute(config.cmd, values, env, os.environ)
    args = [substitute(a, values, env, os.environ) for a in config.args]
    if config.shell:
        script = " ".join([cmd, *map(shlex.quote, args)])
        return [script, *(substitute(a, values, env, os.environ) for a in config.shell_args)]
    return shlex.split(cmd) + args


def user_options(config: WatcherConfig) -> dict[str, Any]:
    """Popen's user/group/extra_groups for ``uid``/``gid`` (None: unchanged)."""
    if config.uid is None:
        return {"group": config.gid}
    entry = pwd.getpwuid(config.uid)
    group = config.gid
    if group is None:  # the user's own group, as login would give
        group = entry.pw_gid
    extra = None  # setgroups needs root: anyone else keeps the daemon's groups
    if os.geteuid() == 0:
        extra = os.getgrouplist(entry.pw_name, group)
    return {"user": config.uid, "group": group, "extra_groups": extra}


#: linux/capability.h: the capability to raise a hard limit.
CAP_SYS_RESOURCE = 24
#: linux/capability.h: with CAP_SYS_RESOURCE, what frees pipes from the
#: per-user budget (see may_enlarge_pipes).
CAP_SYS_ADMIN = 21


def has_capability(bit: int) -> bool:
    """Whether this process holds capability ``bit`` (CapEff in
    /proc/self/status).  Any thread; never raises: True when it cannot be
    read, so the kernel decides rather than a guess of ours."""
    try:
        with open("/proc/self/status") as stream:
            fields = dict(line.split(":", 1) for line in stream if ":" in line)
        return bool(int(fields["CapEff"], 16) >> bit & 1)
    except (OSError, KeyError, ValueError):
        return True


def _above(limit: int, hard: int) -> bool:
    """Whether rlimit ``limit`` is above ``hard``, RLIM_INFINITY being the most."""
    if hard == resource.RLIM_INFINITY:
        return False
    return limit == resource.RLIM_INFINITY or limit > hard


def resolve_rlimits(config: WatcherConfig) -> list[tuple[int, int]]:
    """``config``'s ``rlimit_NAME`` options as (resource, limit) pairs, empty
    meaning RLIM_INFINITY, for spawn_process.  Raise ConfigError for a limit
    above the daemon's hard one when it lacks CAP_SYS_RESOURCE: neither
    prlimit nor setrlimit could raise it, so no child should start."""
    limits = []
    for name, value in config.rlimits.items():
        which = getattr(resource, f"RLIMIT_{name.upper()}")
        limit = value
        shown = value  # as the error shows the value
        if value is None:  # an empty option: no limit
            limit = resource.RLIM_INFINITY
            shown = "unlimited"
        hard = resource.getrlimit(which)[1]
        if _above(limit, hard) and not has_capability(CAP_SYS_RESOURCE):
            raise ConfigError(f"above the daemon's hard limit ({hard}); raising a hard limit "
                              "needs CAP_SYS_RESOURCE, which the daemon lacks",
                              option=f"rlimit_{name}", value=shown)
        limits.append((which, limit))
    return limits


#: The soft RLIMIT_NOFILE this process had before the first Daemon raised
#: it (see raise_fd_limit): what each child gets.  Written once, by the
#: main thread of the first Daemon to start; read by the workers.
FD_LIMIT_BEFORE: list[int] = []


def raise_fd_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as systemd
    and nginx do for a daemon that holds an fd or more per child, noting in
    FD_LIMIT_BEFORE the soft limit it had (children keep that: a program
    that still uses select() must not see 500,000).  Main thread, by
    Daemon.start; never raises: a limit that cannot move stays as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not FD_LIMIT_BEFORE:
        FD_LIMIT_BEFORE.append(soft)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit past nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def uses_helper(config: WatcherConfig) -> bool:
    """Whether ``config``'s children start through the exec helper: limits
    with other ids, which prlimit could set only with CAP_SYS_RESOURCE."""
    return bool(config.rlimits) and (config.uid is not None or config.gid is not None)


def program_argv(config: WatcherConfig, argv: list[str]) -> tuple[str, list[str]]:
    """The program Popen would execute for ``argv`` (child_argv's) and the
    argv it would give it: ``shell`` runs ``/bin/sh -c`` (or ``executable``)
    with the script and its ``$0 $1 ...``.  Raise ValueError if empty."""
    if config.shell:
        argv = [config.executable or "/bin/sh", "-c", *argv]
    if not argv:
        raise ValueError("empty command line")
    return config.executable or argv[0], argv


def _exec_problem(path: str) -> int | None:
    """The errno execve would fail with for ``path`` as this process sees
    it (EACCES: not an executable file), or None if it looks runnable."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.errno
    if stat.S_ISREG(mode) and os.access(path, os.X_OK):
        return None
    return errno.EACCES


def find_program(name: str, env: dict[str, str], cwd: str | None) -> str:
    """The path Popen would run ``name`` from: as given if it has a slash,
    else the first runnable one along ``env``'s PATH (os.defpath without
    one); relative paths count from ``cwd``.  Raise as Popen would: the
    first error other than a missing file (PermissionError), or
    FileNotFoundError."""
    candidates = [name]
    if not os.path.dirname(name):
        candidates = [os.path.join(folder, name) for folder in os.get_exec_path(env)]
    first_problem = None  # what execvpe would report: the first error but a missing file
    for path in candidates:
        problem = _exec_problem(os.path.join(cwd or "", path))
        if problem is None:
            return path
        if first_problem is None and problem not in (errno.ENOENT, errno.ENOTDIR):
            first_problem = problem
    code = first_problem
    if code is None:
        code = errno.ENOENT
    raise OSError(code, os.strerror(code), name)  # OSError picks the subclass by code


#: The exec helper (see helper_argv), run as ``python -I -S -c`` by the
#: daemon's user: -I keeps the working directory and PYTHON* variables out
#: of it.  Its arguments: the limits (WHICH=LIMIT ...), the groups, gid and
#: uid ("-": unchanged), the fd of the program's environment (see
#: environment_fd), the program's path, then its argv.  No json nor signal:
#: their imports would double its start.
HELPER_CODE = """import os, resource, sys
try:
    import _signal as signal
except ImportError:
    import signal
try:
    fd = int(sys.argv[5])
    items = os.pread(fd, os.fstat(fd).st_size, 0).split(b"\\0")[:-1]
    os.close(fd)  # the program must not inherit it
    env = dict(item.split(b"=", 1) for item in items)
    for item in sys.argv[1].split():  # still the daemon's user: lowering is allowed
        which, limit = item.split("=")
        resource.setrlimit(int(which), (int(limit), int(limit)))
    if sys.argv[2] != "-":
        os.setgroups([int(group) for group in sys.argv[2].split()])
    if sys.argv[3] != "-":
        gid = int(sys.argv[3])
        os.setresgid(gid, gid, gid)
    if sys.argv[4] != "-":
        uid = int(sys.argv[4])
        os.setresuid(uid, uid, uid)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignored them; exec would keep that
        signal.signal(signum, signal.SIG_DFL)
    os.execve(sys.argv[6], sys.argv[7:], env)
except Exception as exc:
    os.write(2, f"minisup: cannot run {sys.argv[6]}: {exc}\\n".encode(errors="surrogateescape"))
os._exit(127)"""


def _id_text(ids: int | list[int] | None) -> str:
    """An id (or list of ids) as the exec helper reads it; "-": unchanged."""
    if ids is None:
        return "-"
    if isinstance(ids, int):
        return str(ids)
    return " ".join(map(str, ids))


def environment_fd(env: dict[str, str]) -> int:
    """A new memfd (close-on-exec) holding ``env`` as execve takes it,
    ``NAME=VALUE\\0`` each, for the exec helper; the caller closes it.  Not
    in the helper's arguments: ps and audit logs show those to anyone.
    Raise ValueError for an environment Popen would refuse."""
    items = []
    for name, value in env.items():
        key = os.fsencode(name)
        if not key or b"=" in key:  # the helper's os.execve refuses an empty one too
            raise ValueError("illegal environment variable name")
        items.append(key + b"=" + os.fsencode(value) + b"\0")
    data = b"".join(items)
    if data.count(b"\0") != len(items):
        raise ValueError("embedded null byte")
    fd = os.memfd_create("minisup-env", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as stream:
            stream.write(data)  # a buffered writer writes it all, or raises
    except BaseException:
        os.close(fd)
        raise
    return fd


def helper_argv(config: WatcherConfig, argv: list[str], env: dict[str, str],
                limits: list[tuple[int, int]], env_fd: int) -> list[str]:
    """The exec helper's command line that sets ``limits``, takes
    ``config``'s ids as Popen's user/group/extra_groups would, then execs
    ``argv`` (child_argv's) with the environment in ``env_fd``
    (environment_fd's; ``env`` is its PATH); for spawn_process.  Raise
    FileNotFoundError or PermissionError for a program Popen could not
    run, MinisupError without a Python executable."""
    if not sys.executable:
        raise MinisupError("rlimit_NAME with uid or gid needs a Python executable to run "
                           "minisup's exec helper, and sys.executable is empty")
    executable, program = program_argv(config, argv)
    path = find_program(executable, env, config.working_dir)
    ids = user_options(config)
    limit_items = " ".join(f"{which}={limit}" for which, limit in limits)
    return [sys.executable, "-I", "-S", "-c", HELPER_CODE, limit_items,
            _id_text(ids.get("extra_groups")), _id_text(ids.get("group")),
            _id_text(ids.get("user")), str(env_fd), path, *program]


def kill_pids(pids: Iterable[int], signum: int) -> None:
    """Signal pids that are not our children (read from /proc); such a pid
    could be reused between reading /proc and kill(), a risk every
    /proc-walking supervisor (Circus included) takes."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


class Process:
    """One child process, owned by the worker thread, which alone reaps it;
    ``stop_deadline`` is set once it was told to stop, ``killed`` on SIGKILL."""

    def __init__(self, popen: subprocess.Popen, wid: int, started: float,
                 expires: float | None = None, pipes: dict[str, int] | None = None) -> None:
        """Wrap ``popen``, just started by spawn_process on the worker
        thread; open its pidfd where the kernel has them."""
        self.popen = popen
        self.pid = popen.pid
        self.wid = wid  # its slot in the watcher: $(circus.wid)
        self.started = started  # the arbiter's clock: for uptime and min_uptime
        if pipes is None:
            pipes = {}
        self.pipes = pipes  # read ends, handed to the output thread
        self.expires = expires  # max_age: when to replace it
        self.started_at = time.time()  # wall clock, for stats and status
        self.watched = False  # its pidfd is in the worker's selector
        self.draining = False  # the output thread is emptying its pipes
        self.stop_deadline: float | None = None
        self.killed = False
        self.pidfd: int | None = None
        self.ready = True  # False until its ``ready`` check passes: Watcher._check_ready
        self.ready_by = 0.0  # when that check gives up on it
        self.watchdog_sec = 0.0  # its watchdog interval (WATCHDOG_USEC= may change it)
        self.watchdog_at: float | None = None  # when its watchdog runs out, once armed
        self.stop_reason: str | None = None  # why minisup stopped it, if a failure
        self.death_seen: float | None = None  # time.monotonic() when its exit was seen
        self.cpu_sample: tuple[float, float] | None = None  # (CPU s, monotonic) at the last stats
        self.cgroup: str | None = None  # its own cgroup's folder (cgroup mode)
        self.cgroup_empty = False  # that folder was empty as it died: see CgroupTree.discard
        self.with_watcher = False  # leftovers and cgroup dealt with at its watcher's stop end
        if HAS_PIDFD:  # a zombie has one too: a child already dead reads as exited
            with contextlib.suppress(OSError):  # old kernel: the worker polls instead
                self.pidfd = os.pidfd_open(self.pid)

    @property
    def stopping(self) -> bool:
        """Whether it was told to stop (it has a ``stop_deadline``)."""
        return self.stop_deadline is not None

    def send_signal(self, signum: int, group: bool = False) -> None:
        """Signal the child (or its process group) unless it was reaped.  No
        pid reuse: only the worker reaps it, and only the worker signals it."""
        if self.popen.returncode is None:
            # Refused if it exited (a zombie group) or setuid'd away from us.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:  # it leads its group (process_group=0): the group id is its pid
                    os.killpg(self.pid, signum)
                else:
                    os.kill(self.pid, signum)

    def kill(self, descendants: Iterable[int] = ()) -> None:
        """Send SIGKILL (as Popen.kill does) to the child's whole process
        group and to ``descendants`` (which may have left the group), so no
        helper lingers; on the worker thread, never blocks nor raises."""
        self.killed = True
        self.send_signal(signal.SIGKILL, group=True)
        kill_pids(descendants, signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd; called once the child has been reaped."""
        fd, self.pidfd = self.pidfd, None
        close_fds([fd])


def launch_child(config: WatcherConfig, wid: int,
                 sockets: dict[str, socket.socket] | None = None,
                 capture: bool = False, extra_env: dict[str, str] | None = None,
                 birthplace: contextlib.AbstractContextManager | None = None,
                 ) -> tuple[subprocess.Popen, dict[str, int]]:
    """Start one child of ``config`` for spawn_process (on the Spawner's
    thread, or the worker's): its Popen and the read ends of its output
    pipes, by stream.  Blocks only until Popen's exec; raise if it cannot
    start, leaving nothing running.  No Python runs between fork and exec
    (the exec helper runs after one), so Popen keeps its vfork path (a
    ``uid`` costs it); each child leads its group, out of reach of the
    terminal's Ctrl-C.  ``birthplace`` is entered around the fork: a child
    born in its cgroup (see Cgroups)."""
    if birthplace is None:
        birthplace = contextlib.nullcontext()
    if sockets is None:
        sockets = {}
    values = _circus_values(wid, sockets)
    env = child_env(config, values)
    if extra_env:
        env.update(extra_env)
    limits = resolve_rlimits(config)  # before any child starts: one we cannot set is an error
    helper = uses_helper(config)
    inherited = _inherited_fds(config, sockets)
    stdin = _stdin_target(config, sockets)
    outputs: dict[str, tuple[int | None, int | None]] = {}  # (our read end, the child's fd)
    popen = None
    env_fd = None  # the program's environment, for the exec helper
    try:
        for stream in ("stdout", "stderr"):
            outputs[stream] = _output_target(config, stream, capture)
        if helper:  # which reads the program's environment from this fd
            env_fd = environment_fd(env)
            inherited.append(env_fd)
        launch = _launch(config, child_argv(config, values, env), env, limits, env_fd)
        with birthplace:
            popen = subprocess.Popen(**launch, cwd=config.working_dir or None, process_group=0,
                                     stdin=stdin, stdout=outputs["stdout"][1],
                                     stderr=outputs["stderr"][1], pass_fds=sorted(inherited),
                                     umask=_child_umask(config))
        _limit_child(popen.pid, config, limits, helper)
    except BaseException:
        close_fds(read_end for read_end, _ in outputs.values())
        if popen is not None:  # never leave a child running without its limits
            kill_failed_spawn(popen)
        raise
    finally:  # the child has the write ends and the environment; we keep the read ends
        close_fds([env_fd, *(write for read, write in outputs.values() if read is not None)])
    pipes = {stream: read for stream, (read, _) in outputs.items() if read is not None}
    return popen, pipes


def spawn_process(config: WatcherConfig, wid: int, now: float,
                  sockets: dict[str, socket.socket] | None = None,
                  capture: bool = False, extra_env: dict[str, str] | None = None,
                  birthplace: contextlib.AbstractContextManager | None = None,
                  spawner: Spawner | None = None) -> Process:
    """Start one child of ``config`` (see launch_child) on the worker
    thread, through ``spawner`` if there is one, and wrap it as a Process;
    raise if it cannot start, leaving nothing running."""
    if spawner is None:
        popen, pipes = launch_child(config, wid, sockets, capture, extra_env, birthplace)
    else:
        popen, pipes = spawner.launch(config, wid, sockets, capture, extra_env, birthplace)
    return Process(popen, wid, now, _expiry(config, now), pipes)


def _circus_values(wid: int, sockets: dict[str, socket.socket]) -> dict[str, str]:
    """The ``$(circus.KEY)`` values of one child, for substitute: its
    ``wid``, and ``sockets.NAME`` the fd of each socket."""
    fds = {f"sockets.{name}": str(sock.fileno()) for name, sock in sockets.items()}
    return {"wid": str(wid), **fds}


def _limit_child(pid: int, config: WatcherConfig, limits: list[tuple[int, int]],
                 helper: bool) -> None:
    """Set a new child's limits, for spawn_process, just after exec (the
    program's first instructions run under ours): ``limits``
    (resolve_rlimits'), unless the exec helper has set them; and unless
    ``rlimit_nofile`` says, the soft fd limit the daemon had before it
    raised its own (see raise_fd_limit).  Without a helper the child has
    our ids, so prlimit needs no capability.  Raise OSError (the caller
    then kills the child)."""
    if not helper:
        for which, limit in limits:
            resource.prlimit(pid, which, (limit, limit))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if FD_LIMIT_BEFORE and FD_LIMIT_BEFORE[0] < soft and "nofile" not in config.rlimits:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT_BEFORE[0], hard))


def _inherited_fds(config: WatcherConfig, sockets: dict[str, socket.socket]) -> list[int]:
    """The only fds a child of ``config`` inherits (besides 0-2): the
    sockets its command names, or all of them with ``use_sockets``."""
    if config.use_sockets:
        named = set(sockets)
    else:
        named = socket_users(config)
    return [sock.fileno() for name, sock in sockets.items() if name in named]


def _stdin_target(config: WatcherConfig, sockets: dict[str, socket.socket]) -> int | None:
    """Popen's ``stdin`` for a child of ``config``, for spawn_process: the
    fd of its ``stdin_socket``, else /dev/null with ``close_child_stdin``,
    else the daemon's own (None)."""
    if config.stdin_socket:
        fd = sockets[config.stdin_socket.lower()].fileno()
        if fd:  # NB: a socket on fd 0 counts as none, and falls through
            return fd
    if config.close_child_stdin:
        return subprocess.DEVNULL
    return None


def _child_umask(config: WatcherConfig) -> int:
    """Popen's ``umask`` for a child of ``config``: -1 keeps the daemon's."""
    if config.umask is None:
        return -1
    return config.umask


def _expiry(config: WatcherConfig, now: float) -> float | None:
    """When a child of ``config`` started at ``now`` is to be replaced
    (None: never): its ``max_age`` plus a random share of the variance,
    so that children started together end apart."""
    if not config.max_age:
        return None
    return now + config.max_age + _RANDOM.uniform(0, config.max_age_variance)


def kill_failed_spawn(popen: subprocess.Popen) -> None:
    """SIGKILL a child whose spawn failed after it started, with its whole
    process group, then reap it.  For spawn_process; blocks only until the
    kernel has the leader dead."""
    # The group, not the child alone: a shell may have forked helpers by now,
    # and they would outlive it.  The child leads its group (process_group=0)
    # and is not reaped yet, so the group id cannot have been reused, and the
    # group exists (a zombie leader counts): no ProcessLookupError to expect.
    os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()  # SIGKILLed: returns at once


def _launch(config: WatcherConfig, argv: list[str], env: dict[str, str],
            limits: list[tuple[int, int]], env_fd: int | None) -> dict[str, Any]:
    """Popen's program, environment and ids for one child of spawn_process:
    the child itself, or with ``env_fd`` (environment_fd's) the exec helper
    that becomes it.  Raise as helper_argv does."""
    if env_fd is not None:
        # The helper's own environment is empty: the program's comes from
        # env_fd, so nothing Python's startup sets (LC_CTYPE) can leak.
        return {"args": helper_argv(config, argv, env, limits, env_fd), "env": {}}
    return {"args": argv, "shell": config.shell, "executable": config.executable, "env": env,
            **user_options(config)}


@functools.cache
def may_enlarge_pipes() -> bool:
    """Whether capture pipes may grow to READ_SIZE: only where the kernel
    does not count them against the user's pipe budget
    (``fs.pipe-user-pages-soft``, 64 MiB by default), that is with
    CAP_SYS_RESOURCE or CAP_SYS_ADMIN.  Past that budget every new pipe
    of the user, other programs' too, gets 8 KiB: a container's root
    without them keeps the kernel's default 64 KiB.  Read once; any thread."""
    return has_capability(CAP_SYS_RESOURCE) or has_capability(CAP_SYS_ADMIN)


def _output_target(config: WatcherConfig, stream: str,
                   capture: bool) -> tuple[int | None, int | None]:
    """(our read end, the child's fd) for a child's ``stream`` ("stdout" or
    "stderr"), for spawn_process: a pipe when ``capture`` and the watcher
    has a sink for it, /dev/null with ``close_child_STREAM``, else the
    daemon's own (None, None).  Raise OSError if no pipe can be made."""
    if getattr(config, f"close_child_{stream}"):
        return None, subprocess.DEVNULL
    if capture and getattr(config, f"{stream}_stream"):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_end, False)
        if may_enlarge_pipes():
            with contextlib.suppress(OSError):  # bigger pipes: fewer, larger reads
                fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, READ_SIZE)
        return read_end, write_end
    return None, None


def bind_socket(config: SocketConfig) -> socket.socket:
    """Bind (and for streams, listen on) one ``[socket:NAME]``; raise OSError."""
    sock = socket.socket(getattr(socket, config.family.upper()),
                         getattr(socket, config.type.upper()))
    try:
        if config.family == "af_unix":
            if config.replace and os.path.exists(config.path):
                os.unlink(config.path)
            sock.bind(config.path)
            # Not os.umask: it is process-wide, and others may be spawning.
            os.chmod(config.path, 0o777 & ~(config.umask or 0))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.so_reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, config.port))
        if config.type == "sock_stream":
            sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# -- /proc readers for stats and signal (Circus uses psutil; we need none) --

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 is [0])."""
    with open(f"/proc/{pid}/stat", "rb") as stream:
        text = stream.read()
    return text[text.rindex(b")") + 2:].decode().split()


def children_of(pid: int | str = "self") -> set[int]:
    """Pids whose parent is ``pid`` (default: this process), from each of
    its threads' ``children`` file: no walk over all of /proc."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(map(int, f.read().split()))
    return found


def children_map() -> dict[int, list[int]]:
    """Every process's direct children, from one pass over /proc."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
            if entry.isdigit():
                found.setdefault(int(read_stat(int(entry))[1]), []).append(int(entry))
    return found


def descendants(pid: int, children: dict[int, list[int]], recursive: bool = True) -> list[int]:
    """Children of ``pid`` (and theirs, with ``recursive``), nearest first."""
    found = list(children.get(pid, []))
    if recursive:
        for child in found:  # grows as it goes: each grandchild is visited in turn
            found.extend(children.get(child, []))
    return found


@functools.cache  # both fixed until the next boot
def _boot_time_and_memory() -> tuple[float, int]:
    """The boot time (epoch seconds) and the total memory (bytes), for
    process_stats; read once, raise OSError if /proc cannot be read."""
    with open("/proc/stat") as stream:
        boot = float(next(line for line in stream if line.startswith("btime")).split()[1])
    with open("/proc/meminfo") as stream:
        return boot, int(stream.readline().split()[1]) * 1024


def human_bytes(count: int) -> str:
    """Bytes as Circus shows them: ``512B``, ``12.34M``."""
    power = min(8, max(0, count.bit_length() - 1) // 10)  # of 1024: K is 1, Y is 8
    if not power:
        return f"{count}B"
    return f"{count / (1 << 10 * power):.2f}{' KMGTPEZY'[power]}"


def _cpu_time_text(seconds: float) -> str:
    """CPU time as Circus's ``ctime`` shows it, ``m:ss.hh``: cut, not rounded."""
    hundredths = int(seconds * 100)
    return f"{hundredths // 6000}:{hundredths // 100 % 60:02d}.{hundredths % 100:02d}"


def _user_name(uid: int) -> str:
    """The name of ``uid``, or its number if it has none; for process_stats."""
    with contextlib.suppress(KeyError):  # a uid with no passwd entry
        return pwd.getpwuid(uid).pw_name
    return str(uid)


def process_stats(pid: int, children: bool = False) -> dict[str, Any] | str:
    """Circus's ``stats`` info for one pid, read from /proc (``cpu`` is the
    average over its life; ``command`` the whole command line, ``cmdline``
    its program's name as Circus has it); with ``children``, its children's too."""
    try:
        fields = read_stat(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            words = stream.read().rstrip(b"\0").split(b"\0")
        cmdline = words[0].decode(errors="replace")
        uid = os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError):
        return "No such process (stopped?)"
    cpu_seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    boot_time, memory = _boot_time_and_memory()
    created = boot_time + int(fields[19]) / CLOCK_TICKS  # starttime: ticks after boot
    age = max(time.time() - created, 1e-9)  # never 0: cpu divides by it
    rss = int(fields[21]) * PAGE_SIZE  # rss is in pages
    virtual_size = int(fields[20])  # vsize is in bytes
    child_stats: list[dict[str, Any] | str] = []
    if children:
        child_stats = [process_stats(child) for child in sorted(children_of(pid))]
    return {
        "pid": pid, "cpu": round(100 * cpu_seconds / age, 1), "nice": int(fields[16]),
        "mem": round(100 * rss / memory, 3), "mem_info1": human_bytes(rss),
        "mem_info2": human_bytes(virtual_size), "ctime": _cpu_time_text(cpu_seconds),
        "username": _user_name(uid), "create_time": created, "age": age,
        "cpu_seconds": cpu_seconds, "cmdline": os.path.basename(cmdline) or "N/A",
        "command": shlex.join(w.decode(errors="replace") for w in words),
        "children": child_stats}


#: unshare(2)'s flag for a private copy of the fd table (<sched.h>).
CLONE_FILES = 0x400
#: How often (s) the worker, waiting for a spawn, checks the spawner lives.
SPAWNER_CHECK = 1.0


def unshare_fd_table() -> bool:
    """Give the calling thread a private copy of this process's fd table
    (unshare(CLONE_FILES)), for the Spawner's thread; False where libc or
    the kernel refuse."""
    import ctypes  # here: a ctl never needs it
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_FILES) == 0
    except (OSError, AttributeError):
        return False


def _stdio_files() -> list[tuple[int, int] | None]:
    """Which file each of fds 0-2 is in this process's (shared) table, as
    (device, inode), None where it is closed: what the Spawner's copies
    must match.  On the worker, for Spawner.launch."""
    files: list[tuple[int, int] | None] = []
    for fd in (0, 1, 2):
        try:
            info = os.fstat(fd)
        except OSError:
            files.append(None)
            continue
        files.append((info.st_dev, info.st_ino))
    return files


#: The most fds one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253


class GcHold:
    """Holds the garbage collector off while any Spawner runs Python: a
    finalizer of another thread's object run there would close or write an
    fd of the spawner's own table, not the one it meant.  One per process,
    ``GC_HOLD``, shared on purpose by every Daemon's spawner thread: its
    lock (one of the module's three) keeps the count and gc's state together, and
    gc is enabled again only if it was when the first hold began."""

    def __init__(self) -> None:
        """No hold yet: made once, at import."""
        self._lock = threading.Lock()
        self._holds = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep gc off for the with-block; any thread, never blocks long."""
        with self._lock:
            if not self._holds:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if not self._holds and self._was_enabled:
                    gc.enable()


GC_HOLD = GcHold()


class Spawner:
    """Forks a Daemon's children from a thread of its own whose fd table
    is a private copy holding almost nothing.  A fork copies the forking
    thread's fd table and the child's exec closes every fd in it, so a
    worker that holds a pidfd and pipes per child would pay for all its
    children at each spawn: starting 10,000 took twice as long per child
    at the end as at the start.  The worker calls ``launch`` and blocks
    until it returns, as it blocked on the fork itself; this thread owns
    nothing but its table.  The fds a child inherits (stdio, its sockets)
    cross over a socketpair (SCM_RIGHTS) and take the numbers they have in
    the daemon's table, so ``$(circus.sockets.NAME)`` and ``listsockets``
    agree; its pipes' read ends cross back.  The fds go before the call
    that needs them, so a failed send never leaves the two out of step.
    Garbage collection is held off while this thread runs Python (GC_HOLD)."""

    def __init__(self) -> None:
        """Start the thread and wait until its table is its own; raise
        OSError if it cannot be (then the worker forks itself).  By the
        Daemon on the main thread, before the worker runs."""
        self._calls: queue.SimpleQueue[tuple[list[int], list[int], tuple[Any, ...]] | None]
        self._calls = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stdio: list[tuple[int, int] | None] = []  # the daemon's, as last sent
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._thread = threading.Thread(target=self._run, name="minisup-spawner", daemon=True)
        self._thread.start()
        if not self._results.get():
            self.close()
            raise OSError(errno.ENOSYS, "no private fd table (unshare CLONE_FILES)")

    def launch(self, config: WatcherConfig, wid: int, sockets: dict[str, socket.socket] | None,
               capture: bool, extra_env: dict[str, str] | None,
               birthplace: contextlib.AbstractContextManager | None,
               ) -> tuple[subprocess.Popen, dict[str, int]]:
        """launch_child on the spawner's thread, for the worker thread,
        which it blocks until the child has exec'd; the pipes come back as
        fds of the daemon's table.  Raise what launch_child raises, or
        OSError if the fds cannot cross (the child, if any, is killed).
        More fds than one message carries, or a spawner thread gone: the
        worker forks itself."""
        args = (config, wid, sockets, capture, extra_env, birthplace)
        needed = self._sockets_needed(config, sockets or {})
        stdio = _stdio_files()
        if stdio != self._stdio:  # the daemon's stdio changed (or this is the first)
            needed = sorted({*needed, *(fd for fd, file in enumerate(stdio) if file)})
        if len(needed) > MAX_FDS_PER_MESSAGE or not self._thread.is_alive():
            return launch_child(*args)
        self._stdio = []  # until the spawner has placed them: sent again if it fails
        if needed:
            socket.send_fds(self._ours, [b"f"], needed)  # before the call: see the class
        closed = [fd for fd, file in enumerate(stdio) if file is None]
        self._calls.put((needed, closed, args))
        outcome = self._outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        self._stdio = stdio
        popen, streams = outcome
        if not streams:
            return popen, {}
        return popen, dict(zip(streams, self._receive_pipes(popen, len(streams))))

    @staticmethod
    def _sockets_needed(config: WatcherConfig, sockets: dict[str, socket.socket]) -> list[int]:
        """The daemon's fds of the sockets a child of ``config`` inherits."""
        needed = _inherited_fds(config, sockets)
        if config.stdin_socket and config.stdin_socket.lower() in sockets:
            needed.append(sockets[config.stdin_socket.lower()].fileno())
        return sorted(set(needed))

    def _outcome(self) -> Any:
        """The spawner's answer to the call just queued; on the worker,
        blocking until it comes, or raising OSError if the thread died."""
        while True:
            with contextlib.suppress(queue.Empty):
                return self._results.get(timeout=SPAWNER_CHECK)
            if not self._thread.is_alive():
                raise OSError(errno.ECHILD, "the spawner thread is gone")

    def _receive_pipes(self, popen: subprocess.Popen, count: int) -> list[int]:
        """The read ends of a new child's ``count`` pipes, as fds of the
        daemon's table, close-on-exec; on the worker.  If they do not all
        arrive (no fd left here), kill the child and raise OSError."""
        try:
            fds, flags = socket.recv_fds(self._ours, 1, count)[1:3]  # fds, flags
        except OSError:
            kill_failed_spawn(popen)
            raise
        for fd in fds:
            os.set_inheritable(fd, False)  # recv_fds takes no MSG_CMSG_CLOEXEC
        if len(fds) < count or flags & socket.MSG_CTRUNC:
            close_fds(fds)
            kill_failed_spawn(popen)
            raise OSError(errno.EMFILE, "Too many open files (a child's output pipes)")
        return fds

    def close(self) -> None:
        """End the thread (its table, and every fd in it, goes with it) and
        close the socketpair; by the Daemon once the worker has ended."""
        self._calls.put(None)
        self._thread.join()
        self._ours.close()
        self._theirs.close()

    def _run(self) -> None:
        """The spawner thread: make its table private and empty, then run
        each call the worker queues, until a None.  Never raises: a failure
        is the call's answer."""
        with GC_HOLD.held():
            private = unshare_fd_table()
            if private:  # keep 0-2 and our end: every other fd here is a copy
                keep = self._theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        self._results.put(private)
        if not private:
            return
        while (call := self._calls.get()) is not None:
            with GC_HOLD.held():
                try:
                    outcome = self._launch_here(*call)
                except BaseException as exc:  # noqa: BLE001 - raised by launch, on the worker
                    outcome = exc
            self._results.put(outcome)

    def _launch_here(self, needed: list[int], closed: list[int], args: tuple[Any, ...]) -> Any:
        """On the spawner's thread: place the fds the worker sent under the
        numbers in ``needed`` (and close the std ones in ``closed``),
        launch_child(*args), send the read ends of its pipes back; return
        (popen, their streams) or the exception."""
        try:
            self._place(needed, closed)
            popen, pipes = launch_child(*args)
        except BaseException as exc:  # noqa: BLE001 - raised by launch, on the worker
            return exc
        finally:
            for fd in needed:
                if fd > 2:
                    with contextlib.suppress(OSError):  # placed or not
                        os.close(fd)
        try:
            if pipes:
                socket.send_fds(self._theirs, [b"p"], list(pipes.values()))
        except BaseException as exc:  # noqa: BLE001 - raised by launch, on the worker
            kill_failed_spawn(popen)
            return exc
        finally:
            close_fds(pipes.values())
        return popen, list(pipes)

    def _place(self, needed: list[int], closed: list[int]) -> None:
        """On the spawner's thread: receive the worker's copies of the fds
        ``needed`` and put each under its number; close the std streams
        the daemon has ``closed``.  Raise OSError."""
        for fd in closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not needed:
            return
        received, flags = socket.recv_fds(self._theirs, 1, len(needed))[1:3]  # fds, flags
        if len(received) != len(needed) or flags & socket.MSG_CTRUNC:
            close_fds(received)
            raise OSError(errno.EMFILE, "the fds a child inherits did not all arrive")
        # Above every number needed first: a received fd may sit on one.
        above = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, needed[-1] + 1) for fd in received]
        close_fds(received)
        for fd, number in zip(above, needed):
            os.dup2(fd, number, inheritable=number <= 2)  # stdio is inherited, sockets passed
        close_fds(above)


# ============================================================= Cgroups ======
# Containment with cgroup v2.  Where the daemon may write the cgroup it was
# started in (as root, in a systemd unit with Delegate=yes, in a container
# with its own cgroup namespace), each Daemon makes a subtree there:
#
#     C/minisup.PID.START.N.NS/ the Daemon's (START: its process's start time,
#                               NS: its PID namespace)
#         w.NAME/               one per watcher
#             WID.SERIAL/       one per process: it and all it starts
#
# A child is born in its own cgroup: the spawner thread (see Spawner; the
# worker where there is none) moves this whole process into it around the
# fork and back (``Placement``), so no window lets a grandchild start
# outside.  Killing a cgroup reaches everything started
# in it, whatever session or process group it moved to, and an empty
# cgroup (``populated 0`` in cgroup.events) is how a stop knows nothing is
# left.  Elsewhere, the fallback: process groups, the descendant walk, the
# subreaper, and a tag in each child's environment (OWNER_VARIABLE) that
# ties an orphan back to its watcher.

#: The environment variable that tags each child in fallback mode:
#: ``TOKEN:WATCHER``, TOKEN naming the Daemon (``daemon_token``).
OWNER_VARIABLE = "MINISUP_OWNER"
#: The cgroup v2 controller each limit option needs.
LIMIT_CONTROLLERS = {"memory_max": "memory", "cpu_quota": "cpu", "pids_max": "pids"}
#: How to give minisup a cgroup of its own with controllers, for errors.
DELEGATION_HINT = ("give minisup a cgroup of its own with the controllers delegated: "
                   "Delegate=yes in its systemd unit (or systemd-run --scope -p Delegate=yes "
                   "python -m minisup run ...), or in a container a cgroup v2 host, "
                   "--cgroupns=private and a writable /sys/fs/cgroup (README: Containment)")
#: cpu.max's period, in microseconds: ``cpu_quota`` is a share of it.
CPU_PERIOD_USEC = 100_000
#: How long a starting or ending daemon waits for a killed cgroup to empty.
EMPTY_TIMEOUT = 5.0
_DAEMON_NUMBERS = itertools.count(1)  # N in each Daemon's token: next() is atomic


def pid_namespace() -> int:
    """This process's PID namespace: the inode of /proc/self/ns/pid (0
    where it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def daemon_token() -> str:
    """A name for a new Daemon no other can have, now or after a reboot:
    PID.START.N.NS (this process's pid and start time, which Daemon of it,
    and the PID namespace those pids belong to).  A subtree so named whose
    process is gone is stale; only a daemon in the same namespace can tell."""
    start = read_stat(os.getpid())[19]  # starttime: ticks after boot
    return f"{os.getpid()}.{start}.{next(_DAEMON_NUMBERS)}.{pid_namespace()}"


def cgroup2_mount() -> tuple[str, str] | None:
    """Where cgroup v2 is mounted and the cgroup path shown at the mount
    point (``/`` unless a subtree is bind-mounted), from mountinfo; None
    if it is not mounted (a cgroup v1 only system, or no /proc)."""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as stream:
        for line in stream:
            if " - " not in line:  # every line has it: fields, then the file system
                continue
            mount, filesystem = line.split(" - ", 1)
            if filesystem.split()[:1] == ["cgroup2"]:
                parts = mount.split()
                return parts[4], parts[3]  # the mount point, the root shown there
    return None


def cgroup_path(pid: int | str = "self") -> str | None:
    """A process's cgroup v2 path (the ``0::`` line of /proc/PID/cgroup),
    or None if it has none or is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as stream:
        for line in stream:
            if line.startswith("0::"):
                return line[3:].rstrip("\n")
    return None


def read_keyed(folder: str, name: str) -> dict[str, int]:
    """A flat-keyed cgroup file (cgroup.events, cpu.stat, memory.events) as
    key -> number; empty if the file is missing (a controller off)."""
    values = {}
    with contextlib.suppress(OSError), open(os.path.join(folder, name)) as stream:
        for line in stream:
            with contextlib.suppress(ValueError):  # not KEY NUMBER: no such line known
                key, number = line.split(" ", 1)
                values[key] = int(number)
    return values


def write_cgroup(folder: str, name: str, text: str) -> None:
    """Write ``text`` to the cgroup file ``name`` of ``folder``; raise OSError."""
    with open(os.path.join(folder, name), "w") as stream:
        stream.write(text)


def cgroup_pids(folder: str) -> list[int]:
    """The pids in ``folder`` and the cgroups below it; empty once gone."""
    pids = []
    for below, _, _ in os.walk(folder):
        with contextlib.suppress(OSError), open(os.path.join(below, "cgroup.procs")) as stream:
            pids.extend(int(line) for line in stream)
    return pids


def is_populated(folder: str) -> bool:
    """Whether a process is left in ``folder`` or below (False once gone)."""
    return read_keyed(folder, "cgroup.events").get("populated") == 1


def holds_this_process(folder: str) -> bool:
    """Whether this process sits in the cgroup ``folder`` or below it,
    from /proc/self: a few reads, however many cgroups are below.  Any
    thread (kill_cgroup's, the worker's)."""
    mount = cgroup2_mount()
    own = cgroup_path()
    if mount is None or own is None:
        return False
    mount_point, shown_root = mount
    here = os.path.normpath(os.path.join(mount_point, os.path.relpath(own, shown_root)))
    top = os.path.normpath(folder)
    return here == top or here.startswith(top + os.sep)


def kill_cgroup(folder: str) -> None:
    """SIGKILL every process in ``folder`` and below: by ``cgroup.kill``
    (Linux 5.14), else frozen, killed and thawed until none is left (no
    fork while frozen).  Never this process: raise OSError (EBUSY) if it is
    in there, or if the kernel refuses.  On the thread that owns ``folder``."""
    if holds_this_process(folder):
        raise OSError(errno.EBUSY, "the daemon itself is in this cgroup", folder)
    try:
        write_cgroup(folder, "cgroup.kill", "1")
    except FileNotFoundError:  # an older kernel, or the cgroup is gone
        if os.path.isdir(folder):
            _freeze_and_kill(folder)


def _freeze_and_kill(folder: str) -> None:
    """kill_cgroup without cgroup.kill: SIGKILL ends a frozen process, and
    one forked while the freeze took hold is listed at the next round."""
    killed: set[int] = set()
    write_cgroup(folder, "cgroup.freeze", "1")
    try:
        while True:
            fresh = set(cgroup_pids(folder)) - killed
            if not fresh:
                return
            kill_pids(fresh, signal.SIGKILL)
            killed |= fresh
    finally:
        write_cgroup(folder, "cgroup.freeze", "0")


def wait_until_empty(folder: str, timeout: float) -> bool:
    """Block until no process is left in ``folder`` (the kernel flags each
    change of cgroup.events with POLLPRI), ``timeout`` at most; True if
    it is empty.  For a daemon's start and end only, never the loops."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(folder, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while b"populated 1" in os.pread(fd, 256, 0):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
        return True
    finally:
        os.close(fd)


def remove_cgroup_tree(folder: str) -> None:
    """Remove ``folder`` and the cgroups below it, deepest first; raise
    OSError (EBUSY) if a process is still in one."""
    for below, _, _ in os.walk(folder, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(below)


def empty_and_remove(folder: str, timeout: float = EMPTY_TIMEOUT) -> int:
    """SIGKILL whatever is in ``folder``, wait for it to be gone and
    remove the cgroups; return how many processes were killed.  Blocks up
    to ``timeout``; raise OSError if they are not gone by then."""
    killed = len(cgroup_pids(folder))
    if killed:
        kill_cgroup(folder)
        wait_until_empty(folder, timeout)
    remove_cgroup_tree(folder)
    return killed


def _alive_since(pid: int, start: int) -> bool:
    """Whether process ``pid`` lives and started at ``start`` (boot ticks)."""
    try:
        return int(read_stat(pid)[19]) == start
    except (OSError, ValueError, IndexError):
        return False


def remove_stale_subtrees(folder: str) -> None:
    """Empty and remove the subtrees that daemons now dead (SIGKILLed, say)
    left in ``folder``: named ``minisup.PID.START.N.NS`` where no process
    PID started at START lives.  A live daemon's is never touched, nor one
    of another PID namespace (a container's: its pids are not ours to
    look up).  Blocks while they empty; logs each, and what it cannot remove."""
    ours = pid_namespace()
    for entry in os.scandir(folder):
        match = re.fullmatch(r"minisup\.(\d+)\.(\d+)\.\d+\.(\d+)", entry.name)
        if not match or not entry.is_dir() or int(match.group(3)) != ours:
            continue
        if _alive_since(int(match.group(1)), int(match.group(2))):
            continue
        try:
            killed = empty_and_remove(entry.path)
        except OSError as exc:
            logger.error("cannot remove the stale cgroup %s: %s", entry.path, exc)
            continue
        logger.warning("removed the cgroup %s that a dead daemon left (%d processes killed)",
                       entry.path, killed)


class Placement:
    """Moves this whole process (all its threads: cgroup v2 places
    processes) into a child's cgroup for its fork, and back.  One per
    process, ``PLACEMENT``, shared on purpose by the spawner threads (or
    workers, see Spawner) of every Daemon in it: its lock keeps two spawns'
    moves apart.
    A process another thread of a host program forks meanwhile (well under
    a millisecond) would start in that cgroup too."""

    def __init__(self) -> None:
        """A Placement whose lock is free: made once, at import."""
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def born_in(self, folder: str, home: str) -> Iterator[None]:
        """Hold the lock and sit in ``folder`` for the with-block (the
        fork), then go back ``home``.  Blocks while another Daemon of this
        process spawns; raise OSError if the kernel refuses a move."""
        with self.lock:
            write_cgroup(folder, "cgroup.procs", "0")  # 0: the writing process
            try:
                yield
            finally:
                write_cgroup(home, "cgroup.procs", "0")


PLACEMENT = Placement()


#: The most emptied cgroups the worker removes in one turn (see CgroupTree.discard).
DISCARD_BATCH = 200
#: So many waiting, they are removed even on a turn with deaths or stops.
DISCARD_BACKLOG = 10_000


class CgroupTree:
    """One Daemon's cgroup subtree (see above): the watchers' and
    processes' cgroups, their limits, and those waiting to be empty before
    they are removed.  Made by ``open_cgroup_tree`` on the main thread
    before the worker runs, then owned by the worker thread."""

    def __init__(self, found: str, root: str) -> None:
        """Hold the subtree ``root``, just made under ``found``, where this
        process is (see open_cgroup_tree)."""
        self.found = found  # the folder of the cgroup this process was in (C)
        self.home = found  # where it sits between spawns (C, or ROOT/daemon)
        self.root = root  # ours: C/minisup.TOKEN
        self.controllers: set[str] = set()  # given to every cgroup below root
        self._enabled_in_found: list[str] = []  # those we enabled in C: taken back
        self._serial = itertools.count(1)  # SERIAL in each process's cgroup name
        self._epoll = select.epoll()  # cgroup.events of those awaited: POLLPRI on change
        self._awaited: dict[int, str] = {}  # their fds -> folders
        self._discarded: collections.deque[str] = collections.deque()  # empty: see discard

    def fileno(self) -> int:
        """For the worker's selector: readable when an awaited cgroup changed."""
        return self._epoll.fileno()

    def watcher_folder(self, name: str) -> str:
        """The cgroup folder of the watcher ``name`` (which may hold any
        character: quoted, %XX)."""
        return os.path.join(self.root, "w." + urllib.parse.quote(name, safe=""))

    def new_process_folder(self, name: str, wid: int) -> str:
        """Make the cgroup of a child of watcher ``name`` about to be
        spawned in slot ``wid`` (and the watcher's, at its first); raise
        OSError."""
        watcher = self.watcher_folder(name)
        if not os.path.isdir(watcher):
            os.mkdir(watcher)
            self._give_controllers(watcher)
        folder = os.path.join(watcher, f"{wid}.{next(self._serial)}")
        os.mkdir(folder)
        return folder

    def born_in(self, folder: str) -> contextlib.AbstractContextManager:
        """spawn_process's ``birthplace`` for a child of cgroup ``folder``."""
        return PLACEMENT.born_in(folder, self.home)

    def set_limits(self, folder: str, config: WatcherConfig) -> None:
        """Write ``config``'s limits into a child's cgroup, once this process
        has left it (pids.max would count the daemon's threads, and an OOM
        kill there could pick the daemon); raise OSError."""
        if config.memory_max is not None:
            write_cgroup(folder, "memory.max", str(config.memory_max))
            write_cgroup(folder, "memory.oom.group", "1")  # an OOM kill takes the whole tree
        if config.pids_max is not None:
            write_cgroup(folder, "pids.max", str(config.pids_max))
        if config.cpu_quota is not None:
            quota = max(1000, round(config.cpu_quota * CPU_PERIOD_USEC / 100))
            write_cgroup(folder, "cpu.max", f"{quota} {CPU_PERIOD_USEC}")

    def discard(self, folder: str) -> None:
        """Have a dead child's empty cgroup removed on a later turn with no
        death (see remove_discarded): an rmdir while thousands of stopped
        processes are still exiting waits on the kernel's cgroup locks
        (0.3-0.6 ms each here, 0.03 ms once they are gone), and nothing
        waits for it.  On the worker."""
        self._discarded.append(folder)

    @property
    def discarded(self) -> int:
        """How many discarded cgroups wait to be removed."""
        return len(self._discarded)

    def remove_discarded(self, count: int = DISCARD_BATCH) -> None:
        """Remove up to ``count`` discarded cgroups, oldest first (one a
        process of ours entered meanwhile is awaited, as remove_when_empty
        does).  The worker calls it each turn; never blocks."""
        for _ in range(min(count, len(self._discarded))):
            self.remove_when_empty(self._discarded.popleft())

    def remove_when_empty(self, folder: str) -> bool:
        """Remove a dead child's cgroup, or await it if a process is still
        in it (see ``emptied``); True if it is gone now.  Never blocks."""
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # EBUSY while populated
            return True
        try:
            fd = os.open(os.path.join(folder, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        self._epoll.register(fd, select.EPOLLPRI)  # first wake-up at once: a check
        self._awaited[fd] = folder
        return False

    def emptied(self) -> list[str]:
        """Remove the awaited cgroups that are empty now; return them.  The
        worker calls it when ``fileno`` is readable; never blocks."""
        gone = []
        for fd, _ in self._epoll.poll(0):
            with contextlib.suppress(OSError):  # unreadable: removed, so empty
                if b"populated 1" in os.pread(fd, 256, 0):  # the read re-arms POLLPRI
                    continue
            folder = self._awaited.pop(fd)
            self._epoll.unregister(fd)
            os.close(fd)
            with contextlib.suppress(OSError):  # a process of ours made cgroups in it
                remove_cgroup_tree(folder)
            gone.append(folder)
        return gone

    def kill_everything(self) -> None:
        """SIGKILL every process in every watcher's cgroup; never blocks."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir() and entry.name.startswith("w."):
                    kill_cgroup(entry.path)

    def enable(self, wanted: set[str]) -> None:
        """Give the controllers ``wanted`` (for limits) to every cgroup
        below ``root``; the first time, this process moves to a cgroup of
        its own, ROOT/daemon (no process may sit in a cgroup that gives
        controllers to others).  Raise MinisupError saying why not and how."""
        missing = wanted - self.controllers
        if not missing:
            return
        with open(os.path.join(self.found, "cgroup.controllers")) as stream:
            available = set(stream.read().split())
        if missing - available:
            raise MinisupError(
                f"the {' and '.join(sorted(missing - available))} controller is not delegated "
                f"to {self.found} (it has: {' '.join(sorted(available)) or 'none'}); "
                f"{DELEGATION_HINT}")
        self._leave_found()
        with open(os.path.join(self.found, "cgroup.subtree_control")) as stream:
            given = set(stream.read().split())
        try:
            _give(self.found, missing - given)
        except OSError as exc:
            raise MinisupError(f"{self.found} cannot give controllers to its cgroups ("
                               f"{exc.strerror}: it holds other processes?); "
                               f"{DELEGATION_HINT}") from None
        self._enabled_in_found += sorted(missing - given)
        self.controllers |= missing
        self._give_controllers(self.root)
        for entry in os.scandir(self.root):
            if entry.is_dir() and entry.name.startswith("w."):
                self._give_controllers(entry.path)

    def _give_controllers(self, folder: str) -> None:
        """Give ``controllers`` to the cgroups below ``folder``; raise OSError."""
        _give(folder, self.controllers)

    def _leave_found(self) -> None:
        """Move this process from C to ROOT/daemon, once, for ``enable``."""
        if self.home != self.found:
            return
        folder = os.path.join(self.root, "daemon")
        os.makedirs(folder, exist_ok=True)
        with PLACEMENT.lock:
            write_cgroup(folder, "cgroup.procs", "0")
        self.home = folder

    def close(self) -> None:
        """Kill what is left in the subtree (nothing, after a quit), remove
        it, take back the controllers given in C and bring this process
        back to C, where it was found.  Blocks up to EMPTY_TIMEOUT per
        watcher; logs what it cannot do.  After the worker has ended."""
        for fd in self._awaited:
            os.close(fd)
        self._awaited = {}
        self._epoll.close()
        try:
            for entry in os.scandir(self.root):
                if entry.is_dir() and entry.name.startswith("w."):
                    empty_and_remove(entry.path)
            if self.home != self.found:
                _give(self.root, self.controllers, "-")
                _give(self.found, set(self._enabled_in_found), "-")
                with PLACEMENT.lock:
                    write_cgroup(self.found, "cgroup.procs", "0")
                self.home = self.found
            remove_cgroup_tree(self.root)
        except OSError as exc:
            logger.error("cannot remove the cgroup %s: %s", self.root, exc)


def _give(folder: str, controllers: set[str], sign: str = "+") -> None:
    """Enable (``+``) or disable (``-``) ``controllers`` for the cgroups
    below ``folder``; raise OSError."""
    if controllers:
        write_cgroup(folder, "cgroup.subtree_control",
                     " ".join(sign + name for name in sorted(controllers)))


def open_cgroup_tree(mode: str, token: str) -> tuple[CgroupTree | None, str]:
    """A new Daemon's cgroup subtree, ``minisup.TOKEN`` under the cgroup
    this process is in, once the stale ones of dead daemons are removed;
    or None and why not (``mode`` off, no cgroup v2, no permission).  On
    the main thread before the worker runs; blocks while stale ones empty."""
    if mode == "off":
        return None, "cgroup = off"
    mount = cgroup2_mount()
    own = cgroup_path()
    if mount is None or own is None:
        return None, "no cgroup v2 file system is mounted (a cgroup v1 system?)"
    mount_point, shown_root = mount
    relative = os.path.relpath(own, shown_root)
    if relative.startswith(".."):
        return None, f"this process's cgroup {own} is outside the cgroup2 mount"
    found = os.path.normpath(os.path.join(mount_point, relative))
    if os.statvfs(mount_point).f_flag & os.ST_RDONLY:  # a container's default
        return None, (f"cannot write {found}: cgroup2 is mounted read-only at {mount_point}; "
                      f"{DELEGATION_HINT}")
    if not os.access(os.path.join(found, "cgroup.procs"), os.W_OK):
        return None, f"{found} is not writable by this user; {DELEGATION_HINT}"
    root = os.path.join(found, f"minisup.{token}")
    try:
        remove_stale_subtrees(found)
        os.mkdir(root)
    except OSError as exc:
        return None, f"cannot make {root}: {exc.strerror}; {DELEGATION_HINT}"
    return CgroupTree(found, root), ""


def tree_usage(pids: Iterable[int]) -> dict[str, Any]:
    """The CPU seconds (the live ones'), resident memory (bytes) and count
    of the processes ``pids`` still alive, from /proc: ``stats``'s
    ``tree`` in fallback mode."""
    cpu_ticks = 0
    resident = 0
    alive = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            fields = read_stat(pid)
            cpu_ticks += int(fields[11]) + int(fields[12])
            resident += int(fields[21]) * PAGE_SIZE
            alive += 1
    return {"cpu": round(cpu_ticks / CLOCK_TICKS, 3), "memory": resident, "processes": alive}


def cgroup_usage(folder: str) -> dict[str, Any]:
    """``stats``'s ``tree`` of a cgroup: the CPU seconds of every process
    that ever ran in it (grandchildren gone since included), its memory
    (memory.current where that controller is on, else the resident memory
    of the processes in it) and how many processes it holds now."""
    pids = cgroup_pids(folder)
    memory = None
    with contextlib.suppress(OSError, ValueError), open(
            os.path.join(folder, "memory.current")) as stream:
        memory = int(stream.read())
    if memory is None:  # no memory controller: each process's, from /proc
        usage = tree_usage(pids)
    else:  # the kernel's count: no /proc walk
        usage = {"memory": memory, "processes": len(pids)}
    usage["cpu"] = round(read_keyed(folder, "cpu.stat").get("usage_usec", 0) / 1e6, 3)
    return usage


# ============================================================== Output ======
# One thread pumps every child's stdout/stderr pipe into its sink: bytes in,
# the same bytes out, whole lines only, rotation between lines.

#: One read takes up to this much from a pipe: big reads make capture cheap.
READ_SIZE = 1 << 18
#: A drain reads at most this many chunks: a descendant may keep writing.
DRAIN_READS = 64
#: Ends a partial line a failed write left where it cannot be cut off.
CUT_MARK = b" [minisup: line cut]\n"
ROTATE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: A tail keeps of a big chunk only its end, this many bytes per line it
#: keeps, when that end holds them all: one small copy per chunk.
TAIL_LINE_BYTES = 256
#: Seconds after the last ``stats`` with ``output`` that lines are counted.
LINE_COUNT_LEASE = 600.0


class Sink:
    """Where one watcher's stdout or stderr goes (FileStream, TimedRotating-
    FileStream, WatchedFileStream, StdoutStream).  Owned by the output thread."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        """The sink of watcher ``name`` for stream ``options`` (its
        ``stdout_stream`` or ``stderr_stream``); opens the target, or
        leaves it closed for each write to retry.  On the output thread."""
        self.name = name  # the watcher's
        self.options = options
        self.stream_class = options["class"]  # one of STREAM_CLASSES
        self.path = options.get("filename", "")
        self._clock = time.localtime  # for rotation times and backup names
        if options.get("utc"):
            self._clock = time.gmtime
        self.errors = 0  # chunks lost or cut short
        # The writer (pid) whose last line the target ends in, unfinished
        # (it died mid-line): another's first write begins on a new line.
        self.unended: int | None = None
        self.lost_bytes = 0  # what those failures lost
        self.fd = -1  # the target, -1 while closed
        self.size = 0  # what the target holds, for max_bytes
        self.rotatable = False  # a regular file of ours: see open
        self.uncut = 0  # partial lines that could not be cut off the target
        self.torn = False  # the target ends with one: the next write ends it
        self.rollover_at = None  # when a timed rotation is due
        if self.stream_class == "timedrotatingfilestream":
            self.rollover_at = self._next_rollover(time.time())
        self.reopen()

    def open(self) -> None:
        """Open the target; raise OSError."""
        if self.stream_class == "stdoutstream":
            fd = os.dup(1)  # ours, closed on its own: the daemon's stdout stays open
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o644)
        info = os.fstat(fd)
        self.fd, self.size = fd, info.st_size
        # Never rotate our stdout, a FIFO or /dev/stdout (supervisord's "Illegal seek").
        self.rotatable = stat.S_ISREG(info.st_mode) and self.stream_class != "stdoutstream"

    def close(self) -> None:
        """Close the target, if open; on the output thread (or by the owner
        of a Sink no thread writes to)."""
        fd, self.fd = self.fd, -1  # a closed number may be reused at once
        close_fds([fd])

    def reopen(self) -> None:
        """(Re)open the target (SIGUSR1, ``reopen``: after logrotate); if that
        fails it stays closed, and each write tries again or loses its chunk."""
        self.close()
        with contextlib.suppress(OSError):
            self.open()

    def write(self, pid: int, data: bytes | memoryview) -> None:
        """Write ``data`` from process ``pid``, each line after its prefix:
        ``NAME.PID | `` on stdout, the time with ``time_format``.  What
        does not end with a newline (a piece of a line longer than
        max_line, or a dead child's last line) is written as it is, and the
        line goes on at that writer's next write; a newline is added only
        before another writer's output, to keep lines apart.  Rotation
        happens only between lines.  On the output thread; may block on a
        slow disk; a failed write or rotation is counted and logged (see
        _failed), not raised."""
        continued = self.unended == pid
        data = self._with_prefixes(pid, data, continued)
        if self.unended is not None and not continued:
            data = b"\n" + data  # after another's unfinished line: ours begin anew
        self.unended = None
        if data[-1:] != b"\n":
            self.unended = pid
        if continued:  # the line's rest first, into the file where it began
            data = bytes(data)
            first = data.find(b"\n") + 1 or len(data)
            self._put(data[:first])
            data = data[first:]
        if self.stream_class == "watchedfilestream":
            self._follow_moves()
        self._write_lines(data)

    def _write_lines(self, data: bytes | memoryview) -> None:
        """Append ``data``, which begins a line, rotating between lines as
        the options say (see write)."""
        while data:
            if self.rollover_at is not None and time.time() >= self.rollover_at:
                self._rotate()
                self.rollover_at = self._next_rollover(time.time())
            limit = 0  # bytes per file, 0: no size rotation
            if self.rotatable:
                limit = self.options.get("max_bytes", 0)
            if not limit or self.size + len(data) <= limit:
                self._put(data)
                return
            data = bytes(data)  # a copy only when a rotation is due
            cut = data.rfind(b"\n", 0, max(limit - self.size, 0)) + 1
            if not cut and not self.size:  # one line longer than a whole file
                cut = data.find(b"\n") + 1 or len(data)
            self._put(data[:cut])
            if cut < len(data) or data.endswith(b"\n"):
                self._rotate()
            data = data[cut:]

    def _with_prefixes(self, pid: int, data: bytes | memoryview,
                       continued: bool = False) -> bytes | memoryview:
        """``data`` with each line's prefix for write: ``NAME.PID | `` on
        stdout, then the time with ``time_format``; unchanged without.  A
        ``continued`` line (begun by an earlier write) gets none at its start."""
        head = b""
        if self.stream_class == "stdoutstream":
            head = f"{self.name}.{pid} | ".encode()
        if self.options.get("time_format"):
            head += time.strftime(self.options["time_format"]).encode() + b" "
        if not head:
            return data
        lines = bytes(data).split(b"\n")
        unfinished = lines.pop()  # b"" after a newline
        prefixed = b"".join(head + line + b"\n" for line in lines)
        if unfinished:
            prefixed += head + unfinished
        if continued and prefixed.startswith(head):
            return prefixed[len(head):]
        return prefixed

    def _put(self, data: bytes | memoryview) -> None:
        """Append ``data`` (whole lines) to the target; on the output thread,
        may block on a slow disk, never raises.  A write that fails loses
        the rest of the chunk (logged) and leaves no partial line behind."""
        if self.torn:  # end the partial line a failed write left, first
            data = CUT_MARK + data
        view, written = memoryview(data), 0
        try:
            if self.fd < 0:
                self.open()
            while written < len(data):
                written += os.write(self.fd, view[written:])
            self.torn = False
        except OSError as exc:  # a full disk loses this chunk, not the daemon
            self.lost_bytes += len(data) - written
            self._failed(exc)
            written = self._discard_partial_line(bytes(data), written)
        self.size += written  # what the file holds, for max_bytes

    def _discard_partial_line(self, data: bytes, written: int) -> int:
        """Cut off the partial line that a write of ``data``, failing after
        ``written`` bytes, left at the end of the target, so that the next
        write cannot join a line to it; return how many bytes of ``data``
        the target keeps.  On the output thread, after ``_failed``; never
        raises."""
        kept = data.rfind(b"\n", 0, written) + 1
        if kept < written:
            try:
                # The output thread alone writes to this fd, and appends: the
                # offset after its last write is the end of the file.
                end = os.lseek(self.fd, 0, os.SEEK_CUR)
                # Shrinking takes no new block, so it works on a full disk.
                os.ftruncate(self.fd, end - (written - kept))
            except OSError as exc:  # a FIFO, our stdout, an append-only file
                self._leave_partial_line(exc)
                return written
        if kept:
            self.torn = False  # the target ends with a whole line of ours
        return kept

    def _leave_partial_line(self, exc: OSError) -> None:
        """Log that a partial line stays at the end of the target, which
        cannot be truncated, and have the next write end it with CUT_MARK;
        on the output thread.  Reopening would not help (the file would
        still end mid-line), and losing every later chunk until a truncate
        works could silence a FIFO for good: a marked end keeps each later
        line whole and says where one was cut."""
        self.torn = True
        self.uncut += 1  # reported the first time and every thousandth
        if self.uncut % 1000 == 1:
            logger.error("%s: cannot cut a partial line off %s (%s), %d ended with %r so far",
                         self.name, self.path, exc, self.uncut, CUT_MARK.strip().decode())

    def _failed(self, exc: OSError) -> None:
        """Count and log a chunk lost, in whole or in part, to a failed open,
        write or rotation; on the output thread."""
        self.errors += 1  # reported the first time and every thousandth
        if self.errors % 1000 == 1:
            logger.error("%s: cannot write %s (%s), %d chunks lost or cut short so far",
                         self.name, self.path, exc, self.errors)

    def _follow_moves(self) -> None:
        """Reopen the target if its file was moved or deleted (a
        watchedfilestream's logrotate), or was never opened; on the output
        thread, before each write; never raises."""
        with contextlib.suppress(OSError):  # no file, or none open (it failed)
            if os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                return
        self.reopen()  # moved, deleted, or never opened

    def _rotate(self) -> None:
        """Set the file aside as NAME.TIME (timed) or NAME.1 (older ones
        move up), or empty it without ``backup_count``, then reopen it; on
        the output thread, between lines; never raises (a failure is logged)."""
        count = self.options.get("backup_count", 0)
        try:
            if self.stream_class == "timedrotatingfilestream":
                self._set_aside_timed(count)
            elif count:
                self._set_aside_numbered(count)
            else:
                os.truncate(self.path, 0)
        except OSError as exc:  # moved away meanwhile (logrotate): start anew
            self._failed(exc)
        self.reopen()

    def _set_aside_timed(self, count: int) -> None:
        """Rename the file NAME.TIME (its period's last second) and keep only
        the newest ``count`` backups (0: all); for _rotate, raise OSError."""
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", self._clock(self.rollover_at - 1))
        target = f"{self.path}.{stamp}"
        while os.path.exists(target):  # a size rotation in the same second
            target += "_"
        os.replace(self.path, target)
        if count:
            for old in self._timed_backups()[:-count]:
                os.remove(old)

    def _timed_backups(self) -> list[str]:
        """The files this sink set aside by time, oldest first: NAME.TIME
        only, never another file whose name merely starts with NAME."""
        stamped = re.compile(re.escape(self.path) + r"\.\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_*")
        return sorted(p for p in glob.glob(glob.escape(self.path) + ".*") if stamped.fullmatch(p))

    def _set_aside_numbered(self, count: int) -> None:
        """Rename the file NAME.1, each NAME.N to NAME.N+1, the last of
        ``count`` backups being overwritten; for _rotate, raise OSError."""
        for index in range(count - 1, 0, -1):
            if os.path.exists(f"{self.path}.{index}"):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")

    def _next_rollover(self, now: float) -> float:
        """When the timed rotation after ``now`` is due, for the output
        thread: with ``rotate_when`` s, m, h or d, ``rotate_interval`` of
        those later; with midnight, at the next one; with w0 to w6, at the
        start of the next such weekday (w0: Monday; never today)."""
        when = self.options.get("rotate_when", "h")
        interval = max(1, self.options.get("rotate_interval", 1))
        if when in ROTATE_SECONDS:
            return now + ROTATE_SECONDS[when] * interval
        local = self._clock(now)
        midnight = now - (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec) + 86400
        days = 0  # after the next midnight
        if when != "midnight":  # w0 to w6: tm_wday counts from Monday too
            days = (int(when[1]) - local.tm_wday - 1) % 7
        return midnight + days * 86400


@dataclasses.dataclass
class Pipe:
    """One child's stdout or stderr, read by the output thread."""

    config: WatcherConfig
    pid: int
    wid: int
    stream: str
    fd: int
    sink: Sink
    partial: bytes = b""


def _lines_start(data: bytes | bytearray, end: int, count: int) -> int:
    """Where the last ``count`` whole lines of ``data[:end]`` begin (0 if
    it holds fewer): for TailBuffer on the output thread, which looks at a
    window of the end that grows until it holds them, not at the whole
    chunk."""
    window = count * TAIL_LINE_BYTES
    while True:
        start = max(end - window, 0)
        if not start:
            return 0
        if data.count(b"\n", start, end - 1) >= count:  # a last newline ends the last line
            return data.find(b"\n", start, end) + 1
        window *= 4


class TailBuffer:
    """A watcher's last lines for ``tail``, kept as the chunks they came
    in (a copy of each chunk's end), and split into lines only when asked:
    a chunk costs one copy, not one object per line.  Owned by the output
    thread."""

    def __init__(self, size: int) -> None:
        """Keep at least the last ``size`` lines (``tail_lines``)."""
        self.size = size
        # (source, lines in it, data): source is (stream, pid, wid, time).
        self._chunks: collections.deque[tuple[tuple[str, int, int, float], int, bytes]]
        self._chunks = collections.deque()
        self._count = 0  # lines in _chunks

    def resize(self, size: int) -> None:
        """Keep ``size`` lines from now on (``tail_lines`` changed)."""
        self.size = size
        self._trim()

    def add(self, source: tuple[str, int, int, float], data: bytes | bytearray,
            end: int) -> None:
        """Keep the last lines of chunk ``data[:end]`` (whole lines, or a
        piece of one: that counts as a line too) from ``source`` (stream,
        pid, wid, time): only as much of its end as holds ``size`` lines is
        looked at and copied."""
        if not self.size:
            return
        start = _lines_start(data, end, self.size)
        chunk = bytes(memoryview(data)[start:end])
        lines = chunk.count(b"\n")
        if chunk[-1:] != b"\n":
            lines += 1
        self._chunks.append((source, lines, chunk))
        self._count += lines
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest chunks while the rest hold ``size`` lines."""
        while self._chunks and self._count - self._chunks[0][1] >= self.size:
            self._count -= self._chunks.popleft()[1]

    def last(self, count: int, only_stream: str | None) -> list[tuple[str, int, int, float, bytes]]:
        """Of the last ``size`` lines, the last ``count`` (of ``only_stream``
        if not None), oldest first, each as (stream, pid, wid, time, line)."""
        kept: list[tuple[str, int, int, float, bytes]] = []  # newest first
        for source, _, data in reversed(self._chunks):
            if len(kept) >= self.size:
                break
            lines = data.split(b"\n")
            if lines[-1] == b"":  # after the last newline: nothing (else a piece)
                lines.pop()
            kept.extend((*source, line) for line in reversed(lines))
        chosen = [entry for entry in kept[:self.size] if only_stream in (None, entry[0])]
        chosen = chosen[:count]
        chosen.reverse()
        return chosen


def _queued(method: Callable[..., None]) -> Callable[..., None]:
    """Make a Pump method run on the output thread: a call from any thread
    (or signal handler) queues it and wakes the thread."""
    @functools.wraps(method)
    def queue_call(pump: Pump, *args: Any) -> None:
        """Queue the call for the output thread and wake it; never blocks."""
        pump._tasks.put((method, pump, *args))
        pump._waker.wake()
    return queue_call


def _every_topic(topic: str) -> bool:
    """Pump.wanted until the Daemon sets its own: every topic has a subscriber."""
    return True


class Pump:
    """Owns every output pipe, sink and tail buffer; ``run`` is the output
    thread, which reads what any child writes at once and in big chunks.
    Other threads call ``attach``, ``drain``, ``tail``, ``reopen`` and
    ``stop``, which are queued to run on the output thread."""

    def __init__(self) -> None:
        """An idle pump: nothing attached, no thread yet (call ``run`` on one)."""
        self._waker = Waker()  # wakes the output thread for a queued call
        self._running = True  # until ``stop`` runs
        self.publish: Callable[[str, dict[str, Any]], None] | None = None  # set by the Daemon
        self.wanted: Callable[[str], bool] = _every_topic  # anyone subscribed?
        self._tasks: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()  # (method, *args)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._waker, selectors.EVENT_READ, None)
        self._sinks: dict[tuple[str, str], Sink] = {}  # by file (or stream) and options
        self._tails: dict[str, TailBuffer] = {}  # a watcher's last lines, for ``tail``
        self._buffer = bytearray(READ_SIZE)  # each read's, reused
        self._lines: collections.Counter[int] = collections.Counter()  # lines, by live pid
        self._count_lines_until = 0.0  # monotonic: see line_counts
        self._pipes_of: collections.Counter[int] = collections.Counter()  # open pipes, by pid
        # Chunks delivered, by watcher: a tail says the last it holds, each
        # output event its own, so that follow prints each line once.
        self._chunks: collections.Counter[str] = collections.Counter()
        self._read_bytes: collections.Counter[tuple[str, str]] = collections.Counter()

    @_queued
    def stop(self) -> None:
        """Drain every pipe, close every file and end the output thread;
        queued (any thread), so it returns at once: join the thread."""
        self._running = False

    def run(self) -> None:
        """The output thread's loop: read each pipe as data comes and run
        the queued calls; blocks until ``stop`` has run, then closes every
        pipe and file.  A failing read or call is logged, not raised."""
        try:
            while self._running:
                for key, _ in self._selector.select():
                    if key.data is not None:
                        self._guarded(self._read, key.data)
                        continue
                    self._waker.drain()
                    while not self._tasks.empty():  # we alone take: get won't block
                        self._guarded(*self._tasks.get())
        finally:
            self.close()

    def _guarded(self, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function(*args)`` (a read or a queued call) for ``run``,
        logging what it raises; a pipe whose read failed is dropped."""
        try:  # a bug must not stop every capture, nor a drain: log, drop the pipe
            function(*args)
        except Exception:
            logger.exception("output thread: %s failed", function.__name__)
            if function == self._read:
                with contextlib.suppress(Exception):
                    self._finish(args[0])

    def close(self) -> None:
        """Write what is left, close every pipe and file; on the output
        thread as it ends (or by the owner of a Pump never run)."""
        if self._waker.read_fd >= 0:
            for key in list(self._selector.get_map().values()):
                if key.data is not None:
                    self._read(key.data, DRAIN_READS)
                    self._finish(key.data)
            for sink in self._sinks.values():
                sink.close()
            self._selector.close()
            self._waker.close()

    @_queued
    def attach(self, config: WatcherConfig, pid: int, wid: int, pipes: dict[str, int]) -> None:
        """Start reading a new child's ``pipes`` (stream name: read end)
        into its watcher's sinks; queued by the worker thread."""
        for stream, fd in pipes.items():
            options = getattr(config, f"{stream}_stream")
            # New options make a new sink: old processes may still write to the old one.
            key = (options.get("filename") or f"{config.name}.{stream}",
                   json.dumps(options, sort_keys=True))
            if key not in self._sinks:
                self._sinks[key] = Sink(config.name, options)
            if config.name not in self._tails:
                self._tails[config.name] = TailBuffer(config.tail_lines)
            self._tails[config.name].resize(config.tail_lines)
            pipe = Pipe(config, pid, wid, stream, fd, self._sinks[key])
            self._selector.register(fd, selectors.EVENT_READ, pipe)
            self._pipes_of[pid] += 1

    def _read(self, pipe: Pipe, chunks: int = 1) -> None:
        """Read and deliver up to ``chunks`` chunks, until the pipe is empty
        for now (or for good: then it is closed).  Each read goes into one
        reused buffer, after the line the pipe holds back: no copy is made
        of what is written whole."""
        for _ in range(chunks):
            held = len(pipe.partial)
            if len(self._buffer) < held + READ_SIZE:  # a long line held back
                self._buffer = bytearray(held + READ_SIZE)
            buffer = self._buffer
            buffer[:held] = pipe.partial
            try:
                count = os.readv(pipe.fd, [memoryview(buffer)[held:held + READ_SIZE]])
            except BlockingIOError:
                return
            except OSError:
                count = 0
            if not count:
                self._finish(pipe)
                return
            self._read_bytes[(pipe.config.name, pipe.stream)] += count
            size = held + count
            end = buffer.rfind(b"\n", 0, size) + 1
            if size - end >= pipe.config.max_line:  # never hold back more: a piece
                end = size
            pipe.partial = bytes(memoryview(buffer)[end:size])
            if end:
                self._deliver(pipe, buffer, end)

    def _deliver(self, pipe: Pipe, data: bytes | bytearray, end: int) -> None:
        """Hand the first ``end`` bytes of ``data`` (whole lines, or a piece
        of one) from ``pipe`` to its sink, its watcher's tail and any
        subscriber; on the output thread."""
        lines = memoryview(data)[:end]
        pipe.sink.write(pipe.pid, lines)
        if time.monotonic() < self._count_lines_until:  # someone asks for them
            self._lines[pipe.pid] += data.count(b"\n", 0, end)
        self._chunks[pipe.config.name] += 1
        now = time.time()
        self._tails[pipe.config.name].add((pipe.stream, pipe.pid, pipe.wid, now), data, end)
        topic = f"watcher.{pipe.config.name}.output"
        if self.publish is not None and self.wanted(topic):  # JSON only for a subscriber
            text = bytes(lines).decode("utf-8", "replace")
            self.publish(topic, {"pid": pipe.pid, "wid": pipe.wid, "stream": pipe.stream,
                                 "data": text, "time": now,
                                 "seq": self._chunks[pipe.config.name]})

    def _finish(self, pipe: Pipe) -> None:
        """Stop reading ``pipe`` (at its end, or when a read failed) and close
        it, delivering a last partial line; on the output thread.  Does
        nothing for a pipe already finished."""
        if pipe.fd < 0:
            return
        self._selector.unregister(pipe.fd)
        os.close(pipe.fd)
        pipe.fd = -1
        partial = pipe.partial
        pipe.partial = b""
        if partial:  # the child died mid-line: its bytes as they are (see Sink.write)
            self._deliver(pipe, partial, len(partial))
        self._pipes_of[pipe.pid] -= 1
        if not self._pipes_of[pipe.pid]:  # its last pipe: forget its counts
            del self._pipes_of[pipe.pid]
            self._lines.pop(pipe.pid, None)

    @_queued
    def drain(self, pid: int, done: Callable[[], None]) -> None:
        """Write what a dead child left in its pipes, then call ``done``
        (even if that fails); queued by the worker thread."""
        try:
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.data.pid == pid:
                    self._read(key.data, DRAIN_READS)
        finally:
            done()  # the worker waits for this to report the death

    @_queued
    def tail(self, name: str, count: int, only_stream: str | None,
             reply: Callable[[list[dict[str, Any]], int], None]) -> None:
        """Call ``reply`` with a watcher's last ``count`` lines, of
        ``only_stream`` ("stdout" or "stderr") if not None, each as
        {stream, pid, wid, time, line}, and the number of the last chunk
        they come from (output events carry theirs as ``seq``)."""
        entries: list[dict[str, Any]] = []
        if name in self._tails:
            entries = [{"stream": stream, "pid": pid, "wid": wid, "time": when,
                        "line": line.decode("utf-8", "replace")}
                       for stream, pid, wid, when, line
                       in self._tails[name].last(count, only_stream)]
        reply(entries, self._chunks[name])

    @_queued
    def totals(self, reply: Callable[[dict[str, Any]], None]) -> None:
        """Call ``reply`` with the bytes read from each watcher's streams
        (``output``: [watcher, stream, bytes] rows) and those a log file
        failed to take (``lost``), for the metrics; queued by the worker."""
        rows = [[name, stream, count] for (name, stream), count in self._read_bytes.items()]
        reply({"output": rows, "lost": sum(sink.lost_bytes for sink in self._sinks.values())})

    @_queued
    def line_counts(self, pids: list[int], reply: Callable[[dict[int, int]], None]) -> None:
        """Call ``reply`` with the lines each of ``pids`` wrote to its
        captured streams (``stats`` with ``output``) since lines were first
        asked for: counting every newline would cost capture a third of its
        CPU, so it begins at the first ask and ends LINE_COUNT_LEASE after
        the last.  Queued by the worker."""
        self._count_lines_until = time.monotonic() + LINE_COUNT_LEASE
        reply({pid: self._lines.get(pid, 0) for pid in pids})

    @_queued
    def reopen(self) -> None:
        """Reopen every log file (after a logrotate); queued from the SIGUSR1
        handler or the ``reopen`` command."""
        for sink in self._sinks.values():
            sink.reopen()
        logger.info("log files reopened")


# ============================================================= Watcher ======

# A watcher's states.
STOPPED = "stopped"
STARTING = "starting"
ACTIVE = "active"
STOPPING = "stopping"
#: Paused after flapping_attempts restarts within flapping_window.
FLAPPING = "flapping"
#: How often a ``ready = tcp:`` or ``file:`` check is tried.
READY_POLL = 0.05
#: The most pids a warning about children past their grace period lists.
OVERDUE_LISTED = 10
#: The most children one watcher spawns in one turn of the worker's loop:
#: enough that 500 start as fast as in one go, few enough that jobs and
#: deaths are seen between batches of a large ``incr``.
SPAWN_BATCH = 50


def probe_ready(check: str, wid: int) -> bool:
    """Whether a ``tcp:[HOST:]PORT`` or ``file:PATH`` check passes now; on
    the worker, so a connect waits 0.1 s at most (loopback answers at once)."""
    check_type, _, target = check.partition(":")
    if check_type == "file":
        return os.path.exists(substitute(target, {"wid": str(wid)}, {}))
    host, _, port = target.rpartition(":")
    with contextlib.suppress(OSError):  # refused or silent: not ready yet
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.1).close()
        return True
    return False


def _signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number with no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(code: int) -> str:
    """A child's exit as the log says it: ``exited 1``, ``killed by SIGKILL``."""
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    return f"exited {code}"


def exit_label(code: int, reason: str | None, stop_reason: str | None) -> str:
    """The ``reason`` label of one exit in the metrics: ``oom``,
    ``ready_timeout`` or ``watchdog_timeout`` when that is why, else the
    signal's name (``SIGKILL``) or the exit code (``1``)."""
    if reason is not None and reason.startswith("OOM"):
        return "oom"
    if stop_reason is not None and stop_reason.startswith("not ready"):
        return "ready_timeout"
    if stop_reason == "watchdog timeout":
        return "watchdog_timeout"
    if code < 0:
        return _signal_name(-code)
    return str(code)


def backoff_delay(config: WatcherConfig, crashes: int) -> float:
    """How long a watcher waits before the next spawn after ``crashes``
    quick deaths in a row (2 or more), jitter aside: growing by
    ``backoff_factor`` each time, up to ``backoff_max``."""
    try:
        delay = config.backoff_delay * config.backoff_factor ** (crashes - 2)
    except OverflowError:  # a crash loop of a thousand deaths and more: past any cap
        return config.backoff_max
    return min(delay, config.backoff_max)


class Watcher:
    """Keeps ``numprocesses`` children of one program; owned by the worker.
    For the arbiter: ``start``, ``stop``, ``restart``, ``reload``,
    ``stop_processes``, ``set_numprocesses``, ``reap``, and ``manage`` each
    tick."""

    def __init__(self, config: WatcherConfig,
                 spawn: Callable[[WatcherConfig, int, float], Process] = spawn_process,
                 emit: Callable[[str, dict[str, Any]], None] | None = None,
                 hook: Callable[..., None] | None = None) -> None:
        """A stopped watcher of ``config``: ``spawn`` starts a child, ``emit``
        publishes an event, ``hook(watcher, name, kwargs, then)`` runs a hook
        off the worker (the Arbiter's HookRunner.call; None: no hooks)."""
        self.config = config
        self.name = config.name
        self.numprocesses = config.numprocesses  # wanted now (incr, decr, set)
        self.state = STOPPED
        self.processes: dict[int, Process] = {}  # by pid, in spawn order
        self.retries = 0  # failed spawns in a row
        self.restarts = 0  # children replaced after dying on their own
        self.last_error: str | None = None  # why it gave up
        self.last_exit: int | None = None
        self.last_exit_reason: str | None = None  # as the log says it, OOM kills too
        # Cgroups of its dead children still holding processes (cgroup mode,
        # kept by the arbiter): it is not stopped until they are empty.
        self.lingering = 0
        self.spawn_failures = 0  # ever: a waiting start answers at the next one
        self.exits: collections.Counter[str] = collections.Counter()  # by exit_label
        self.dead_cpu = 0.0  # CPU seconds of its reaped children (fallback mode's metrics)
        self._index_children()
        # Respawn times, for the metrics: when each death to be replaced was
        # seen (time.monotonic), and the latencies the arbiter has yet to take.
        self._respawn_due: collections.deque[float] = collections.deque()
        self.respawn_latencies: list[float] = []
        self.spawn_error: str | None = None  # the last, with its attempt number
        self._spawn = spawn
        self._emit = emit
        self._hook = hook
        self._waiting_on: str | None = None  # the hook a start, spawn or stop waits for
        self._wait_number = 0  # which wait an outcome answers: a stale one is dropped
        self._spawns_allowed = 0  # spawns a before_spawn hook let through, not yet made
        self._after_start_due = False  # after_start is called before it is next active
        self._next_spawn = 0.0  # no spawn before: warmup, retry, backoff, flapping pause
        self._probe_at = 0.0  # the next tcp: or file: readiness probe
        self._restart_pending = False  # start again once the stop is done
        self._replace: list[int] = []  # pids a sequential reload still replaces
        self._finished = 0  # slots whose process is done and not replaced
        self._crashes = 0  # consecutive deaths younger than min_uptime
        self._deaths: list[float] = []  # restart times within flapping_window
        self._flaps = 0  # flapping pauses since the last start

    def _index_children(self) -> None:
        """Make the indexes of its children, empty, for __init__: its
        children in two states, by pid, so that a turn of the loop looks at
        those alone, not at all 10,000 (told to stop: a stop_deadline; and
        running but not yet ready), the wids they hold, and the running
        set's pids, made once per change of it."""
        self._stopping: dict[int, Process] = {}
        self._unready: dict[int, Process] = {}
        self._wids: set[int] = set()
        self._changes = 0  # changes to the running set: pids() is kept till the next
        self._pids: tuple[int, list[int]] = (-1, [])  # (_changes then, the pids)

    def emit(self, topic: str, **payload: Any) -> None:
        """Publish ``watcher.<name>.<topic>`` (Circus's event payloads)."""
        if self._emit is not None:
            self._emit(f"watcher.{self.name}.{topic}", {**payload, "time": time.time()})

    def _has_hook(self, name: str) -> bool:
        """Whether the watcher has hook ``name`` (and hooks can run)."""
        return self._hook is not None and name in self.config.hooks

    def _call_hook(self, name: str, **kwargs: Any) -> None:
        """Run hook ``name`` off the worker, if the watcher has it; its
        result is not waited for."""
        if self._has_hook(name):
            self._hook(self, name, kwargs, None)

    def _wait_for_hook(self, name: str, then: Callable[[bool, float], None],
                       **kwargs: Any) -> None:
        """Run hook ``name`` and hold the start, the spawns or the stop
        (``_waiting_on``) until ``then(passed, now)`` takes its outcome."""
        self._wait_number += 1
        self._waiting_on = name
        self._hook(self, name, kwargs, functools.partial(self._hook_done, self._wait_number, then))

    def _hook_done(self, number: int, then: Callable[[bool, float], None],
                   passed: bool, now: float) -> None:
        """A waited-for hook's outcome: drop it if a stop (or start) has
        ended that wait since, else end the wait and pass it on."""
        if number != self._wait_number:
            return
        self._waiting_on = None
        then(passed, now)

    def _cancel_wait(self) -> None:
        """End any wait for a hook: its outcome, when it comes, is dropped."""
        self._wait_number += 1
        self._waiting_on = None

    def _refuse_start(self, hook: str, now: float, detail: str = "") -> None:
        """A hook stopped the start (a false result or a failure): say so
        (``detail``: which process) and stop, as Circus aborts the start."""
        self.last_error = f"the {hook} hook stopped the start{detail}"
        logger.warning("%s: %s", self.name, self.last_error)
        self.stop(now)

    def _set_state(self, state: str) -> None:
        """Move to ``state``, logging it; leaving or entering ``stopped``
        publishes Circus's ``start`` or ``stop`` event."""
        if state == self.state:
            return
        logger.info("%s: %s -> %s", self.name, self.state, state)
        if state == STOPPED and self.state == STOPPING:
            self._call_hook("after_stop")
        if state == STOPPED:
            self.emit("stop")
        elif self.state == STOPPED:
            self.emit("start")
        self.state = state

    @property
    def settled(self) -> bool:
        """True when no start, stop, restart or reload is in progress."""
        return (self.state in (ACTIVE, STOPPED, FLAPPING) and not self._restart_pending
                and not self._replace and not self._unready)

    @property
    def up(self) -> bool:
        """Active, with every child ready: what ``depends_on`` waits for."""
        return self.state == ACTIVE and not self._unready

    @property
    def target(self) -> int:
        """How many children to keep running now: one more while a rolling
        reload waits for a new one to be ready before it stops an old one."""
        rolling = bool(self._replace and self.config.ready)
        return max(0, self.numprocesses - self._finished) + rolling

    def status(self, now: float) -> str:
        """The state, or ``backoff`` while a crash loop delays a respawn."""
        if self.state in (STARTING, ACTIVE) and self._crashes > 1 and now < self._next_spawn:
            return "backoff"
        return self.state

    def next_retry(self, now: float) -> float | None:
        """When (wall clock, ``time.time()``) a missing child is next
        spawned if that waits on a backoff, a failed spawn's retry_in or a
        flapping pause; None if nothing waits."""
        if self.state not in (STARTING, ACTIVE, FLAPPING) or now >= self._next_spawn:
            return None
        if self.state != FLAPPING and self.running_count() >= self.target:
            return None
        return round(time.time() + self._next_spawn - now, 3)

    def crash_looping(self, now: float) -> str | None:
        """Why the watcher is in a crash loop, or None: its last deaths came
        before ``min_uptime``, and a child still younger than that may die
        the same way (until it lives that long, it is not taken as up)."""
        young = [p for p in self.running() if now - p.started < self.config.min_uptime]
        if not self._crashes or not young or self.last_exit is None:
            return None
        return f"{self._crashes} quick exits in a row, the last {self.last_exit_reason}"

    def options(self) -> dict[str, Any]:
        """Every option, with the current number of processes."""
        return {**self.config.options(), "numprocesses": self.numprocesses}

    def running(self) -> list[Process]:
        """Children that are not being stopped, oldest first (``processes``
        keeps spawn order: no sort, in a tick that may run for 500)."""
        if not self._stopping:
            return list(self.processes.values())
        return [p for p in self.processes.values() if p.pid not in self._stopping]

    def running_count(self) -> int:
        """How many children are not being stopped, without listing them."""
        return len(self.processes) - len(self._stopping)

    def _note_stopping(self, process: Process) -> None:
        """A child was told to stop (it has a stop_deadline now): it is no
        longer running, nor waited for to be ready."""
        self._stopping[process.pid] = process
        self._unready.pop(process.pid, None)
        self._changes += 1

    def pids(self) -> list[int]:
        """The pids of ``running``, oldest first: a list made once per
        change of the running set (each View holds it; no one changes it)."""
        if self._pids[0] != self._changes:
            self._pids = (self._changes, [p.pid for p in self.running()])
        return self._pids[1]

    def start(self, not_before: float = 0.0) -> None:
        """Begin (or resume) keeping the children running, spawning no
        sooner than ``not_before``; a watcher still stopping starts after."""
        if self.state == STOPPING:
            self._restart_pending = True
        elif self.state in (STOPPED, FLAPPING):
            stopped = self.state == STOPPED
            self.retries = 0
            self.last_error = None
            self._crashes = 0
            self._finished = 0
            self._deaths = []
            self._flaps = 0
            self._next_spawn = not_before
            self._after_start_due = True
            self._set_state(STARTING)
            if stopped and self._has_hook("before_start"):
                self._wait_for_hook("before_start", self._before_start_done)

    def _before_start_done(self, passed: bool, now: float) -> None:
        """The before_start hook's outcome: spawn, or back to stopped."""
        if not passed and self.state == STARTING:
            self.last_error = "the before_start hook stopped the start"
            logger.warning("%s: %s", self.name, self.last_error)
            self._set_state(STOPPED)

    def stop(self, now: float) -> None:
        """Begin a graceful stop of every child, once the before_stop hook
        (if any) has run."""
        self._restart_pending = False
        self._replace = []
        if self._waiting_on == "before_stop":
            return
        self._cancel_wait()
        self._respawn_due.clear()
        if self.state != STOPPED or self.processes or self.lingering:
            self._set_state(STOPPING)
            if self._has_hook("before_stop"):
                self._wait_for_hook("before_stop", self._signal_stop)
                return
            self._signal_stop(True, now)

    def _signal_stop(self, passed: bool, now: float) -> None:
        """Signal every child to stop (``passed``, before_stop's outcome, is
        ignored, as in Circus); stopped at once if none is left."""
        if self.state != STOPPING:
            return
        self.stop_processes(now)
        if not self.processes and not self.lingering:
            self._set_state(STOPPED)

    def restart(self, now: float) -> None:
        """Stop every child, then start again once all have exited."""
        self.stop(now)
        self.start()

    def reload(self, now: float, sequential: bool = False) -> None:
        """Replace the children gracefully: all at once (new ones spawn as
        the old ones are stopped), one at a time with ``sequential`` or
        ``ready``, or by SIGHUP with ``send_hup``.  A stopped watcher starts."""
        if self.state in (STOPPED, STOPPING):
            self.start()
            return
        if self.config.send_hup:
            for process in self.running():
                process.send_signal(signal.SIGHUP)
        elif sequential or self.config.ready:
            self._replace = list(self.pids())  # a copy: pids() is shared
            self._finished = 0
        else:
            self._finished = 0
            self._next_spawn = now
            self.stop_processes(now)
            self._set_state(STARTING)
        self.emit("reload")

    def stop_processes(self, now: float, pids: list[int] | None = None,
                       signum: int | None = None, timeout: float | None = None) -> list[int]:
        """Stop some children (default: every running one) gracefully: send
        ``stop_signal`` (or ``signum``) and SIGKILL them if they outlive
        ``graceful_timeout`` (or ``timeout``); return their pids.  Those
        still wanted are replaced."""
        if signum is None:
            signum = self.config.stop_signal
        if timeout is None:
            timeout = self.config.graceful_timeout
        victims = self._stoppable(pids)
        for process in victims:
            logger.debug("%s: stopping pid %d with %s (%gs grace)", self.name,
                         process.pid, _signal_name(signum), timeout)
            process.stop_deadline = now + timeout  # when SIGKILL is due
            self._note_stopping(process)
            self.signal_process(process, signum, self.config.stop_children, timeout)
            self.emit("kill", process_pid=process.pid)
            if timeout == 0:
                process.kill()
        return [p.pid for p in victims]

    def signal_process(self, process: Process, signum: int, group: bool = False,
                       grace: float | None = None) -> None:
        """Send ``signum`` to one child (to its group with ``group``), for a
        stop (``grace``: its graceful_timeout) or the ``signal`` command;
        with a before_signal hook, once it has passed it (SIGKILL is sent
        anyway), as in Circus, and a stop's grace period begins only then."""
        if not self._has_hook("before_signal"):
            self._signal_passed(process, signum, group, None, True, 0.0)
            return
        if grace is not None:
            process.stop_deadline = math.inf  # no SIGKILL before the signal went
        then = functools.partial(self._signal_passed, process, signum, group, grace)
        self._hook(self, "before_signal", {"pid": process.pid, "signum": signum}, then)

    def _signal_passed(self, process: Process, signum: int, group: bool, grace: float | None,
                       passed: bool, now: float) -> None:
        """Send ``signum`` if before_signal passed it, to a child not yet
        reaped (its pid cannot have been reused), and start a stop's grace
        period; then run after_signal."""
        alive = self.processes.get(process.pid) is process and not process.killed
        if alive and (passed or signum == signal.SIGKILL):
            process.send_signal(signum, group=group)
        if grace is not None and process.stop_deadline == math.inf:
            process.stop_deadline = now + grace  # a held signal still ends in SIGKILL
        self._call_hook("after_signal", pid=process.pid, signum=signum)

    def _stoppable(self, pids: list[int] | None) -> list[Process]:
        """The running children among ``pids`` (None: all of them), looked
        up by pid: each tick asks, usually for none, with 500 running."""
        if pids is None:
            return self.running()
        found = [self.processes.get(pid) for pid in pids]
        return [p for p in found if p is not None and p.pid not in self._stopping]

    def set_numprocesses(self, count: int) -> None:
        """Change how many children are wanted (a singleton stays at 1)."""
        if self.config.singleton:
            count = min(count, 1)
        self.numprocesses = max(0, count)
        if self.state == ACTIVE:
            self._set_state(STARTING)

    def update(self, config: WatcherConfig, now: float, reload: bool,
               count: int | None = None) -> None:
        """Take a changed ``config`` (``set``, ``reloadconfig``): resize to
        ``count`` if given, and replace the children if ``reload``."""
        self.config = config
        if count is not None:
            self.set_numprocesses(count)
        elif config.singleton:
            self.set_numprocesses(self.numprocesses)
        if reload and self.state != STOPPED:
            self.reload(now)
        self.emit("updated")

    def abandon(self) -> None:
        """Stop managing the children without stopping them (``rm
        nostop``): they are left to exit, still reaped, and stopped when
        the daemon quits."""
        self._restart_pending = False
        self._set_state(STOPPED)

    def kill_now(self) -> None:
        """SIGKILL every child at once, without a grace period (the
        daemon's forced quit); the watcher is stopping until all are reaped."""
        self._restart_pending = False
        self._cancel_wait()
        if not self.processes and not self.lingering:
            self._set_state(STOPPED)
            return
        self._set_state(STOPPING)
        for process in self.processes.values():
            if process.stop_deadline is None:  # stopping: its exit is no crash
                process.stop_deadline = 0.0
                self._note_stopping(process)
            process.kill()

    def reap(self, process: Process, code: int, now: float, reason: str | None = None) -> None:
        """Forget a child that exited (``reason``: why, if more than its
        exit code tells, as an OOM kill); apply the restart policy to it."""
        self.processes.pop(process.pid, None)
        self._changes += 1
        self._stopping.pop(process.pid, None)
        self._unready.pop(process.pid, None)
        self._wids.discard(process.wid)
        how = reason
        if how is None:
            how = describe_exit(code)
        if process.stop_reason is not None:
            how = f"{process.stop_reason} ({how})"
        self.last_exit = code
        self.last_exit_reason = how
        self.exits[exit_label(code, reason, process.stop_reason)] += 1
        self.emit("reap", process_pid=process.pid, exit_code=code, reason=how)
        self._call_hook("before_reap", process_pid=process.pid, time=time.time())
        self._call_hook("after_reap", process_pid=process.pid, time=time.time(), exit_code=code,
                        process_status=None)
        if process.stopping:
            # Asked for: at debug (a stop of 10,000 would log 10,000 lines);
            # the watcher's "stopping -> stopped" says it at info.
            logger.debug("%s: pid %d stopped (%s)", self.name, process.pid, how)
            return
        logger.info("%s: pid %d %s after %.3fs", self.name, process.pid, how,
                    now - process.started)
        if self.state not in (STARTING, ACTIVE):
            return
        policy = self.config.restart
        if policy == "never" or policy == "on-failure" and code in self.config.exit_codes:
            self._finished += 1  # done: its slot is not refilled
            return
        if process.death_seen is not None:
            self._respawn_due.append(process.death_seen)
        self._note_crash(now, now - process.started)

    def _note_crash(self, now: float, uptime: float) -> None:
        """Count a child that died while wanted (``uptime`` old): past
        ``flapping_attempts`` within ``flapping_window`` the watcher pauses,
        or gives up; quick deaths in a row back off the next spawn."""
        config = self.config
        self.restarts += 1
        if uptime < config.min_uptime:
            self._crashes += 1
        else:
            self._crashes = 0
        if config.flapping_attempts:
            self._deaths = [t for t in self._deaths if now - t < config.flapping_window] + [now]
        if 0 < config.flapping_attempts <= len(self._deaths):
            self._flaps += 1
            self._deaths = []
            self._flap(now)
        elif self._crashes > 1:  # the first quick death is replaced at once
            delay = backoff_delay(config, self._crashes)
            delay *= 1 + _RANDOM.uniform(-config.backoff_jitter, config.backoff_jitter)
            self._next_spawn = max(self._next_spawn, now + delay)
            logger.info("%s: crash loop, next spawn in %.2fs", self.name, delay)

    def _flap(self, now: float) -> None:
        """The watcher is flapping: pause ``flapping_retry_in`` with every
        child stopped, or give up past ``flapping_max_retry`` pauses."""
        config = self.config
        if 0 <= config.flapping_max_retry < self._flaps:
            self.last_error = (f"flapping: {config.flapping_attempts} restarts within "
                               f"{config.flapping_window:g}s, {self._flaps} times")
            logger.error("%s: giving up: %s", self.name, self.last_error)
            self.stop(now)
            return
        logger.warning("%s: flapping, pausing %gs", self.name, config.flapping_retry_in)
        self.stop_processes(now)
        self._next_spawn = max(self._next_spawn, now + config.flapping_retry_in)
        self._set_state(FLAPPING)

    def manage(self, now: float, kill_trees: Callable[[list[Process]], None] | None = None,
               held: bool = False) -> list[Process]:
        """Move toward the wanted state; return the children it spawned.
        ``kill_trees`` SIGKILLs children with all they started (default:
        each with its group); ``held``: spawn nothing yet (a dependency is
        not up)."""
        self._kill_overdue(now, kill_trees)
        self._check_ready(now)
        if self.config.watchdog_sec:
            self._check_watchdogs(now)
        if (self.state == STOPPING and not self.processes and not self.lingering
                and self._waiting_on is None):
            self._set_state(STOPPED)
            if self._restart_pending:
                self._restart_pending = False
                self.start(now)
        if self.state == FLAPPING and now >= self._next_spawn:
            self._set_state(STARTING)
        if self.state not in (STARTING, ACTIVE):
            return []
        self._stop_unwanted(now)
        spawned = []
        if not held:
            spawned = self._fill(now)
        if (self.state == STARTING and self.running_count() >= self.target
                and not self._unready and self._waiting_on is None):
            self._become_active()
        elif self.state == ACTIVE and self._finished and not self.processes and not self.target:
            self._set_state(STOPPED)  # every process is done
        return spawned

    def _become_active(self) -> None:
        """Every child runs and is ready: active, once the after_start hook
        (called once per start, as in Circus) has passed."""
        if self._after_start_due and self._has_hook("after_start"):
            if self._waiting_on is None:
                self._wait_for_hook("after_start", self._after_start_done)
            return
        self._after_start_due = False
        self._set_state(ACTIVE)

    def _after_start_done(self, passed: bool, now: float) -> None:
        """The after_start hook's outcome: active at the next turn, or stop."""
        self._after_start_due = False
        if not passed and self.state == STARTING:
            self._refuse_start("after_start", now)

    def _kill_overdue(self, now: float,
                      kill_trees: Callable[[list[Process]], None] | None) -> None:
        """SIGKILL every child that outlived its grace period, with all it
        started (``kill_trees``, given them all at once: a whole watcher's
        go in one write; else each with its group).  The signal hooks hear
        of it, as in Circus, but cannot hold it back."""
        overdue = [p for p in self._stopping.values() if not p.killed and now >= p.stop_deadline]
        if not overdue:
            return
        pids = ", ".join(str(process.pid) for process in overdue[:OVERDUE_LISTED])
        if len(overdue) > OVERDUE_LISTED:
            pids += ", ..."
        logger.warning("%s: %d outlived the grace period (pid %s), SIGKILL to them and all "
                       "they started", self.name, len(overdue), pids)
        for process in overdue:
            self._call_hook("before_signal", pid=process.pid, signum=signal.SIGKILL)
        if kill_trees is None:
            for process in overdue:
                process.kill()
        else:
            kill_trees(overdue)
        for process in overdue:
            self._call_hook("after_signal", pid=process.pid, signum=signal.SIGKILL)

    def next_deadline(self) -> float | None:
        """When ``manage`` next has something to do on its own, if ever."""
        deadlines = [p.stop_deadline for p in self._stopping.values() if not p.killed]
        if self.config.max_age:  # else no child expires: no need to list them
            deadlines += [p.expires for p in self.running() if p.expires is not None]
        unready = list(self._unready.values())
        if self._waiting_on is None and self._waits_to_spawn():
            deadlines.append(self._next_spawn)
        deadlines += [p.ready_by for p in unready]
        if self.config.watchdog_sec:  # as _check_watchdogs: only then
            deadlines += [p.watchdog_at for p in self.running() if p.watchdog_at is not None]
        if unready and self.config.ready != "notify":
            deadlines.append(self._probe_at)
        if not deadlines:
            return None
        return min(deadlines)

    def _waits_to_spawn(self) -> bool:
        """Whether ``_next_spawn`` is a deadline: a flapping pause ends then,
        or a child is missing, or a rolling reload's next old child may go
        (none stopping, all ready)."""
        if self.state == FLAPPING:
            return True
        if self.state not in (STARTING, ACTIVE):
            return False
        replacing = self._replace and not self._stopping and not self._unready
        return self.running_count() < self.target or bool(replacing)

    def _stop_unwanted(self, now: float) -> None:
        """Stop the children no longer wanted: extras, those past max_age
        and, in a rolling reload, the next old one once the last is gone
        and its replacement (and, with ``ready``, one more) is ready."""
        extra = self.running_count() - self.target
        if extra > 0:
            self.stop_processes(now, [p.pid for p in self.running()[:extra]])
        if self.config.max_age:  # else no child expires: no need to list them
            for process in self.running():
                if process.expires is not None and now >= process.expires:
                    logger.info("%s: pid %d reached max_age", self.name, process.pid)
                    self.stop_processes(now, [process.pid])
        if (self._replace and now >= self._next_spawn and self.running_count() >= self.target
                and not self._stopping and not self._unready):
            self.stop_processes(now, [self._replace.pop(0)])  # if it is still there

    def _fill(self, now: float) -> list[Process]:
        """Spawn up to SPAWN_BATCH missing children, in the lowest free wids;
        the worker's next turn (at once: the deadline is now) spawns more,
        so a large ``incr`` never keeps the worker from its other jobs."""
        config = self.config
        spawned: list[Process] = []
        missing = min(self.target - self.running_count(), SPAWN_BATCH)
        free = self._free_wids()
        while len(spawned) < missing and now >= self._next_spawn and self._waiting_on is None:
            if not self._may_spawn():
                break
            wid = next(free)
            try:
                process = self._spawn(config, wid, now)
            except Exception as exc:  # noqa: BLE001 - any failure to spawn is one
                self._spawn_failed(now, exc)
                break
            self.retries = 0
            process.ready = not config.ready
            process.ready_by = now + config.ready_timeout
            self._wids.add(wid)
            self._changes += 1
            if not process.ready:
                self._unready[process.pid] = process
            process.watchdog_sec = config.watchdog_sec
            if process.ready and config.watchdog_sec:  # start-up done: armed, as systemd
                process.watchdog_at = now + config.watchdog_sec
            self.processes[process.pid] = process
            spawned.append(process)
            logger.info("%s: spawned pid %d (wid %d)", self.name, process.pid, wid)
            if self._respawn_due:  # a replacement: how long since its predecessor died
                self.respawn_latencies.append(time.monotonic() - self._respawn_due.popleft())
            self.emit("spawn", process_pid=process.pid)
            if self._has_hook("after_spawn"):
                self._wait_for_hook("after_spawn", functools.partial(
                    self._after_spawn_done, process.pid), pid=process.pid)
            if config.warmup_delay:
                self._next_spawn = now + config.warmup_delay
        return spawned

    def _may_spawn(self) -> bool:
        """Whether a spawn may go ahead now: always, or with a before_spawn
        hook, once it has passed one (it is called, and the spawns wait)."""
        if not self._has_hook("before_spawn"):
            return True
        if self._spawns_allowed:
            self._spawns_allowed -= 1
            return True
        self._wait_for_hook("before_spawn", self._before_spawn_done)
        return False

    def _before_spawn_done(self, passed: bool, now: float) -> None:
        """The before_spawn hook's outcome: one spawn more, or stop."""
        if self.state not in (STARTING, ACTIVE):
            return
        if passed:
            self._spawns_allowed += 1
        else:
            self._refuse_start("before_spawn", now)

    def _after_spawn_done(self, pid: int, passed: bool, now: float) -> None:
        """The after_spawn hook's outcome: spawn on, or stop (with it)."""
        if not passed and self.state in (STARTING, ACTIVE):
            self._refuse_start("after_spawn", now, f" (pid {pid})")

    def _spawn_failed(self, now: float, exc: Exception) -> None:
        """Note a spawn that raised ``exc``: try again ``retry_in`` later,
        or give up (stop) past ``max_retry`` failures in a row."""
        self.retries += 1
        limit = self.config.max_retry
        attempts = "unlimited"
        if limit >= 0:
            attempts = str(limit + 1)
        self.spawn_failures += 1
        self.spawn_error = f"spawn failed (attempt {self.retries} of {attempts}): {exc}"
        logger.error("%s: %s", self.name, self.spawn_error)
        self._next_spawn = now + self.config.retry_in
        if 0 <= limit < self.retries:
            self.last_error = f"spawn failed {self.retries} times: {exc}"
            logger.error("%s: giving up: %s", self.name, self.last_error)
            self.stop(now)

    def _free_wids(self) -> Iterator[int]:
        """The wids no child holds, lowest first, found as they are taken."""
        return (wid for wid in itertools.count(1) if wid not in self._wids)

    def mark_ready(self, process: Process) -> None:
        """Note that a child passed its ``ready`` check (or sent READY=1)."""
        if not process.ready and not process.stopping:
            process.ready = True
            self._unready.pop(process.pid, None)
            logger.info("%s: pid %d is ready", self.name, process.pid)
            self.emit("ready", process_pid=process.pid)

    def _check_ready(self, now: float) -> None:
        """Probe tcp: and file: checks every READY_POLL; a child not ready
        by its deadline is replaced, as a quick crash (the backoff applies)."""
        unready = list(self._unready.values())
        probe = self.config.ready != "notify" and now >= self._probe_at
        for process in unready:
            if not self.config.ready or probe and probe_ready(self.config.ready, process.wid):
                self.mark_ready(process)
            elif now >= process.ready_by:
                logger.warning("%s: pid %d not ready within %gs, replacing it", self.name,
                               process.pid, self.config.ready_timeout)
                process.stop_reason = f"not ready within {self.config.ready_timeout:g}s"
                self.stop_processes(now, [process.pid])
                self._note_crash(now, 0.0)
        if unready and probe:
            self._probe_at = now + READY_POLL

    def _check_watchdogs(self, now: float) -> None:
        """Arm the watchdog of each child once it is ready (as systemd, when
        start-up is done), and abort each whose watchdog ran out: SIGABRT
        (systemd's choice: a core dump shows where it hung), SIGKILL after
        ``graceful_timeout``, replaced as a crash unless ``restart = never``."""
        for process in self.running():
            if process.stopping or self.state not in (STARTING, ACTIVE):
                continue  # a flap (or stop) meanwhile stopped it: counted once, if at all
            if process.watchdog_at is None and process.ready and process.watchdog_sec:
                process.watchdog_at = now + process.watchdog_sec
            elif process.watchdog_at is not None and now >= process.watchdog_at:
                logger.warning("%s: pid %d sent no WATCHDOG=1 within %gs, aborting it",
                               self.name, process.pid, process.watchdog_sec)
                process.stop_reason = "watchdog timeout"
                process.watchdog_at = None
                self.stop_processes(now, [process.pid], signal.SIGABRT)
                self._count_failure(now, process)

    def _count_failure(self, now: float, process: Process) -> None:
        """A child stopped as failed (its watchdog ran out): under the
        restart policy, its slot is refilled as after a crash, or left empty."""
        if self.config.restart == "never":
            self._finished += 1
            return
        self._note_crash(now, now - process.started)

    def feed_watchdog(self, process: Process, now: float, message: bytes) -> None:
        """Take one watchdog line a child sent (see sd_notify(3)):
        ``WATCHDOG=1`` restarts its watchdog, ``WATCHDOG=trigger`` makes it
        run out now, ``WATCHDOG_USEC=N`` sets a new interval (0: none).  Only
        for a watcher with a ``watchdog_sec``.  Worker thread."""
        if not self.config.watchdog_sec or process.stopping:
            return  # no watchdog: its messages change nothing
        if message.startswith(b"WATCHDOG_USEC="):
            with contextlib.suppress(ValueError):  # a malformed line is ignored, as systemd does
                process.watchdog_sec = max(0.0, min(int(message[14:]) / 1e6, MAX_SECONDS))
        if not process.watchdog_sec:  # WATCHDOG_USEC=0: off for this process, as systemd
            process.watchdog_at = None
            return
        process.watchdog_at = now + process.watchdog_sec
        if message == b"WATCHDOG=trigger":
            process.watchdog_at = now


# =============================================================== Hooks ======
# Circus's hooks: a watcher option ``hooks.NAME = module.function`` names a
# callable that runs at a step of the watcher's life, with Circus's keyword
# arguments (``watcher``, ``arbiter``, ``hook_name`` and the step's own).  A
# false result or a failure of before_start, after_start, before_spawn or
# after_spawn stops the start; a false result of before_signal keeps a
# signal (SIGKILL aside) from being sent; the other results are ignored.
# A failure (an exception, or no result within ``hook_timeout``) counts as
# a true result where it is ignored: for before_stop, after_stop,
# before_signal, after_signal and extended_stats, and for any hook written
# with ``, true``.  Each call runs in a thread of its own, one call at a
# time per watcher, in the order asked, so a slow hook holds only its own
# watcher; the hook gets read-only snapshots (HookWatcher, HookArbiter)
# taken on the worker, never the worker's own objects.

#: Held while a hook thread loads a module from the config folder (two hook
#: threads must not run one module's code twice, nor see it half run); the
#: modules on sys.path have importlib's own locks.  One of the module's three
#: locks (see the docstring's Threads).
HOOK_IMPORT_LOCK = threading.Lock()
#: How long a Daemon's stop waits for the threads of hooks past their timeout.
HOOK_JOIN_TIMEOUT = 1.0
#: The hooks whose failure is ignored unless the config says otherwise (Circus's list).
HOOK_FAILURES_IGNORED = ("before_stop", "after_stop", "before_signal", "after_signal",
                         "extended_stats")


def _import_module_from(name: str, folder: str | None) -> None:
    """Make the top-level module of ``name`` importable: it is on
    ``sys.path``, or it is loaded from ``folder`` (the config file's, as
    Circus looks there too) without adding the folder to ``sys.path``.
    Raise ImportError if neither has it."""
    import importlib.machinery  # here: only a daemon with hooks imports them
    import importlib.util
    top = name.partition(".")[0]
    with HOOK_IMPORT_LOCK:
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            return
        spec = None
        if folder is not None:
            spec = importlib.machinery.PathFinder.find_spec(top, [folder])
        if spec is None or spec.loader is None:
            raise ImportError(f"no module {top!r} on sys.path or in "
                              f"{folder or 'the config folder'}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[top]  # a half-run module must not be found next time
            raise


def load_hook(name: str, folder: str | None) -> Callable[..., Any]:
    """The callable ``name`` names, ``package.module.function`` or
    ``package.module:function``, imported as Circus's hooks are: from
    ``sys.path`` or else ``folder``.  Runs the module's code the first
    time, so only a hook thread calls it.  Raise ImportError,
    AttributeError or TypeError."""
    import importlib  # here: only a daemon with hooks imports them
    separator = "."
    if ":" in name:
        separator = ":"
    module_name, attribute = name.rsplit(separator, 1)
    _import_module_from(module_name, folder)
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise TypeError(f"{name} is not callable")
    return function


@dataclasses.dataclass(frozen=True)
class HookProcess:
    """A child as a hook sees it: Circus's ``watcher.processes`` values."""

    pid: int
    wid: int
    started: float  # wall clock (time.time())


@dataclasses.dataclass(frozen=True)
class HookArbiter:
    """The daemon as a hook sees it (``arbiter``): to change anything, a
    hook sends a command to ``endpoint`` (``minisup.Client``)."""

    endpoint: str
    pubsub_endpoint: str | None
    watchers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HookWatcher:
    """A watcher as a hook sees it (``watcher``), taken on the worker when
    the hook is called: what hooks in the wild read of Circus's Watcher."""

    name: str
    status: str
    numprocesses: int
    processes: dict[int, HookProcess]
    env: dict[str, str]
    cmd: str
    args: list[str]
    working_dir: str | None
    stdout_stream: dict[str, Any]
    stderr_stream: dict[str, Any]
    options: dict[str, Any]
    arbiter: HookArbiter


def hook_watcher(watcher: Watcher, arbiter: HookArbiter) -> HookWatcher:
    """A snapshot of ``watcher`` for a hook; on the worker thread."""
    config = watcher.config
    processes = {p.pid: HookProcess(p.pid, p.wid, p.started_at)
                 for p in watcher.processes.values()}
    return HookWatcher(watcher.name, watcher.state, watcher.numprocesses, processes,
                       dict(config.env), config.cmd, list(config.args), config.working_dir,
                       dict(config.stdout_stream), dict(config.stderr_stream),
                       watcher.options(), arbiter)


class HookCall:
    """One call of one watcher's hook: made on the worker, run by a hook
    thread, which touches nothing else and hands back its outcome with
    ``call_on_worker``."""

    def __init__(self, watcher: str, name: str, kwargs: dict[str, Any],
                 then: Callable[[bool, float], None] | None, spec: list[Any],
                 timeout: float) -> None:
        """A call of ``watcher``'s hook ``name`` (``spec``: [callable's name,
        ignore_failure]) with ``kwargs``, failed after ``timeout`` seconds."""
        self.watcher = watcher
        self.name = name  # the hook: before_start ...
        self.function = spec[0]  # the callable's dotted name
        self.ignored = spec[1] or name in HOOK_FAILURES_IGNORED  # a failure passes
        self.kwargs = kwargs
        self.then = then  # on the worker, with (passed, now), once it is over
        self.error: str | None = None  # what failed, once over (None: it returned)
        self.timeout = timeout
        self.deadline = math.inf  # set when its thread starts
        self.over = False  # answered, or timed out (a late answer is dropped)


def run_hook_call(call: HookCall, folder: str | None,
                  deliver: Callable[[HookCall, bool, str | None], None]) -> None:
    """The body of a hook thread: import and call ``call``'s hook, then
    ``deliver(call, result, error)`` (error: None, or what failed).  Never
    raises: whatever the hook does is its outcome."""
    try:
        function = load_hook(call.function, folder)
        result = function(**call.kwargs)
    except BaseException as exc:  # SystemExit too: the hook failed, not the daemon
        logger.warning("%s: hook %s (%s) failed", call.watcher, call.name, call.function,
                       exc_info=True)
        deliver(call, False, f"{type(exc).__name__}: {exc}")
        return
    deliver(call, bool(result), None)


class HookRunner:
    """Runs the watchers' hooks off the worker thread: one call at a time
    per watcher, in the order asked, each in a thread of its own so that a
    hook that hangs past its timeout holds nothing.  Owned by the worker."""

    def __init__(self, call_on_worker: Callable[[Callable[[], Any]], None],
                 emit: Callable[[str, dict[str, Any]], None], clock: Callable[[], float],
                 arbiter: Callable[[], HookArbiter], folder: str | None) -> None:
        """A runner handing outcomes back by ``call_on_worker``, publishing
        by ``emit``, timing by ``clock``; ``arbiter`` makes a HookArbiter
        and ``folder`` is where hook modules may live besides sys.path."""
        self._call_on_worker = call_on_worker
        self._emit = emit
        self._clock = clock
        self._arbiter = arbiter  # a HookArbiter of the daemon now
        self.folder = folder  # the config file's: hook modules may live there
        self._chains: dict[str, collections.deque[HookCall]] = {}  # the running call first
        self._threads: list[tuple[threading.Thread, HookCall]] = []

    def call(self, watcher: Watcher, name: str, kwargs: dict[str, Any],
             then: Callable[[bool, float], None] | None = None) -> HookCall | None:
        """Have ``watcher``'s hook ``name`` called with ``kwargs`` after its
        earlier calls, then ``then(passed, now)`` on the worker; at once
        with passed True if it has no such hook (None is returned then).
        Worker thread."""
        spec = watcher.config.hooks.get(name)
        if spec is None:
            if then is not None:
                then(True, self._clock())
            return None
        arbiter = self._arbiter()
        arguments = {"watcher": hook_watcher(watcher, arbiter), "arbiter": arbiter,
                     "hook_name": name, **kwargs}
        chain = self._chains.setdefault(watcher.name, collections.deque())
        call = HookCall(watcher.name, name, arguments, then, spec, watcher.config.hook_timeout)
        chain.append(call)
        if len(chain) == 1:
            self._start(call)
        return call

    def _start(self, call: HookCall) -> None:
        """Run ``call`` in a new thread, its deadline from now."""
        call.deadline = self._clock() + call.timeout
        thread = threading.Thread(target=run_hook_call, args=(call, self.folder, self._deliver),
                                  name=f"minisup-hook-{call.watcher}-{call.name}", daemon=True)
        self._threads = [(t, c) for t, c in self._threads if t.is_alive()]
        self._threads.append((thread, call))
        thread.start()

    def _deliver(self, call: HookCall, passed: bool, error: str | None) -> None:
        """A hook thread's outcome, sent to the worker.  Any thread."""
        self._call_on_worker(functools.partial(self._conclude, call, passed, error))

    def _conclude(self, call: HookCall, passed: bool, error: str | None) -> None:
        """End ``call`` (worker): publish hook_success or hook_failure, start
        the watcher's next call, then tell the caller.  A failure passes
        where it is ignored; an answer after a timeout is dropped."""
        if call.over:
            logger.info("%s: hook %s answered after its timeout: ignored", call.watcher,
                        call.name)
            return
        call.over = True
        call.error = error
        payload = {"name": call.name, "time": time.time()}
        if error is None:
            self._emit(f"watcher.{call.watcher}.hook_success", payload)
        else:
            passed = call.ignored
            self._emit(f"watcher.{call.watcher}.hook_failure", {**payload, "error": error})
        chain = self._chains[call.watcher]
        chain.popleft()
        if chain:
            self._start(chain[0])
        else:
            del self._chains[call.watcher]
        if call.then is not None:
            call.then(passed, self._clock())

    def expire(self, now: float) -> None:
        """Fail each running call past its deadline (its thread is left to
        finish on its own: Python cannot stop a thread).  Worker thread."""
        for chain in list(self._chains.values()):
            call = chain[0]
            if now >= call.deadline:
                logger.warning("%s: hook %s ran past its %gs hook_timeout", call.watcher,
                               call.name, call.timeout)
                self._conclude(call, False, f"no result within {call.timeout:g}s")

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to do, if ever."""
        deadlines = [chain[0].deadline for chain in self._chains.values()]
        if not deadlines:
            return None
        return min(deadlines)

    @property
    def busy(self) -> bool:
        """Whether a call is running or queued: a quit waits for them."""
        return bool(self._chains)

    def abandon(self) -> None:
        """Drop every queued call and stop waiting for the running ones
        (their answers, if they come, are dropped): a forced quit, or a
        quit's wait for hooks that ran out.  Worker thread."""
        for chain in self._chains.values():
            for call in chain:
                call.over = True
                call.error = "abandoned"
        if self._chains:
            logger.warning("hooks still queued or running, abandoned: %s",
                           ", ".join(f"{c[0].watcher}.{c[0].name}" for c in self._chains.values()))
        self._chains.clear()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for the hook threads that
        answered and are ending (the Daemon's stop); those of hooks past
        their timeout, or abandoned, are left: they may never end."""
        deadline = time.monotonic() + timeout
        for thread, call in self._threads:
            if call.error is None:
                thread.join(max(0.0, deadline - time.monotonic()))


# ============================================================= Arbiter ======
# The worker thread's side: the Arbiter owns the watchers and runs the loop,
# with three parts of its own, each with one job: a JobRunner (commands from
# other threads, and the replies), a Reaper (the children's deaths: pidfds,
# waitid, orphans, the guardian) and a SystemdNotifier.  All four are owned
# by the worker thread; other threads only call ``submit`` and
# ``call_on_worker``, which queue and wake it.

#: The respawn histogram's bounds, in seconds: a replacement after a death
#: seen by pidfd takes milliseconds, one after a crash loop's backoff seconds.
RESPAWN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class Histogram:
    """Observations counted as a Prometheus histogram counts them: how many
    at or below each bound, their sum and their number.  Owned by one
    thread (the worker's: the respawn times)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        """An empty histogram over ``bounds`` (in increasing order)."""
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # cumulative: at or below each bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count ``value``."""
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def figures(self) -> dict[str, Any]:
        """The histogram as JSON-ready values."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum,
                "count": self.count}


class Pending(NamedTuple):
    """A deferred reply: answered once ``done()`` holds, with ``result()``."""

    done: Callable[[], bool]
    result: Callable[[], dict[str, Any]]


class Job(NamedTuple):
    """One command for the worker thread: ``handler(arbiter, properties)``
    returns a result dict or a Pending; ``reply`` is then called once, on
    the worker, with its Reply."""

    command: str
    handler: Callable[[Arbiter, dict[str, Any]], dict[str, Any] | Pending]
    properties: dict[str, Any]
    reply: Callable[[Reply], None]
    seq: int = 0  # the controller numbers its jobs: see View


class View(NamedTuple):
    """Replies to reads as a tick ends, by (command, watcher name or None),
    for the controller to serve once the worker has run every job it was
    handed (``seq``): a read never overtakes a change.  Never modified."""

    seq: int
    replies: dict[tuple[str, str | None], dict[str, Any]]


def answer(command: str, call: Callable[..., Any], *args: Any) -> Reply | Pending:
    """Run ``call(*args)``, the work of ``command``, and make what it
    returns or raises into its Reply (a Pending stays one): a failure is
    an error reply, never lost.  On the worker thread."""
    try:
        result = call(*args)
    except MinisupError as exc:
        return Reply.refusal(exc)
    except OSError as exc:
        return Reply({}, OS_ERROR, str(exc))
    except Exception as exc:  # noqa: BLE001 - logged with its traceback
        return server_error(command, exc)
    if isinstance(result, Pending):
        return result
    return Reply(result)


def ignore_reply(reply: Reply) -> None:
    """Where the reply of a cast goes: nowhere, errors included."""


#: Commands still served while the daemon shuts down.
SHUTDOWN_COMMANDS = {"list", "status", "numprocesses", "numwatchers", "quit", "options", "get",
                     "metrics",
                     "globaloptions", "stats", "dstats", "listsockets"}


def _call_logged(function: Callable[[], Any]) -> None:
    """Call ``function()`` for ``call_on_worker``; a failure is logged with
    its traceback, never allowed to end the worker's loop."""
    try:
        function()
    except Exception:  # logged; the loop must go on
        logger.exception("a call on the worker thread failed")


class JobRunner:
    """The worker's queue of jobs (commands, from the controller) and of
    calls (from the output thread, signal handlers and itself) to make on
    the worker thread.  ``submit`` and ``call_on_worker`` are for any thread
    and never block; ``run_queued`` and ``send_replies`` are the worker's."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake  # the worker's waker: the queue's other half
        self._queue: queue.SimpleQueue[Job | Callable[[], Any]] = queue.SimpleQueue()
        self._replies: list[tuple[Job, Reply | Pending]] = []  # sent as the tick ends
        self.seq = 0  # the last controller job run (see View)

    def submit(self, job: Job) -> None:
        """Queue a job and wake the worker.  Any thread; never blocks."""
        self._queue.put(job)
        self._wake()

    def call_on_worker(self, function: Callable[[], Any]) -> None:
        """Have the worker thread call ``function()`` at its next turn, so
        that only it touches what it owns.  Any thread, signal handlers
        included (a queue put and a pipe write); never blocks."""
        self._queue.put(function)
        self._wake()

    def run_queued(self, arbiter: Arbiter, quitting: bool) -> None:
        """Run every queued call, and every job (while ``quitting``, only
        those in SHUTDOWN_COMMANDS; the others are refused), keeping their
        replies for ``send_replies``.  On the worker thread."""
        while not self._queue.empty():  # we alone take from it: get won't block
            item = self._queue.get()
            if not isinstance(item, Job):
                _call_logged(item)
                continue
            self.seq = max(self.seq, item.seq)
            if quitting and item.command not in SHUTDOWN_COMMANDS:
                reply: Reply | Pending = Reply.refusal(
                    MinisupError("the daemon is shutting down"))
            else:
                reply = answer(item.command, item.handler, arbiter, item.properties)
            self._replies.append((item, reply))

    def send_replies(self, done: bool) -> None:
        """Reply to each job whose outcome is known: at once, or a
        Pending's once done (or once the daemon is: ``done``).  On the
        worker thread, as a tick ends."""
        replies = self._replies
        self._replies = []
        for job, reply in replies:
            if isinstance(reply, Pending):
                if reply.done():
                    reply = answer(job.command, reply.result)
                elif done:
                    reply = Reply.refusal(MinisupError("the daemon quit first",
                                                       BAD_MSG_DATA_ERROR))
                else:
                    self._replies.append((job, reply))
                    continue
            job.reply(reply)


#: The guardian helper (see Reaper.start_guardian), run as python -S -c.
#: Its lines: +PID / -PID a group to kill or not, cPATH a cgroup subtree to
#: empty and remove, tTAG the environment tag of orphans to kill.
GUARDIAN_CODE = """import os, select, signal, sys, time
groups, trees, tags = set(), [], []
for line in sys.stdin.buffer:
    kind, value = line[:1], line[1:].rstrip(b"\\n")
    if kind == b"+": groups.add(int(value))
    elif kind == b"-": groups.discard(int(value))
    elif kind == b"c": trees.append(value.decode())
    elif kind == b"t": tags.append(b"\\0MINISUP_OWNER=" + value)
def kill(pid):
    try: os.kill(pid, signal.SIGKILL)
    except OSError: pass
for group in groups:
    try: os.killpg(group, signal.SIGKILL)
    except OSError: pass
for pid in os.listdir("/proc") if tags else ():
    try: environ = b"\\0" + open(f"/proc/{pid}/environ", "rb").read()
    except (OSError, ValueError): continue
    if any(tag in environ for tag in tags): kill(int(pid))
def wait_empty(folder, deadline):
    try: fd = os.open(folder + "/cgroup.events", os.O_RDONLY)
    except OSError: return
    poller = select.poll()
    poller.register(fd, select.POLLPRI)
    while b"populated 1" in os.pread(fd, 256, 0) and time.monotonic() < deadline:
        poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
    os.close(fd)
for tree in trees:
    try: watchers = [e.path for e in os.scandir(tree) if e.name.startswith("w.")]
    except OSError: continue  # removed by the daemon as it stopped: nothing left
    for folder in watchers:
        try: open(folder + "/cgroup.kill", "w").write("1")
        except OSError:  # no cgroup.kill (before Linux 5.14): each pid, below too
            for below, _, _ in os.walk(folder):
                try: [kill(int(p)) for p in open(below + "/cgroup.procs")]
                except OSError: pass
    deadline = time.monotonic() + 5
    for folder in watchers: wait_empty(folder, deadline)
    for folder in [d for d, _, _ in os.walk(tree, topdown=False)]:
        try: os.rmdir(folder)
        except OSError: pass"""


def tagged_owner(pid: int, tag: str) -> str | None:
    """The watcher named by the OWNER_VARIABLE of ``pid``'s environment, if
    it starts with ``tag`` (this daemon's), else None: how a fallback-mode
    orphan that left its group and session is traced back."""
    prefix = f"\0{OWNER_VARIABLE}={tag}".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            environ = b"\0" + stream.read()
    except OSError:  # gone, or not ours to read
        return None
    start = environ.find(prefix)
    if start < 0:
        return None
    end = environ.find(b"\0", start + 1)
    if end < 0:
        end = len(environ)
    return environ[start + len(prefix):end].decode(errors="replace")


def group_owner(pid: int, known: dict[int, Any]) -> Any:
    """What ``known`` (by pid) holds for the leader of ``pid``'s process
    group, else of its session, else None: how an orphan or a shell's
    helper is tied to the child that started it."""
    try:
        fields = read_stat(pid)
    except (OSError, ValueError):  # gone meanwhile
        return None
    group = int(fields[2])
    if group in known:
        return known[group]
    return known.get(int(fields[3]))  # its session


class Reaper:
    """The worker's side of children's deaths: a pidfd per child in the
    worker's ``selector``, waitid and Popen.poll to reap, in subreaper mode
    the orphans that re-parent to the daemon, and the guardian helper.
    Owned by the worker thread; ``notice_child_exit`` alone is for a signal
    handler."""

    def __init__(self, selector: selectors.BaseSelector, subreaper: bool) -> None:
        self.selector = selector  # the worker's, shared with the Arbiter's loop
        self.subreaper = subreaper
        self.unwatched = 0  # children with no pidfd (an old kernel): polled
        self.orphans_died = False  # SIGCHLD came: a flag a signal handler may set
        self._strays: dict[int, Watcher | None] = {}  # live adopted orphans, by owner
        self._killed_orphans: set[int] = set()  # SIGKILLed, not yet reaped
        self._guardian: subprocess.Popen | None = None
        self._guardian_news: list[str] = []  # lines for it: see flush_guardian
        self.owner_tag: str | None = None  # fallback mode: the Arbiter's owner_tag

    def start_guardian(self, cgroup: str | None = None, tag: str | None = None) -> None:
        """Start the helper that kills every child should this process die
        without stopping them, even by SIGKILL: it reads lines from a pipe
        only we write, which the kernel closes however we die.  On EOF it
        SIGKILLs the process groups it holds, every process whose
        environment has ``tag``, and everything in the ``cgroup`` subtree,
        which it then removes."""
        try:
            self._guardian = subprocess.Popen([sys.executable, "-S", "-c", GUARDIAN_CODE],
                                              stdin=subprocess.PIPE, bufsize=0, process_group=0)
        except OSError as exc:  # an embedded Python may have no executable
            logger.warning("no guardian (%s): children would outlive a crash", exc)
            return
        if cgroup is not None:
            self.tell_guardian("c", cgroup)
        if tag is not None:
            self.tell_guardian("t", tag)
        self.flush_guardian()

    def tell_guardian(self, sign: str, value: int | str) -> None:
        """Tell the guardian to hold (``+``) or forget (``-``) a pid's
        group, or (``c``, ``t``) a cgroup or tag (see start_guardian), at
        the next ``flush_guardian``: one write a turn, not one a child."""
        if self._guardian is not None:
            self._guardian_news.append(f"{sign}{value}\n")

    def flush_guardian(self) -> None:
        """Write what tell_guardian queued; by the worker at the end of each
        turn, before it blocks.  If the guardian is gone, say so once and
        go on without it."""
        if not self._guardian_news or self._guardian is None:
            return
        news = memoryview("".join(self._guardian_news).encode())
        self._guardian_news.clear()
        try:
            while news:  # unbuffered: a signal may cut a long write short
                news = news[self._guardian.stdin.write(news):]
        except OSError as exc:
            logger.error("the guardian is gone (%s): children now outlive a crash", exc)
            self._guardian.kill()
            self._guardian.wait()
            self._guardian = None

    def watch(self, watcher: Watcher, process: Process) -> None:
        """Start watching a new child: the guardian holds its group and its
        pidfd wakes the worker's selector when it dies."""
        self.tell_guardian("+", process.pid)
        process.watched = True
        if process.pidfd is None:
            self.unwatched += 1
        else:
            self.selector.register(process.pidfd, selectors.EVENT_READ, (watcher, process))

    def unwatch(self, process: Process) -> None:
        """Stop watching a child that exited (idempotent); its pidfd is closed."""
        if not process.watched:
            return
        process.watched = False
        if process.pidfd is None:
            self.unwatched -= 1
        else:
            self.selector.unregister(process.pidfd)
            process.close()

    @staticmethod
    def has_exited(process: Process) -> bool:
        """Whether the child is dead, without reaping it: a zombie keeps
        its pid and group until ``collect`` reaps it."""
        with contextlib.suppress(ChildProcessError):  # reaped: Popen.poll will say so
            # WNOWAIT, a peek; WNOHANG: None while it runs.
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            if os.waitid(os.P_PID, process.pid, flags) is None:
                return False
        return True

    def collect(self, process: Process) -> int | None:
        """Reap a dead child and forget it; return its exit code (-signum
        if killed), or None if it was reaped elsewhere meanwhile."""
        code = process.popen.poll()
        if code is None:
            return None  # reaped elsewhere meanwhile; the sweep will catch it
        self.tell_guardian("-", process.pid)
        self.unwatch(process)
        return code

    def notice_child_exit(self) -> None:
        """SIGCHLD arrived (subreaper mode): look for orphans at the next
        turn.  Safe in a signal handler: it sets a flag (the caller wakes
        the worker)."""
        self.orphans_died = True

    def should_adopt(self, exited: bool, quiet: bool) -> bool:
        """Whether this turn looks for orphans: in subreaper mode, when a
        child died, SIGCHLD came, a killed orphan awaits reaping, or on a
        quiet turn."""
        return self.subreaper and (exited or self.orphans_died or quiet
                                   or bool(self._killed_orphans))

    def adopt_orphans(self, known: dict[int, Watcher | None],
                      watchers: dict[str, Watcher] | None = None) -> None:
        """Reap the dead among our unknown children (orphans re-parented to
        us, subreaper mode) and note which watcher each live one belongs
        to (``known``: every child's pid -> its watcher), by its process
        group or session, else by the tag in its environment (``watchers``
        by name), when that is knowable.  Before reaping the children: a
        dead leader's pid still names its orphans' group and session as
        long as it is a zombie."""
        self.orphans_died = False
        known = dict(known)
        if self._guardian is not None:
            known[self._guardian.pid] = None
        for pid in children_of() - known.keys():
            dead = pid  # if ChildProcessError: reaped already
            with contextlib.suppress(ChildProcessError):
                dead = os.waitpid(pid, os.WNOHANG)[0]  # 0: still alive
            if dead:
                self._strays.pop(pid, None)
                self._killed_orphans.discard(pid)
                logger.info("reaped orphan pid %d", pid)
            elif pid not in self._strays and pid not in self._killed_orphans:
                self._adopt(pid, known, watchers or {})

    def reap_dead_orphans(self, known: Callable[[int], bool]) -> None:
        """Reap the dead orphans without listing every child, for cgroup
        mode, where a live orphan needs no watch (its cgroup dies with its
        watcher): peek at the next zombie (waitid P_ALL, WNOWAIT) and reap
        it if no watcher knows it (``known(pid)``); a known child's stops
        the peeking (its pidfd has it), and the next turn peeks again."""
        self.orphans_died = False
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no child at all
                return
            if found is None:  # no zombie
                return
            guardian = self._guardian is not None and found.si_pid == self._guardian.pid
            if known(found.si_pid) or guardian:
                self.orphans_died = True  # more may wait behind it
                return
            with contextlib.suppress(ChildProcessError):  # reaped meanwhile
                os.waitpid(found.si_pid, 0)  # a zombie: returns at once
            logger.info("reaped orphan pid %d", found.si_pid)

    def _adopt(self, pid: int, known: dict[int, Watcher | None],
               watchers: dict[str, Watcher]) -> None:
        """Note a live orphan and the watcher it belongs to, if any."""
        owner = group_owner(pid, known)
        if owner is None and self.owner_tag is not None:
            owner = watchers.get(tagged_owner(pid, self.owner_tag))
        self._strays[pid] = owner
        name = "no known watcher"
        if owner is not None:
            name = owner.name
        logger.info("adopted orphan pid %d (of %s)", pid, name)

    def kill_orphans(self, quit_done: bool) -> None:
        """SIGKILL each orphan whose watcher has stopped with no child left,
        or every orphan once the quit has stopped every watcher."""
        for pid, owner in list(self._strays.items()):
            owner_gone = owner is not None and owner.state == STOPPED and not owner.processes
            if quit_done or owner_gone:
                logger.info("killing orphan pid %d", pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # our child: no pid reuse
                del self._strays[pid]
                self._killed_orphans.add(pid)

    @property
    def orphans_left(self) -> bool:
        """Whether an orphan is still alive or not yet reaped."""
        return bool(self._strays or self._killed_orphans)

    @property
    def polling(self) -> bool:
        """Whether the worker must poll (no pidfd, or orphans to reap)."""
        return bool(self.unwatched or self._killed_orphans)

    def close(self) -> None:
        """Close the guardian's pipe: on EOF it kills what is left, exits."""
        self.flush_guardian()  # the forgotten pids first: none is killed
        if self._guardian is not None:
            self._guardian.communicate()


def sd_notify(address: str | None, *lines: str) -> None:
    """Send systemd's notify datagram to ``address`` (a path, or ``@name``
    in the abstract namespace), if any; log, never raise, never block."""
    if not address or not lines:
        return
    target = address
    if address.startswith("@"):
        target = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                           | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), target)
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address, exc)


class SystemdNotifier:
    """What systemd hears when it runs minisup (``address``: its
    NOTIFY_SOCKET, None if not): READY=1 once every autostart watcher is up
    (again after a reloadconfig), STATUS= as it changes, WATCHDOG=1 twice
    per ``watchdog`` period, STOPPING=1.  Owned by the worker thread, so
    systemd notices if the loop hangs."""

    def __init__(self, address: str | None, watchdog: float) -> None:
        self.address = address
        self.watchdog = watchdog  # seconds (WATCHDOG_USEC), 0: none
        self._watchdog_at = 0.0  # the next WATCHDOG=1
        self._ready_told = False
        self._status_told = ""

    def report(self, now: float, watchers: Iterable[Watcher], quitting: bool) -> None:
        """Tell what changed since the last turn, and the watchdog's ping."""
        if not self.address:
            return
        ready = not quitting and all(w.up and w.settled for w in watchers if w.config.autostart)
        lines = []
        if ready and not self._ready_told:
            lines.append("READY=1")
            self._ready_told = True
        status = self._status(watchers)
        if status != self._status_told:
            lines.append(status)
            self._status_told = status
        if self.watchdog and now >= self._watchdog_at:
            lines.append("WATCHDOG=1")
            self._watchdog_at = now + self.watchdog / 2
        sd_notify(self.address, *lines)

    @staticmethod
    def _status(watchers: Iterable[Watcher]) -> str:
        """``STATUS=2 active, 1 stopped; 5 processes``."""
        states = collections.Counter(w.state for w in watchers)
        counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        return f"STATUS={counts}; {sum(len(w.processes) for w in watchers)} processes"

    def reloading(self) -> None:
        """A reloadconfig begins: say so, and READY=1 again once settled."""
        sd_notify(self.address, "RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self._ready_told = False

    def stopping(self) -> None:
        """The daemon begins to quit."""
        sd_notify(self.address, "STOPPING=1")

    def next_deadline(self) -> float | None:
        """When the watchdog is next due, if there is one."""
        if not self.watchdog:
            return None
        return self._watchdog_at


#: Without pidfds, how often the worker polls each child for its exit.
FALLBACK_POLL = 0.05
#: The longest the worker's selector waits: epoll refuses a timeout over
#: about 24 days (OverflowError), and a year-long check_delay is allowed.
LONGEST_WAIT = 3600.0
#: File descriptors the daemon keeps for its own use, beside its children's.
RESERVED_FDS = 64
#: The most fds the daemon holds for one child: its pidfd and two pipes.
FDS_PER_PROCESS = 3
#: Free fds a spawn must leave the daemon, past process_limit: for clients'
#: connections (libzmq aborts the process when an accept finds none).
SPARE_FDS = 16


def process_limit(max_processes: int) -> tuple[int, str]:
    """How many processes, over every watcher, the daemon may keep, and
    what sets that: ``max_processes`` if not 0, else the daemon's fd limit
    (FDS_PER_PROCESS each) or the kernel's pid_max, whichever is lower."""
    if max_processes:
        return max_processes, "[circus] max_processes"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_fds = max(1, (soft - RESERVED_FDS) // FDS_PER_PROCESS)
    by_pids = MAX_PROCESSES
    # No /proc, or an odd one: the kernel's ceiling stands.
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/kernel/pid_max") as stream:
        by_pids = int(stream.read())
    if by_pids < by_fds:
        return by_pids, "the kernel's pid_max"
    return by_fds, (f"the daemon's fd limit of {soft}, {FDS_PER_PROCESS} a process: raise the "
                    "hard limit (LimitNOFILE= in systemd, ulimit -Hn as root, nofile in "
                    "limits.conf), or set [circus] max_processes")


def stop_stages(watchers: list[Watcher]) -> list[list[Watcher]]:
    """Groups of ``watchers`` to stop one after the other: each watcher
    after those that depend on it, and lower priority first."""
    @functools.cache
    def depth(watcher: Watcher) -> int:
        """The watcher's longest chain of dependents (checked: no cycle)."""
        return max((depth(d) + 1 for d in watchers if watcher.name in d.config.depends_on),
                   default=0)
    keys = sorted({(depth(w), w.config.priority) for w in watchers})
    return [[w for w in watchers if (depth(w), w.config.priority) == key] for key in keys]


def _priority_first(watcher: Watcher) -> int:
    """Sort key: higher ``priority`` first."""
    return -watcher.config.priority


def _by_fd(info: dict[str, Any]) -> int:
    """Sort key of ``socket_infos``."""
    return info["fd"]


class Arbiter:
    """Owns every watcher and process; ``run`` is the worker thread.
    Other threads only call ``submit`` and ``call_on_worker``.  ``poll``
    and ``tick`` are the two halves of one loop turn, public so that tests
    can drive an arbiter on a fake clock without a thread.  The Daemon's
    ``pump`` (output thread), ``subreaper``, ``systemd`` and ``watchdog``
    are as the Daemon's."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 pump: Pump | None = None, subreaper: bool = False,
                 systemd: str | None = None, watchdog: float = 0.0) -> None:
        self.config = config
        self.clock = clock
        self.pump = pump
        self.watchers: dict[str, Watcher] = {}
        self.sockets: dict[str, socket.socket] = {}
        self.process_limit = process_limit(config.max_processes)
        # Set by the Daemon once its controller runs: where events go (its
        # PUB socket), what publishes each View, and the endpoints as bound
        # (for globaloptions).
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self.on_view: Callable[[Arbiter, int], None] | None = None
        self.bound_endpoints: dict[str, str | None] = {}
        self.done = False  # the quit is over: ``run`` returns
        self.failed = False  # the loop itself failed
        self._waker = Waker()
        self._selector = selectors.DefaultSelector()  # the waker, pidfds, the notify socket
        self._selector.register(self._waker, selectors.EVENT_READ, None)
        self.jobs = JobRunner(self._waker.wake)
        self.reaper = Reaper(self._selector, subreaper)
        self.systemd = SystemdNotifier(systemd, watchdog)
        self._retiring: list[Watcher] = []  # removed by rm, children not gone
        self._stop_plans: list[list[list[Watcher]]] = []  # staged stops: ``stop``s, the quit
        self._quit_stages: list[list[Watcher]] | None = None  # the quit's plan, once begun
        self._notify: socket.socket | None = None  # for ``ready = notify`` children
        self._heartbeat: socket.socket | None = None  # Circus's WatchDog plugin's UDP
        self._woke_at = time.monotonic()  # when the loop last woke: a death seen then
        self.respawn_histogram = Histogram(RESPAWN_BUCKETS)  # death seen to new child, s
        self._hooks_deadline: float | None = None  # a quit waits for hooks until then
        self._next_sweep = 0.0  # the next periodic sweep for orphans (see _sweep_turn)
        self._deaths_this_turn = False  # then they wait on: the deaths go first
        folder = None
        if config.source is not None:
            folder = os.path.dirname(os.path.abspath(config.source))
        self.hooks = HookRunner(self.call_on_worker, self._emit, clock, self.hook_arbiter, folder)
        # Containment (see Cgroups), set by open_containment: the cgroup
        # subtree, or in fallback mode the tag of each child's environment.
        self.cgroups: CgroupTree | None = None
        self.spawner: Spawner | None = None  # the Daemon's, once started: see Spawner
        self.containment = {"mode": "process groups", "reason": "no Daemon opened a cgroup"}
        self.owner_tag: str | None = None
        self._lingering: dict[str, Watcher] = {}  # dead children's cgroups not yet empty
        self._released_folders: dict[Watcher, list[str]] = {}  # see _release_with_watcher
        for watcher_config in config.watchers:
            self.add_watcher(watcher_config)

    def submit(self, job: Job) -> None:
        """Queue a job and wake the worker.  Any thread; never blocks."""
        self.jobs.submit(job)

    def call_on_worker(self, function: Callable[[], Any]) -> None:
        """Have the worker call ``function()`` at its next turn.  Any
        thread, signal handlers included; never blocks."""
        self.jobs.call_on_worker(function)

    def notice_child_exit(self) -> None:
        """SIGCHLD arrived (subreaper mode): look for orphans to reap.
        Safe in a signal handler: a flag and a wake-up."""
        self.reaper.notice_child_exit()
        self._waker.wake()

    def run(self) -> None:
        """Serve until quit.  If the loop itself fails, kill every child
        first: a supervisor that dies must not leave orphans behind."""
        try:
            timeout: float | None = 0.0
            while not self.done:
                self.poll(timeout)
                timeout = self.tick()
                self.reaper.flush_guardian()
        except BaseException:
            logger.exception("worker thread failed; killing every child")
            self.failed = True
            self.kill_everything(wait=True)
            raise

    def poll(self, timeout: float | None) -> None:
        """Block until a child exits, a job arrives or ``timeout`` passes;
        reap the dead."""
        events = [key.data for key, _ in self._selector.select(timeout)]
        self._woke_at = time.monotonic()  # when each death seen now was seen (metrics)
        exited = [data for data in events if isinstance(data, tuple)]
        if None in events:
            self._waker.drain()
        if "notify" in events:
            self._read_notifications()
        if "heartbeat" in events:
            self._read_heartbeats()
        if "cgroups" in events:
            self._forget_emptied()
        sweep = self._sweep_turn(events)
        if self.cgroups is None and self.reaper.should_adopt(bool(exited), sweep):
            every = [*self.watchers.values(), *self._retiring]
            self.reaper.adopt_orphans({p.pid: w for w, p in self._all_processes()},
                                      {w.name: w for w in every})
        if self.reaper.unwatched:  # children without a pidfd (an old kernel): each turn
            exited = [(w, p) for w, p in self._all_processes() if p.pidfd is None]
        self._deaths_this_turn = bool(exited)
        for watcher, process in exited:
            self._reap(watcher, process)
        if self.cgroups is not None and self.reaper.should_adopt(bool(exited), sweep):
            self.reaper.reap_dead_orphans(self._knows)

    def _knows(self, pid: int) -> bool:
        """Whether ``pid`` is a child a watcher holds (removed ones' too)."""
        return any(pid in w.processes for w in [*self.watchers.values(), *self._retiring])

    def _sweep_turn(self, events: list[Any]) -> bool:
        """Whether this turn is the periodic sweep for orphans: no event
        woke it and ``check_delay`` has passed since the last (never at or
        below 0).  Not every quiet turn: with 10,000 children, each sweep
        reads every child's list, and a start has a quiet turn per batch.
        A child with a pidfd needs no sweep: its death wakes the selector."""
        if events or self.config.check_delay <= 0:
            return False
        now = self.clock()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self.config.check_delay
        return True

    def tick(self) -> float | None:
        """Run queued jobs and calls, manage watchers and answer finished
        waiters.  Returns how long the loop may block before the next
        deadline."""
        self.jobs.run_queued(self, self._quit_stages is not None)
        now = self.clock()
        self.hooks.expire(now)
        self.manage_watchers(now)
        if self.cgroups is not None and self._may_remove_discarded():
            self.cgroups.remove_discarded()
        # The dict's view, not a list: most ticks, with no systemd, read none of it.
        self.systemd.report(now, self.watchers.values(), self._quit_stages is not None)
        self._bound_hook_wait(now)
        if self._quit_stages == [] and self.cgroups is not None:
            self.reaper.reap_dead_orphans(self._knows)  # the last, killed with their cgroups
        self.done = self.quit_finished
        if self.on_view is not None:  # before the replies: see View
            self.on_view(self, self.jobs.seq)
        # The replies go as the tick ends, not mid-tick, where the woken
        # controller would only wait for the GIL.
        self.jobs.send_replies(self.done)
        return self._timeout(now)

    def _bound_hook_wait(self, now: float) -> None:
        """Once a quit has stopped every child, wait for the hooks still
        queued or running at most the longest hook_timeout, then abandon them."""
        if self._quit_stages != [] or not self.hooks.busy:
            return
        if self._hooks_deadline is None:
            longest = max((w.config.hook_timeout for w in [*self.watchers.values(),
                                                           *self._retiring] if w.config.hooks),
                          default=0.0)
            self._hooks_deadline = now + longest
        elif now >= self._hooks_deadline:
            self.hooks.abandon()

    def _may_remove_discarded(self) -> bool:
        """Whether this turn may remove emptied cgroups (see discard): none
        died in it and no stop is under way, or too many wait."""
        if not self.cgroups.discarded:  # the usual turn: nothing to look at
            return False
        if self.cgroups.discarded > DISCARD_BACKLOG:
            return True
        if self._deaths_this_turn:
            return False
        every = [*self.watchers.values(), *self._retiring]
        return all(w.running_count() == len(w.processes) for w in every)  # none stopping

    def _timeout(self, now: float) -> float:
        """How long the next poll may block: until the nearest deadline of
        a watcher or the systemd watchdog, ``check_delay`` at most (and
        FALLBACK_POLL while some child has no pidfd).  A ``check_delay`` at
        or below 0 means no periodic check, as in Circus."""
        deadlines = [w.next_deadline() for w in [*self.watchers.values(), *self._retiring]]
        deadlines.append(self.systemd.next_deadline())
        deadlines.append(self.hooks.next_deadline())
        deadlines.append(self._hooks_deadline)
        waits = [max(0.0, d - now) for d in deadlines if d is not None]
        if self.config.check_delay > 0:
            waits.append(self.config.check_delay)
        timeout = min([LONGEST_WAIT, *waits])
        if self.cgroups is not None and self.cgroups.discarded:  # see CgroupTree.discard
            return 0.0  # emptied cgroups to remove: the next turn at once
        if self.reaper.polling:
            return min(timeout, FALLBACK_POLL)
        return timeout

    def note_reloading(self) -> None:
        """A reloadconfig begins: tell systemd, and READY=1 once settled."""
        self.systemd.reloading()

    def _read_notifications(self) -> None:
        """Read the datagrams of ``ready = notify`` and ``watchdog_sec``
        children (see _take_notification): they count from a child
        or a process in its group (a shell's systemd-notify, say), known by
        the pid the kernel stamped on it."""
        known = {p.pid: (w, p) for w, p in self._all_processes()}
        with contextlib.suppress(BlockingIOError):  # read them all
            while True:
                data, ancillary, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
                sender = _credentials_pid(ancillary)
                owner = known.get(sender)
                if owner is None:
                    owner = group_owner(sender, known)
                if owner is not None:
                    self._take_notification(owner[0], owner[1], data.splitlines())

    def _take_notification(self, watcher: Watcher, process: Process, lines: list[bytes]) -> None:
        """Act on the lines of one datagram ``process`` sent: READY=1 marks
        it ready, the WATCHDOG lines go to its watcher; others are ignored."""
        if b"READY=1" in lines:
            watcher.mark_ready(process)
        for line in lines:
            if line.startswith(b"WATCHDOG"):
                watcher.feed_watchdog(process, self.clock(), line)

    @property
    def quit_finished(self) -> bool:
        """True once a quit has stopped every child, orphans included, and
        every hook called has run (each within its hook_timeout)."""
        return self._quit_stages == [] and not self.reaper.orphans_left and not self.hooks.busy

    def manage_watchers(self, now: float) -> None:
        """Let each watcher spawn, signal and kill toward its wanted state,
        each staged stop stop its next stage once all before have stopped,
        and orphans die with their watcher, or at quit."""
        tree = functools.cache(children_map)  # read /proc once, if at all
        self._kill_lingering()
        for watcher in [*self.watchers.values(), *self._retiring]:
            kill_trees = functools.partial(self._kill_trees, watcher, tree=tree)
            for process in watcher.manage(now, kill_trees, self._held(watcher)):
                self._watch(watcher, process)
            for latency in watcher.respawn_latencies:
                self.respawn_histogram.observe(latency)
            watcher.respawn_latencies.clear()
        for watcher in self._retiring:
            if not watcher.processes and watcher.state == STOPPED:
                self._remove_watcher_cgroup(watcher)
        self._retiring = [w for w in self._retiring if w.processes or w.state != STOPPED]
        for stages in self._stop_plans:
            self._advance(stages, now)
        self._stop_plans = [stages for stages in self._stop_plans if stages]
        self.reaper.kill_orphans(self._quit_stages == [])

    def _kill_trees(self, watcher: Watcher, processes: list[Process],
                    tree: Callable[[], dict[int, list[int]]]) -> None:
        """SIGKILL children of ``watcher`` and all they started (Watcher's
        ``kill_trees``, on the worker).  When they are all it has and it is
        stopping, its own cgroup goes in one write (cgroup.kill kills the
        whole subtree, dead children's leftovers too, as a stop would):
        10,000 deaf children are not 10,000 reads and writes.  Else, or if
        that write fails, each one's tree."""
        whole = (self.cgroups is not None and watcher.state == STOPPING
                 and self.watchers.get(watcher.name) is watcher  # rm'd: its name may be reused
                 and len(processes) == len(watcher.processes) > 1)
        if whole and self._kill_cgroup(self.cgroups.watcher_folder(watcher.name)):
            for process in processes:
                process.killed = True
                process.with_watcher = True
            return
        for process in processes:  # one by one (or the whole kill failed)
            self._kill_tree(process, tree)

    def _kill_tree(self, process: Process, tree: Callable[[], dict[int, list[int]]]) -> None:
        """SIGKILL a child and all it started (for _kill_trees): its
        cgroup, or in fallback mode its group and its descendants (``tree``,
        a cached children_map), which may have left the group."""
        if process.cgroup is None:
            process.kill(descendants(process.pid, tree()))
            return
        process.kill()
        self._kill_cgroup(process.cgroup)

    def _remove_watcher_cgroup(self, watcher: Watcher) -> None:
        """Remove the cgroup of a watcher ``rm`` took away, once stopped:
        its dead children's cgroups first, discarded or not."""
        if self.cgroups is not None:
            self.cgroups.remove_discarded(self.cgroups.discarded)
            with contextlib.suppress(OSError):  # never made, or re-added meanwhile
                os.rmdir(self.cgroups.watcher_folder(watcher.name))

    def _kill_cgroup(self, folder: str) -> bool:
        """SIGKILL what is in a cgroup; whether it was done (the kernel's
        refusal is logged).  On the worker."""
        try:
            kill_cgroup(folder)
        except OSError as exc:
            logger.error("cannot kill the processes of %s: %s", folder, exc)
            return False
        return True

    def _kill_lingering(self) -> None:
        """Kill what dead children left in their cgroups (with
        ``kill_leftovers = false``) once their watcher stops."""
        for folder, watcher in self._lingering.items():
            if watcher.state == STOPPING and not watcher.processes:
                self._kill_cgroup(folder)

    def _forget_emptied(self) -> None:
        """Remove the cgroups of dead children that are empty now; a
        stopping watcher may be stopped once none of its is left."""
        for folder in self.cgroups.emptied():
            watcher = self._lingering.pop(folder, None)
            if watcher is not None:
                watcher.lingering -= 1

    def _held(self, watcher: Watcher) -> bool:
        """Whether a starting watcher must wait: one it depends on is not up."""
        if watcher.state != STARTING:
            return False
        needed = [self.watchers[n] for n in watcher.config.depends_on if n in self.watchers]
        return not all(w.up for w in needed)

    @staticmethod
    def _advance(stages: list[list[Watcher]], now: float) -> None:
        """Drop the stages of a staged stop that have stopped, and stop the
        next one (each begins once all before it are down)."""
        while stages and all(w.state == STOPPED and not w.processes for w in stages[0]):
            stages.pop(0)
            if stages:
                for watcher in stages[0]:
                    watcher.stop(now)

    def close(self) -> None:
        """Release the sockets, selector, pipe, pidfds and the guardian;
        after ``run``.  Children still alive then die by the guardian."""
        for _, process in self._all_processes():
            process.close()
        for name in list(self.sockets):
            self._close_socket(name)
        if self._notify is not None:
            self._notify.close()
        if self._heartbeat is not None:
            self._heartbeat.close()
        self._selector.close()
        self._waker.close()
        if self.cgroups is not None:  # before the guardian, which would empty them too
            self.cgroups.close()
        self.reaper.close()

    def start_guardian(self) -> None:
        """Start the guardian helper (see Reaper.start_guardian), after
        ``open_containment``: it empties the cgroups, or looks for tags."""
        root = None
        if self.cgroups is not None:
            root = self.cgroups.root
        self.reaper.start_guardian(root, self.owner_tag)

    def open_containment(self) -> None:
        """Make this daemon's cgroup subtree (see Cgroups), or note why the
        fallback is in force, and check that every watcher's limits can be
        had.  Before the worker runs; raise ConfigError if ``cgroup =
        required`` or a limit cannot be had."""
        token = daemon_token()
        self.cgroups, why = open_cgroup_tree(self.config.cgroup, token)
        if self.cgroups is None:
            if self.config.cgroup == "required":
                raise ConfigError(f"cgroup = required, but {why}", self.config.source, "circus")
            logger.info("containment: process groups and the descendant walk (%s)", why)
            self.containment = {"mode": "process groups", "reason": why}
            self.owner_tag = f"{token}:"
            self.reaper.owner_tag = self.owner_tag
        else:
            logger.info("containment: cgroup %s", self.cgroups.root)
            self._selector.register(self.cgroups, selectors.EVENT_READ, "cgroups")
            self.containment = {"mode": "cgroup", "cgroup": self.cgroups.root}
        for watcher in self.watchers.values():
            try:
                self.check_limits(watcher.config)
            except MessageError as exc:
                raise ConfigError(exc.reason, self.config.source,
                                  f"watcher:{watcher.name}") from None

    def check_limits(self, config: WatcherConfig) -> None:
        """Raise MessageError if a limit of ``config`` (memory_max,
        cpu_quota, pids_max) cannot be enforced: a limit is never accepted
        and then ignored.  Gives our cgroups the controllers needed."""
        wanted = {option: controller for option, controller in LIMIT_CONTROLLERS.items()
                  if getattr(config, option) is not None}
        if not wanted:
            return
        options = " and ".join(sorted(wanted))
        if self.cgroups is None:
            raise MessageError(f"{options} needs cgroup v2, which this daemon cannot use "
                               f"({self.containment['reason']}); {DELEGATION_HINT}")
        try:
            self.cgroups.enable(set(wanted.values()))
        except (MinisupError, OSError) as exc:
            raise MessageError(f"{options} cannot be enforced: {exc}") from None

    def bind_sockets(self, configs: list[SocketConfig] | None = None) -> None:
        """Bind every ``[socket:NAME]`` (or ``configs``) before any watcher
        starts; raise ConfigError naming the one that fails."""
        if configs is None:
            configs = self.config.sockets
            self._bind_heartbeat()
        for config in configs:
            try:
                self.sockets[config.name] = bind_socket(config)
            except OSError as exc:
                raise ConfigError(f"cannot bind: {exc}", self.config.source,
                                  f"socket:{config.name}") from None

    def _bind_heartbeat(self) -> None:
        """Bind the UDP socket of Circus's WatchDog plugin, if the config
        has one (its children send their heartbeats there); raise
        ConfigError if it cannot be bound."""
        address = self.config.heartbeat_address
        if address is None:
            return
        self._heartbeat = socket.socket(socket.AF_INET, socket.SOCK_DGRAM
                                        | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._heartbeat.bind(address)
        except OSError as exc:
            self._heartbeat.close()
            self._heartbeat = None
            raise ConfigError(f"cannot bind the WatchDog plugin's udp://{address[0]}:"
                              f"{address[1]}: {exc}", self.config.source) from None
        self._selector.register(self._heartbeat, selectors.EVENT_READ, "heartbeat")

    def _read_heartbeats(self) -> None:
        """Read the WatchDog plugin's heartbeats: the pid its pattern finds
        in one restarts that child's watchdog.  UDP carries no sender's pid,
        so any local process may send one for any child, as in Circus."""
        pattern = re.compile(self.config.heartbeat_pattern or "")
        known = {p.pid: (w, p) for w, p in self._all_processes()}
        with contextlib.suppress(BlockingIOError):  # read them all
            while True:
                text = self._heartbeat.recv(4096).decode("utf-8", "replace").strip()
                owner = known.get(_heartbeat_pid(pattern, text))
                if owner is not None:
                    owner[0].feed_watchdog(owner[1], self.clock(), b"WATCHDOG=1")

    def _close_socket(self, name: str) -> None:
        """Close the socket ``name`` (and remove its file, for a unix one)."""
        sock = self.sockets.pop(name)
        if sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):  # gone already
                os.unlink(sock.getsockname())  # ours: bound by bind_socket
        sock.close()

    def socket_infos(self) -> list[dict[str, Any]]:
        """What ``listsockets`` shows, sorted by fd."""
        backlogs = {s.name: s.backlog for s in self.config.sockets}
        infos = []
        for name, sock in self.sockets.items():
            info = {"fd": sock.fileno(), "name": name, "backlog": backlogs[name]}
            if sock.family == socket.AF_UNIX:
                info["path"] = sock.getsockname()
            else:
                info["host"], info["port"] = sock.getsockname()[:2]
            infos.append(info)
        return sorted(infos, key=_by_fd)

    def _all_processes(self) -> list[tuple[Watcher, Process]]:
        """Every child, with its watcher (removed watchers' included)."""
        return [(w, p) for w in [*self.watchers.values(), *self._retiring]
                for p in w.processes.values()]

    def _spawn(self, config: WatcherConfig, wid: int, now: float) -> Process:
        """Start one child of ``config`` (Watcher's ``spawn``): with the
        sockets, capture if there is an output thread, and for ``ready``
        its notify socket, or no stale ready file.  Past the process limit
        (see _check_fds_to_spare), raise OSError (EMFILE) unless the daemon
        still has fds to spare."""
        self._check_fds_to_spare()
        extra = {}
        if config.ready == "notify" or config.watchdog_sec:
            extra["NOTIFY_SOCKET"] = self._notify_address()
        if config.watchdog_sec:  # as systemd sets it; no WATCHDOG_PID: the pid is not known yet
            extra["WATCHDOG_USEC"] = str(round(config.watchdog_sec * 1e6))
        if config.ready is not None and config.ready.startswith("file:"):
            with contextlib.suppress(FileNotFoundError):  # a stale file would pass at once
                os.unlink(substitute(config.ready[5:], {"wid": str(wid)}, {}))
        if self.owner_tag is not None:  # fallback mode: how an orphan is traced back
            extra[OWNER_VARIABLE] = self.owner_tag + config.name
        if self.cgroups is None:
            return spawn_process(config, wid, now, self.sockets, self.pump is not None, extra,
                                 spawner=self.spawner)
        return self._spawn_contained(config, wid, now, extra)

    def _check_fds_to_spare(self) -> None:
        """Raise OSError (EMFILE) if a new child would leave the daemon
        fewer than SPARE_FDS free fds: libzmq aborts the whole process when
        an accept finds none, and the spawner, forking from its own table,
        would otherwise fill the daemon's to the last one.  Looked at only
        past ``process_limit`` (then a probe of SPARE_FDS dups); on the worker."""
        count = sum(len(w.processes) for w in [*self.watchers.values(), *self._retiring])
        if count < self.process_limit[0]:
            return
        probes: list[int] = []
        try:
            for _ in range(SPARE_FDS + FDS_PER_PROCESS):
                probes.append(fcntl.fcntl(self._waker.read_fd, fcntl.F_DUPFD_CLOEXEC, 0))
        except OSError as exc:
            raise OSError(errno.EMFILE, f"Too many open files: {count} processes leave too "
                                        f"few fds for the daemon's own ({SPARE_FDS} kept)") from exc
        finally:
            close_fds(probes)

    def _spawn_contained(self, config: WatcherConfig, wid: int, now: float,
                         extra: dict[str, str]) -> Process:
        """_spawn in cgroup mode: the child is born in a cgroup of its own,
        which gets the watcher's limits; raise as spawn_process does,
        leaving nothing running."""
        folder = self.cgroups.new_process_folder(config.name, wid)
        process = None
        try:
            process = spawn_process(config, wid, now, self.sockets, self.pump is not None,
                                    extra, self.cgroups.born_in(folder), self.spawner)
            self.cgroups.set_limits(folder, config)
        except BaseException:
            if process is not None:  # never a child without its limits
                kill_failed_spawn(process.popen)
                self._close_pipes(process)
            self._kill_cgroup(folder)
            self.cgroups.remove_when_empty(folder)
            raise
        process.cgroup = folder
        return process

    @staticmethod
    def _close_pipes(process: Process) -> None:
        """Release a child that never was watched: its pidfd and pipes."""
        process.close()
        close_fds(process.pipes.values())

    def _notify_address(self) -> str:
        """The NOTIFY_SOCKET of ``ready = notify`` children: one datagram
        socket for all, made at the first; the kernel stamps each message
        with its sender's pid (SO_PASSCRED), so none can be forged."""
        if self._notify is None:
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM
                                         | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._notify.bind(f"\0minisup-{os.getpid()}-{id(self):x}")
            self._selector.register(self._notify, selectors.EVENT_READ, "notify")
        return "@" + self._notify.getsockname()[1:].decode()

    def _watch(self, watcher: Watcher, process: Process) -> None:
        """Start watching a new child, and reading its output."""
        self.reaper.watch(watcher, process)
        if process.pipes and self.pump is not None:
            self.pump.attach(watcher.config, process.pid, process.wid, process.pipes)

    def _reap(self, watcher: Watcher, process: Process, drained: bool = False) -> None:
        """If the child is dead, have the output thread write what is left
        in its pipes first (``drained`` once it has), then reap it and tell
        its watcher."""
        if process.draining and not drained:
            return
        if not self.reaper.has_exited(process):
            return
        if process.death_seen is None:
            process.death_seen = self._woke_at
        if not drained:
            self._kill_leftovers(watcher, process)
        if process.pipes and self.pump is not None and not drained:
            process.draining = True
            self.reaper.unwatch(process)
            finish = functools.partial(self._reap, watcher, process, True)
            self.pump.drain(process.pid, functools.partial(self.call_on_worker, finish))
            return
        if self.cgroups is None:  # the zombie's CPU, before it is gone (the metrics' total)
            watcher.dead_cpu += tree_usage([process.pid])["cpu"]
        code = self.reaper.collect(process)
        if code is not None:
            watcher.reap(process, code, self.clock(), self._release_cgroup(watcher, process))

    def _kill_leftovers(self, watcher: Watcher, process: Process) -> None:
        """A child died: SIGKILL what it left, its group (the zombie keeps
        the group id) and its cgroup, unless it died on its own and its
        watcher keeps leftovers (``kill_leftovers = false``).  An empty
        cgroup (the usual case) means nothing is left: no signal is sent.
        In a stop of its whole watcher, that is done for all at the end
        (see _release_with_watcher).  Before its pipes are drained: a
        leftover could hold them open."""
        if not process.stopping and not watcher.config.kill_leftovers:
            return
        if self._released_with_watcher(watcher, process):  # see _release_with_watcher
            process.with_watcher = True
            return
        if process.cgroup is not None and not is_populated(process.cgroup):
            process.cgroup_empty = True  # the usual case: nothing is left
            return
        process.send_signal(signal.SIGKILL, group=True)
        # With a memory controller its memory.events is read first (OOM).
        if process.cgroup is not None and is_populated(process.cgroup):
            self._kill_cgroup(process.cgroup)

    def _release_cgroup(self, watcher: Watcher, process: Process) -> str | None:
        """Remove a reaped child's cgroup, or await it while a process is
        left in it (the watcher is not stopped until it is empty); return
        why it died if its exit code does not tell: an OOM kill."""
        folder = process.cgroup
        if folder is None:
            return None
        reason = None
        oom = "memory" in self.cgroups.controllers  # else no memory.events to read
        if oom and read_keyed(folder, "memory.events").get("oom_kill"):
            limit = watcher.config.memory_max
            reason = "OOM kill (the machine's memory)"
            if limit is not None:
                reason = f"OOM kill (memory_max {size_text(limit)})"
        if process.cgroup_empty:
            self.cgroups.discard(folder)
        elif process.with_watcher:  # looked at once the last is reaped
            self._released_folders.setdefault(watcher, []).append(folder)
        else:
            self._remove_when_empty(watcher, folder)
        stopping = len(watcher.processes) - watcher.running_count()  # this one among them
        if stopping <= 1 and watcher in self._released_folders:  # the last of the stop
            self._release_with_watcher(watcher)
        return reason

    def _remove_when_empty(self, watcher: Watcher, folder: str) -> None:
        """Remove a dead child's cgroup, or await it (lingering: the stop
        is not over) while a process is left in it."""
        if not self.cgroups.remove_when_empty(folder):
            self._lingering[folder] = watcher
            watcher.lingering += 1

    def _released_with_watcher(self, watcher: Watcher, process: Process) -> bool:
        """Whether a dead child's leftovers and cgroup wait for the end of
        its watcher's stop (see _release_with_watcher): cgroup mode, the
        watcher stopping as a whole, the child one it told to stop."""
        return (process.with_watcher or self.cgroups is not None and process.cgroup is not None
                and watcher.state == STOPPING and process.stopping
                and self.watchers.get(watcher.name) is watcher)  # rm'd: its name may be reused

    def _release_with_watcher(self, watcher: Watcher) -> None:
        """Once the last child of a stopping watcher is reaped, deal with
        the cgroups of those that died in the stop: one read of the
        watcher's cgroup says whether anything is left; if not, each is
        discarded, else what is left is killed and each awaited until
        empty.  10,000 reads (or rmdirs) while thousands of processes are
        still exiting wait on the kernel's cgroup locks (0.04-0.6 ms
        each); one read at the end does not."""
        folders = self._released_folders.pop(watcher, [])
        top = self.cgroups.watcher_folder(watcher.name)
        if watcher.running_count():  # started again meanwhile: never kill the new ones
            for folder in folders:
                self._release_alone(watcher, folder)
            return
        if not is_populated(top):
            for folder in folders:
                self.cgroups.discard(folder)
            return
        self._kill_cgroup(top)
        for folder in folders:
            self._remove_when_empty(watcher, folder)

    def _release_alone(self, watcher: Watcher, folder: str) -> None:
        """A dead child's cgroup on its own: discarded if empty, else what
        is left is killed and the cgroup awaited."""
        if not is_populated(folder):
            self.cgroups.discard(folder)
            return
        self._kill_cgroup(folder)
        self._remove_when_empty(watcher, folder)

    def check_process_count(self, name: str, count: int) -> None:
        """Raise MessageError if ``count`` processes for the watcher ``name``
        (new or not) would take the sum of every watcher's numprocesses past
        ``process_limit``: no request may ask for more than the daemon can hold."""
        limit, why = self.process_limit
        others = sum(w.numprocesses for w in self.watchers.values() if w.name != name)
        if others + count > limit:
            raise MessageError(f"{name}: {count} processes would make {others + count} in all, "
                               f"over the daemon's limit of {limit} ({why})")

    def warn_if_over_limit(self) -> None:
        """Log a warning if the configured watchers want more processes than
        ``process_limit``: spawns past it would fail (at start, reloadconfig)."""
        limit, why = self.process_limit
        wanted = sum(w.numprocesses for w in self.watchers.values())
        if wanted > limit:
            logger.warning("the watchers want %d processes, but this daemon can hold %d (%s)",
                           wanted, limit, why)

    def get_watcher(self, name: str) -> Watcher:
        """The watcher called ``name`` (any case); MessageError if none."""
        try:
            return self.watchers[name.lower()]
        except KeyError:
            raise MessageError(f"program {name} not found") from None

    def add_watcher(self, config: WatcherConfig) -> Watcher:
        """Register a new, stopped watcher; error if the name is taken."""
        if config.name in self.watchers:
            raise MinisupError(f"{config.name!r} already exist", COMMAND_ERROR)
        watcher = Watcher(config, self._spawn, self._emit, self.hooks.call)
        self.watchers[config.name] = watcher
        logger.info("%s: added", watcher.name)
        watcher.emit("add")
        return watcher

    def hook_arbiter(self) -> HookArbiter:
        """The daemon as a hook sees it, now (see Hooks)."""
        endpoint = self.bound_endpoints.get("endpoint") or self.config.endpoint
        pubsub = self.bound_endpoints.get("pubsub_endpoint") or self.config.pubsub_endpoint
        return HookArbiter(endpoint, pubsub, tuple(self.watchers))

    def _emit(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish a watcher's event where ``on_event`` says, if set yet."""
        if self.on_event is not None:
            self.on_event(topic, payload)

    def remove_watcher(self, watcher: Watcher, stop: bool = True) -> None:
        """Unlist ``watcher``; its children are stopped (or, with
        ``stop=False``, left to exit) and still reaped."""
        del self.watchers[watcher.name]
        if stop:
            watcher.stop(self.clock())
        else:
            watcher.abandon()
        self._retiring.append(watcher)
        logger.info("%s: removed", watcher.name)
        watcher.emit("remove")

    def start_watchers(self, watchers: list[Watcher]) -> None:
        """Start ``watchers`` and those they depend on, higher priority first,
        each group ``warmup_delay`` after the one before (not a sleep)."""
        now = self.clock()
        wanted = list(watchers)
        for watcher in wanted:  # and what they depend on (``wanted`` grows)
            wanted += [self.watchers[name] for name in watcher.config.depends_on
                       if name in self.watchers and self.watchers[name] not in wanted]
        for stages in self._stop_plans:
            for stage in stages:
                stage[:] = [w for w in stage if w not in wanted]  # a start overrides a stop
        for index, watcher in enumerate(sorted(wanted, key=_priority_first)):
            watcher.start(not_before=now + index * self.config.warmup_delay)

    def apply_config(self, new: Config) -> list[Watcher]:
        """Move to a re-read configuration (``reloadconfig``): add new
        watchers, remove deleted ones, resize on a numprocesses-only change
        and reload on any other (runtime additions are kept); return those
        touched."""
        old = {w.name: w for w in self.config.watchers}
        fresh = {w.name: w for w in new.watchers}
        self._apply_heartbeat(new)
        moved_sockets = self._apply_sockets(new.sockets)
        touched = [self.watchers[n] for n in old.keys() - fresh.keys() if n in self.watchers]
        for watcher in touched:
            self.remove_watcher(watcher)
        for name, config in fresh.items():
            watcher = self.watchers.get(name)
            if watcher is None:
                watcher = self.add_watcher(config)
                touched.append(watcher)
                if config.autostart:
                    self.start_watchers([watcher])
            elif old.get(name) != config or _uses_any(config, moved_sockets):
                touched.append(watcher)
                self._apply_watcher(watcher, old.get(name), config)
        self._apply_globals(new)
        self.config.watchers = new.watchers
        self.config.source = new.source
        return touched

    def _apply_heartbeat(self, new: Config) -> None:
        """Take a re-read WatchDog plugin: rebind its UDP socket if its
        address changed (raise ConfigError if the new one cannot be bound,
        before anything else changed), and use its new pattern."""
        address = new.heartbeat_address
        self.config.heartbeat_pattern = new.heartbeat_pattern
        if address == self.config.heartbeat_address:
            return
        if self._heartbeat is not None:
            self._selector.unregister(self._heartbeat)
            self._heartbeat.close()
            self._heartbeat = None
        self.config.heartbeat_address = address
        self._bind_heartbeat()

    def _apply_sockets(self, sockets: list[SocketConfig]) -> set[str]:
        """Close the sockets gone or changed and bind those new or changed;
        return the names of those that changed."""
        current = {s.name: s for s in self.config.sockets}
        moved = {s.name for s in sockets if current.get(s.name, s) != s}
        for name in [s.name for s in current.values() if s not in sockets]:
            self._close_socket(name)
        self.config.sockets = sockets
        self.bind_sockets([s for s in sockets if current.get(s.name) != s])
        return moved

    def _apply_watcher(self, watcher: Watcher, old: WatcherConfig | None,
                       config: WatcherConfig) -> None:
        """Take a watcher's changed section: a resize if only numprocesses
        changed (keeping what ``set`` changed), else a reload."""
        resize = old is not None and old != config and dataclasses.replace(
            old, numprocesses=config.numprocesses) == config
        if resize:
            watcher.update(watcher.config, self.clock(), False, config.numprocesses)
        else:
            watcher.update(config, self.clock(), True, config.numprocesses)

    def _apply_globals(self, new: Config) -> None:
        """Take a re-read ``[circus]``: check_delay and warmup_delay now
        (umask through each watcher's config), the rest (logged) when the
        daemon restarts."""
        self.config.check_delay = new.check_delay
        self.config.warmup_delay = new.warmup_delay
        self.config.umask = new.umask
        for key in sorted(GLOBAL_OPTIONS.keys() - {"check_delay", "warmup_delay", "endpoint"}):
            if getattr(new, key) != getattr(self.config, key):
                logger.warning("reloadconfig: [circus] %s changed; it takes "
                               "effect when the daemon restarts", key)

    def begin_quit(self) -> None:
        """Stop every watcher (in ``stop_stages`` order), then end the loop."""
        if self._quit_stages is None:
            logger.info("quitting: stopping every watcher")
            self.systemd.stopping()
            self.stop_watchers([*self.watchers.values(), *self._retiring])
            self._quit_stages = self._stop_plans[-1]  # emptied as it advances

    def stop_watchers(self, watchers: list[Watcher]) -> None:
        """Stop ``watchers`` in ``stop_stages`` order, over the next ticks."""
        stages = stop_stages(watchers)
        if stages:
            for watcher in stages[0]:
                watcher.stop(self.clock())
        self._stop_plans.append(stages)

    def kill_everything(self, wait: bool = False) -> None:
        """SIGKILL every child now (a second Ctrl-C, or a failed loop); with
        ``wait``, reap them all before returning."""
        logger.warning("SIGKILL to every child")
        self.begin_quit()
        self.hooks.abandon()  # a forced quit waits for no hook
        for watcher in [*self.watchers.values(), *self._retiring]:
            watcher.kill_now()
        if self.cgroups is not None:
            self.cgroups.kill_everything()
        if not wait:
            return
        for watcher, process in self._all_processes():
            process.popen.wait()  # SIGKILLed: returns at once
            self.reaper.tell_guardian("-", process.pid)
            self._reap(watcher, process)


def _heartbeat_pid(pattern: re.Pattern[str], text: str) -> int | None:
    """The pid in a WatchDog heartbeat ``text`` (its ``pid`` group: ASCII
    digits), or None for anything else, which is ignored as Circus ignores
    it.  Anyone may send one: nothing in it may raise."""
    found = pattern.match(text)
    if found is None or "pid" not in pattern.groupindex:
        return None
    pid = found["pid"]
    if pid is None or not re.fullmatch(r"\s*[0-9]{1,10}\s*", pid):
        return None
    return int(pid)


def _credentials_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The sender's pid in a datagram's SCM_CREDENTIALS (0 if none)."""
    for _, message_type, data in ancillary:
        if message_type == socket.SCM_CREDENTIALS:
            return int.from_bytes(data[:4], sys.byteorder)
    return 0


def _uses_any(config: WatcherConfig, sockets: set[str]) -> bool:
    """Whether a watcher's children inherit one of ``sockets``."""
    if config.use_sockets:
        return bool(sockets)
    return bool(sockets & socket_users(config))


# ============================================================ Commands ======
# Each handler runs on the worker thread with properties the controller has
# already checked, and returns a reply dict or a Pending (for ``waiting``).

class Command(NamedTuple):
    """A wire command: its handler and the properties it reads."""

    handler: Callable[[Arbiter, dict[str, Any]], dict[str, Any] | Pending]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def _pid_property(value: int | str) -> int | None:
    """A pid property as an int (circusctl sends some pids as strings of
    digits), or None if it cannot be one."""
    text = str(value)
    # ASCII digits only, and few: int() refuses "²" and thousands of digits.
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    return int(text)


def _bounded(maximum: float) -> Callable[[Any], Any]:
    """A property conversion: the number if from 0 to ``maximum``, else None."""
    def convert(value: Any) -> Any:
        """``value`` if within the bounds, else None."""
        if 0 <= value <= maximum:
            return value
        return None
    return convert


def _stream_property(value: str) -> str | None:
    """The ``stream`` property: stdout or stderr, else None."""
    if value in ("stdout", "stderr"):
        return value
    return None


#: Property name -> (accepted JSON types, how to say it in an error, and None
#: or a function that returns the value to use, or None if it is not one).
#: Every number has an upper bound: see MAX_PROCESSES and the other bounds.
PROPERTY_TYPES: dict[str, tuple[tuple[type, ...], str, Callable[[Any], Any] | None]] = {
    **dict.fromkeys(("name", "cmd", "match", "option"), ((str,), "a string", None)),
    **dict.fromkeys(("pid", "childpid", "process"), ((int, str), "a pid", _pid_property)),
    "nb": ((int,), f"an integer from 0 to {MAX_PROCESSES}", _bounded(MAX_PROCESSES)),
    "lines": ((int,), f"an integer from 0 to {MAX_TAIL}", _bounded(MAX_TAIL)),
    **dict.fromkeys(("waiting", "start", "nostop", "graceful", "sequential", "children",
                     "recursive", "extended", "output"), ((bool,), "a boolean", None)),
    "args": ((str, list), "a string or a list", None), "options": ((dict,), "an object", None),
    "keys": ((list,), "a list of option names", None),
    "signum": ((int, str), "a signal number or name", None),
    "stream": ((str,), "stdout or stderr", _stream_property),
    "graceful_timeout": ((int, float), f"a number of seconds from 0 to {_plain(MAX_SECONDS)}",
                         _bounded(MAX_SECONDS)),
}


def _targets(arbiter: Arbiter, properties: dict[str, Any],
             autostart_only: bool = False) -> list[Watcher]:
    """The watchers a start/stop/restart names: all (start: the autostart
    ones), or those whose name matches by glob (default), regex or simple."""
    name = properties.get("name")
    if name is None:
        return [w for w in arbiter.watchers.values() if w.config.autostart or not autostart_only]
    match = properties.get("match", "glob")
    if match == "simple":
        return [arbiter.get_watcher(name)]
    if match not in ("glob", "regex"):
        raise MessageError(f"unknown match method {match!r}")
    expression = name
    if match == "glob":
        expression = fnmatch.translate(name.lower())
    try:
        pattern = re.compile(expression)
    except re.error as exc:
        raise MessageError(f"'name' is not a valid regex: {exc}") from None
    found = [w for n, w in sorted(arbiter.watchers.items()) if pattern.match(n)]
    if not found:
        raise MessageError(f"program {name} not found")
    return found


def _no_fields() -> dict[str, Any]:
    """The reply of a waiting command that has nothing to add."""
    return {}


def _when_waiting(properties: dict[str, Any], done: Callable[[], bool],
                  result: Callable[[], dict[str, Any]] = _no_fields) -> dict[str, Any] | Pending:
    """An empty reply now, or with ``waiting`` a Pending on ``done``."""
    if properties.get("waiting"):
        return Pending(done, result)
    return {}


def _all_settled(watchers: list[Watcher]) -> bool:
    """Whether no start, stop, restart or reload of ``watchers`` is going on."""
    return all(w.settled for w in watchers)


def _all_stopped(watchers: list[Watcher]) -> bool:
    """Whether every one of ``watchers`` has stopped."""
    return all(w.state == STOPPED for w in watchers)


def _when_started(properties: dict[str, Any], watchers: list[Watcher],
                  before: dict[str, list[int]], with_stopped: bool,
                  as_info: bool) -> dict[str, Any] | Pending:
    """What a start, restart, reload or add of ``watchers`` replies: nothing
    now, or with ``waiting``, once every one has settled, the pids moved
    (under ``info`` if ``as_info``), or at the first spawn failure an errno 6
    naming it, not a silence until the client gives up; the watcher keeps
    retrying as ``max_retry`` says."""
    if not properties.get("waiting"):
        return {}
    failures = {w.name: w.spawn_failures for w in watchers}

    def failed_to_spawn() -> list[Watcher]:
        """The watchers that failed a spawn since the command."""
        return [w for w in watchers if w.spawn_failures > failures[w.name]]

    def done() -> bool:
        """Whether to reply: all settled, or a spawn failed."""
        return _all_settled(watchers) or bool(failed_to_spawn())

    def result() -> dict[str, Any]:
        """The pids moved; errno 6 if a watcher gave up or failed a spawn."""
        info = _process_info(watchers, before, with_stopped)  # errno 6 if one gave up
        failed = failed_to_spawn()
        if failed:
            raise MinisupError("; ".join(f"{w.name}: {w.spawn_error}" for w in failed),
                               BAD_MSG_DATA_ERROR)
        if as_info:
            return {"info": info}
        return info
    return Pending(done, result)


def _process_info(watchers: list[Watcher], before: dict[str, list[int]],
                  with_stopped: bool = True) -> dict[str, list[int]]:
    """Which pids an action stopped, started and kept, sorted as Circus's;
    errno 6 with the reason if a watcher gave up spawning."""
    failed = [w for w in watchers if w.last_error and w.state == STOPPED]
    if failed:
        raise MinisupError("; ".join(f"{w.name}: {w.last_error}" for w in failed),
                           BAD_MSG_DATA_ERROR)
    old = {p for w in watchers for p in before[w.name]}
    now = {p for w in watchers for p in w.pids()}
    info = {"started": sorted(now - old), "kept": sorted(old & now)}
    if with_stopped:
        return {"stopped": sorted(old - now), **info}
    return info


def handle_list(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``list``: every watcher's name, sorted; with ``name``, its pids."""
    if properties.get("name") is not None:
        return {"pids": arbiter.get_watcher(properties["name"]).pids()}
    return {"watchers": sorted(arbiter.watchers)}


def handle_status(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``status``: every watcher's state (``statuses``), or with ``name``
    that one's (and why it gave up); minisup's ``extended`` adds each
    process (``watchers``), for ``ctl status``."""
    now = arbiter.clock()
    name = properties.get("name")
    if name is None:
        watchers = [w for _, w in sorted(arbiter.watchers.items())]
        reply = {"statuses": {w.name: w.status(now) for w in watchers}}
    else:
        watchers = [arbiter.get_watcher(name)]
        reply = {"status": watchers[0].status(now)}
        if watchers[0].last_error:
            reply["reason"] = watchers[0].last_error
    if properties.get("extended"):
        reply["watchers"] = {w.name: watcher_info(w, now) for w in watchers}
        reply["containment"] = arbiter.containment  # Circus's plain reply has none
    return reply


def _process_state(process: Process) -> str:
    """A process's state in ``status extended``: stopping, ready or starting."""
    if process.stopping:
        return "stopping"
    if process.ready:
        return "ready"
    return "starting"


def watcher_info(watcher: Watcher, now: float) -> dict[str, Any]:
    """A watcher's state and each of its processes', for ``status extended``."""
    processes = [{"pid": p.pid, "wid": p.wid, "uptime": round(now - p.started, 3),
                  "state": _process_state(p)} for p in watcher.processes.values()]
    return {"status": watcher.status(now), "autostart": watcher.config.autostart,
            "numprocesses": watcher.numprocesses, "restarts": watcher.restarts,
            "last_exit": watcher.last_exit, "last_exit_reason": watcher.last_exit_reason,
            "reason": watcher.last_error, "next_retry": watcher.next_retry(now),
            "processes": processes}


def handle_health(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """minisup's ``health``: ok while every autostart (or started) watcher
    is active with every process ready and none in a crash loop; else an
    errno 6 naming the first that is not."""
    now = arbiter.clock()
    for name, watcher in sorted(arbiter.watchers.items()):
        if not watcher.config.autostart and watcher.state == STOPPED:
            continue  # never started, and not meant to be
        running = watcher.running()
        unready = sum(not p.ready for p in running)
        looping = watcher.crash_looping(now)
        if looping and watcher.state in (STARTING, ACTIVE):
            raise MinisupError(f"{name} is restarting: {looping}", BAD_MSG_DATA_ERROR)
        if watcher.state in (STARTING, ACTIVE) and (unready or len(running) < watcher.target):
            raise MinisupError(f"{name}: {len(running) - unready} of {watcher.target} "
                               "processes ready", BAD_MSG_DATA_ERROR)
        if watcher.state != ACTIVE:
            why = ""
            if watcher.last_error:
                why = f" ({watcher.last_error})"
            raise MinisupError(f"{name} is {watcher.status(now)}{why}", BAD_MSG_DATA_ERROR)
    return {"healthy": True, "containment": arbiter.containment}


def handle_start(arbiter: Arbiter, properties: dict[str, Any], action: str = "start"
                 ) -> dict[str, Any] | Pending:
    """``start`` (all: the autostart ones), ``restart`` or ``reload``
    (``action``) the named watchers; with ``waiting``, reply once they
    have settled, with the pids moved (when starting, none stopped)."""
    watchers = _targets(arbiter, properties, autostart_only=action == "start")
    before = {w.name: w.pids() for w in watchers}
    now = arbiter.clock()
    if action == "start":
        arbiter.start_watchers(watchers)
    elif action == "reload" and properties.get("graceful") is not False:
        for watcher in watchers:
            watcher.reload(now, bool(properties.get("sequential")))
    else:
        for watcher in watchers:
            watcher.restart(now)
    return _when_started(properties, watchers, before, action != "start", as_info=True)


def _no_info() -> dict[str, Any]:
    """``stop``'s waiting reply, as Circus's: ``info`` null."""
    return {"info": None}


def handle_stop(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``stop`` the named watchers (all by default), dependents first;
    with ``waiting``, reply once all have stopped."""
    watchers = _targets(arbiter, properties)
    arbiter.stop_watchers(watchers)
    return _when_waiting(properties, functools.partial(_all_stopped, watchers), _no_info)


def handle_resize(arbiter: Arbiter, properties: dict[str, Any], sign: int
                  ) -> dict[str, Any] | Pending:
    """``incr`` (``sign`` +1) or ``decr`` (-1) a watcher by ``nb`` (1);
    reply with the new numprocesses (with ``waiting``, once settled).  A
    singleton says so and stays at one; past ``max_processes``: errno 3."""
    watcher = arbiter.get_watcher(properties["name"])
    if watcher.config.singleton:
        return {"numprocesses": watcher.numprocesses, "singleton": True}
    count = max(0, watcher.numprocesses + sign * properties.get("nb", 1))
    arbiter.check_process_count(watcher.name, count)
    watcher.set_numprocesses(count)
    reply = {"numprocesses": watcher.numprocesses}
    if properties.get("waiting"):
        return Pending(functools.partial(_all_settled, [watcher]), functools.partial(dict, reply))
    return reply


def handle_numprocesses(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``numprocesses``: as Circus, how many processes run (0 after a
    ``stop``); with ``name``, that watcher's, and the name as asked."""
    name = properties.get("name")
    if name is not None:
        return {"numprocesses": len(arbiter.get_watcher(name).processes), "watcher_name": name}
    return {"numprocesses": sum(len(w.processes) for w in arbiter.watchers.values())}


def handle_numwatchers(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``numwatchers``: how many watchers there are."""
    return {"numwatchers": len(arbiter.watchers)}


def handle_add(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``add`` a watcher from ``cmd``, ``args`` and ``options`` (checked as
    the INI file is); with ``start`` start it too, and with ``waiting``
    reply with its pids once it has settled (errno 6 at a spawn failure)."""
    if not properties["name"].strip():
        raise MessageError("'name' must not be empty")
    config = watcher_config_from_json(properties["name"], properties["cmd"],
                                      properties.get("args"), properties.get("options"))
    arbiter.check_process_count(config.name, config.numprocesses)
    arbiter.check_limits(config)
    try:
        check_dependencies([*(w.config for w in arbiter.watchers.values()), config])
    except ValueError as exc:
        raise MessageError(str(exc)) from None
    watcher = arbiter.add_watcher(config)
    if not properties.get("start"):
        return {}
    arbiter.start_watchers([watcher])
    return _when_started(properties, [watcher], {watcher.name: []}, False, as_info=False)


def _childless(watcher: Watcher) -> bool:
    """Whether every child of ``watcher`` has been reaped."""
    return not watcher.processes


def _always() -> bool:
    """A Pending that is done at once."""
    return True


def handle_rm(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``rm`` a watcher, stopping its processes (``nostop``: leaving them to
    exit); with ``waiting``, reply once they are gone."""
    watcher = arbiter.get_watcher(properties["name"])
    stop = not properties.get("nostop")
    arbiter.remove_watcher(watcher, stop=stop)
    if stop:
        return _when_waiting(properties, functools.partial(_childless, watcher))
    return _when_waiting(properties, _always)


def _quit_finished(arbiter: Arbiter) -> bool:
    """Whether the quit has stopped every child."""
    return arbiter.quit_finished


def handle_quit(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``quit``: stop every watcher, then the daemon; with ``waiting``,
    reply once every child is gone."""
    arbiter.begin_quit()
    return _when_waiting(properties, functools.partial(_quit_finished, arbiter))


def handle_options(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``options``: every option of a watcher (secrets redacted)."""
    return {"options": arbiter.get_watcher(properties["name"]).options()}


def handle_get(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``get``: the options named in ``keys``; an unknown one is errno 3."""
    options = arbiter.get_watcher(properties["name"]).options()
    for key in properties["keys"]:
        if not isinstance(key, str) or key not in options:
            raise MessageError(f"{key!r} option not found")
    return {"options": {key: options[key] for key in properties["keys"]}}


def handle_set(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``set`` a watcher's options, checked as the INI file's are; a change
    that needs new processes reloads them gracefully; with ``waiting``,
    reply once the watcher has settled."""
    watcher = arbiter.get_watcher(properties["name"])
    try:
        values = gather_prefixed({key: check_json_option(watcher.name, key, value) for key, value
                                  in properties["options"].items()}, watcher.config)
    except ValueError as exc:
        raise ConfigError(str(exc), section=f"watcher:{watcher.name}") from None
    count = values.pop("numprocesses", None)
    config = dataclasses.replace(watcher.config, **values)
    check_watcher_values(config)
    if config.singleton and count is not None and count > 1:
        raise MessageError("'numprocesses' must be 1 for a singleton watcher")
    if count is not None:
        arbiter.check_process_count(watcher.name, count)
    arbiter.check_limits(config)
    reload = any(getattr(watcher.config, key) != value for key, value in values.items()
                 if key in RELOAD_OPTIONS)
    watcher.update(config, arbiter.clock(), reload, count)
    return _when_waiting(properties, functools.partial(_all_settled, [watcher]))


def _signum(properties: dict[str, Any]) -> int | None:
    """The ``signum`` property as a number (None if absent); errno 3 if
    it names no signal."""
    if "signum" not in properties:
        return None
    try:
        return parse_signal(properties["signum"])
    except ValueError:
        raise MessageError(f"'signum' is not a signal: {properties['signum']!r}") from None


def _watcher_process(watcher: Watcher, pid: int) -> Process:
    """The child ``pid`` of ``watcher``; errno 3 if it has none."""
    try:
        return watcher.processes[pid]
    except KeyError:
        raise MessageError(f"process {pid} not found in {watcher.name!r}") from None


def handle_signal(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``signal`` a watcher's processes (or one ``pid``), as Circus's:
    with ``children`` their children instead, with ``recursive`` them and
    every descendant, with ``childpid`` that one child of ``pid``."""
    watcher = arbiter.get_watcher(properties["name"])
    signum = _signum(properties)
    pid = properties.get("pid")
    childpid = properties.get("childpid")
    if childpid is not None and pid is None:
        raise MessageError("'childpid' needs 'pid'")
    targets = watcher.running()
    if pid is not None:
        targets = [_watcher_process(watcher, pid)]
    recursive = bool(properties.get("recursive"))
    children = bool(properties.get("children"))
    tree: dict[int, list[int]] = {}
    if recursive or children or childpid is not None:  # read /proc only then
        tree = children_map()
    for process in targets:
        below = descendants(process.pid, tree, recursive)
        if childpid is not None:
            if childpid not in below:
                raise MessageError(f"{childpid} is not a child of {pid}")
            below = [childpid]
        elif not children:
            watcher.signal_process(process, signum)
            if not recursive:
                below = []
        kill_pids(below, signum)
    return {}


def _none_left(watcher: Watcher, pids: list[int]) -> bool:
    """Whether none of ``pids`` is a child of ``watcher`` any more."""
    return watcher.processes.keys().isdisjoint(pids)


def handle_kill(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``kill``: stop a watcher's processes (or one ``pid``) gracefully with
    another ``signum`` or ``graceful_timeout``; with ``waiting``, reply once
    they have exited.  Those still wanted are replaced."""
    watcher = arbiter.get_watcher(properties["name"])
    pids = None
    if properties.get("pid") is not None:
        pids = [_watcher_process(watcher, properties["pid"]).pid]  # or not found
    victims = watcher.stop_processes(arbiter.clock(), pids, _signum(properties),
                                     properties.get("graceful_timeout"))
    return _when_waiting(properties, functools.partial(_none_left, watcher, victims))


def _stats_of(process: Process, tree: Callable[[], dict[int, list[int]]]
              ) -> dict[str, Any] | str:
    """Circus's stats of one child and its children, with when it started,
    its wid and its whole tree's usage (see _tree_of), or why there are none."""
    stats = process_stats(process.pid, children=True)
    if isinstance(stats, dict):
        stats.update(started=process.started_at, wid=process.wid, tree=_tree_of(process, tree))
        _cpu_since_last(process, stats)
    return stats


def _cpu_since_last(process: Process, stats: dict[str, Any]) -> None:
    """Make ``stats``'s ``cpu`` the percent of one CPU the process used since
    its last ``stats`` (as Circus's psutil cpu_percent does), over its life
    the first time; ``cpu_interval`` says over how many seconds (None: its life)."""
    now = time.monotonic()
    previous = process.cpu_sample
    process.cpu_sample = (stats["cpu_seconds"], now)
    stats["cpu_interval"] = None
    if previous is not None and now - previous[1] >= 0.01:  # shorter: too few ticks to tell
        stats["cpu_interval"] = round(now - previous[1], 3)
        stats["cpu"] = round(100 * (stats["cpu_seconds"] - previous[0]) / (now - previous[1]), 1)


def _tree_of(process: Process, tree: Callable[[], dict[int, list[int]]]) -> dict[str, Any]:
    """The usage of a child and all it started: its cgroup's, or in
    fallback mode its live descendants' (``tree``: a cached children_map)."""
    if process.cgroup is not None:
        return cgroup_usage(process.cgroup)
    return tree_usage([process.pid, *descendants(process.pid, tree())])


def _watcher_tree(arbiter: Arbiter, watcher: Watcher,
                  tree: Callable[[], dict[int, list[int]]]) -> dict[str, Any]:
    """The usage of all a watcher's processes started (``stats`` NAME):
    its cgroup's, or the sum of its children's trees in fallback mode."""
    if arbiter.cgroups is not None:
        return cgroup_usage(arbiter.cgroups.watcher_folder(watcher.name))
    pids = [pid for p in watcher.processes.values()
            for pid in [p.pid, *descendants(p.pid, tree())]]
    return tree_usage(pids)


class ExtendedStats:
    """The extended_stats hooks of one ``stats --extended`` (see Hooks):
    each gets a copy of its process's stats, merged back once the hook has
    returned (a copy: a hook past its timeout may still write to its own)."""

    def __init__(self) -> None:
        """No hook asked yet."""
        self.left = 0
        self._asked: list[tuple[dict[str, Any], dict[str, Any], HookCall | None]] = []

    def ask(self, arbiter: Arbiter, watcher: Watcher, pid: int, stats: Any) -> None:
        """Call ``watcher``'s extended_stats hook on ``stats``, if it has one
        and there are stats (not a reason why there are none)."""
        if not isinstance(stats, dict) or "extended_stats" not in watcher.config.hooks:
            return
        copy = dict(stats)
        self.left += 1
        call = arbiter.hooks.call(watcher, "extended_stats", {"pid": pid, "stats": copy},
                                  self._one_done)
        self._asked.append((stats, copy, call))

    def _one_done(self, passed: bool, now: float) -> None:
        """One hook is over (its result is not used, as in Circus)."""
        self.left -= 1

    def done(self) -> bool:
        """Whether every hook asked is over."""
        return self.left <= 0

    def merge(self) -> None:
        """Add to each process's stats what its hook added, if it returned."""
        for stats, copy, call in self._asked:
            if call is not None and call.error is None:
                stats.update(copy)


class OutputLines:
    """The lines each process wrote to its captured streams, for ``stats``
    with ``output`` (minisup's own): asked of the output thread, whose
    answer comes back to the worker thread as a call."""

    def __init__(self, arbiter: Arbiter, infos: dict[str, dict[int, Any]]) -> None:
        """Ask the output thread for the counts of the processes in ``infos``."""
        self._arbiter = arbiter
        self._infos = infos
        self._found: list[dict[int, int]] = []  # appended on the worker thread only
        if arbiter.pump is None:
            self._found.append({})
        else:
            pids = [pid for by_pid in infos.values() for pid in by_pid]
            arbiter.pump.line_counts(pids, self._deliver)

    def _deliver(self, counts: dict[int, int]) -> None:
        """On the output thread: hand its counts to the worker thread."""
        self._arbiter.call_on_worker(functools.partial(self._found.append, counts))

    def done(self) -> bool:
        """Whether the counts have arrived."""
        return bool(self._found)

    def merge(self) -> None:
        """Add ``lines`` to each process's stats."""
        counts = self._found[0]
        for by_pid in self._infos.values():
            for pid, stats in by_pid.items():
                if isinstance(stats, dict):
                    stats["lines"] = counts.get(pid, 0)


def _all_done(waits: list[Any]) -> bool:
    """Whether every one of ``waits`` (ExtendedStats, OutputLines) is done."""
    return all(wait.done() for wait in waits)


def _merged(waits: list[Any], reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` once each of ``waits`` has added its part to the stats in it."""
    for wait in waits:
        wait.merge()
    return reply


def _stats_targets(arbiter: Arbiter, properties: dict[str, Any]
                   ) -> list[tuple[Watcher, list[Process]]]:
    """The processes ``stats`` reports on, with their watchers: every
    watcher's, ``name``'s, or its one ``process``."""
    name = properties.get("name")
    if name is None:
        return [(w, list(w.processes.values())) for _, w in sorted(arbiter.watchers.items())]
    watcher = arbiter.get_watcher(name)
    if properties.get("process") is not None:
        return [(watcher, [_watcher_process(watcher, properties["process"])])]
    return [(watcher, list(watcher.processes.values()))]


def handle_stats(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``stats``: cpu, memory and age of every watcher's processes, or of
    ``name``'s, or of its ``process``, read from /proc; with ``extended``,
    once each extended_stats hook has added its own; with ``output``, the
    lines each wrote to its captured streams."""
    tree = functools.cache(children_map)  # fallback mode: read /proc once, if at all
    targets = _stats_targets(arbiter, properties)
    infos = {w.name: {p.pid: _stats_of(p, tree) for p in processes} for w, processes in targets}
    name = properties.get("name")
    exits = {w.name: {"restarts": w.restarts, "last_exit": w.last_exit,
                      "last_exit_reason": w.last_exit_reason} for w, _ in targets}
    reply: dict[str, Any] = {"infos": infos, "exits": exits}
    if name is not None and properties.get("process") is not None:
        pid = targets[0][1][0].pid
        reply = {"process": pid, "info": infos[targets[0][0].name][pid]}
    elif name is not None:
        reply = {"name": name, "info": infos[targets[0][0].name],
                 "tree": _watcher_tree(arbiter, targets[0][0], tree),
                 **exits[targets[0][0].name]}
    extended = ExtendedStats()
    if properties.get("extended"):
        for watcher, processes in targets:
            for process in processes:
                extended.ask(arbiter, watcher, process.pid, infos[watcher.name][process.pid])
    waits: list[Any] = [extended]
    if properties.get("output"):
        waits.append(OutputLines(arbiter, infos))
    if _all_done(waits):
        return _merged(waits, reply)
    return Pending(functools.partial(_all_done, waits), functools.partial(_merged, waits, reply))


def _resident_bytes(pid: int) -> int:
    """A process's resident memory, from /proc/PID/statm (0 if it is gone):
    the cheapest read /proc has, for the metrics."""
    try:
        fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
    except OSError:
        return 0
    try:
        return int(os.read(fd, 256).split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0
    finally:
        os.close(fd)


def _metrics_usage(arbiter: Arbiter, watcher: Watcher) -> tuple[float, int]:
    """A watcher's CPU seconds and memory bytes for the metrics, as cheaply
    as they can be had: its cgroup's cpu.stat and memory.current (one read
    each); with no memory controller, its processes' resident memory (one
    /proc read each, their descendants left out); in fallback mode, its
    processes' own CPU and memory from /proc (one read each)."""
    if arbiter.cgroups is None:  # the reaped ones' CPU too: a counter never falls
        usage = tree_usage(watcher.processes)
        return round(usage["cpu"] + watcher.dead_cpu, 3), usage["memory"]
    folder = arbiter.cgroups.watcher_folder(watcher.name)
    cpu = round(read_keyed(folder, "cpu.stat").get("usage_usec", 0) / 1e6, 3)
    try:
        with open(os.path.join(folder, "memory.current")) as stream:
            return cpu, int(stream.read())
    except (OSError, ValueError):  # no memory controller there
        return cpu, sum(_resident_bytes(pid) for pid in watcher.processes)


def collect_metrics(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """The figures of the metrics endpoint (see MetricsServer): each
    watcher's counts, state, exits and usage (its cgroup's where there is
    one), the respawn histogram, and the output thread's byte counts, asked
    of it.  Not a wire command: the controller hands it over for a scrape."""
    now = arbiter.clock()
    watchers = []
    for name, watcher in sorted(arbiter.watchers.items()):
        cpu, memory = _metrics_usage(arbiter, watcher)
        watchers.append({"name": name, "processes": len(watcher.running()),
                         "wanted": watcher.numprocesses, "state": watcher.status(now),
                         "restarts": watcher.restarts, "exits": dict(watcher.exits),
                         "cpu": cpu, "memory": memory})
    figures = {"watchers": watchers, "respawn": arbiter.respawn_histogram.figures(),
               "output": [], "lost": 0}
    if arbiter.pump is None:
        return figures
    found: list[dict[str, Any]] = []  # appended on the worker thread only

    def deliver(totals: dict[str, Any]) -> None:
        """On the output thread: hand its totals to the worker thread."""
        arbiter.call_on_worker(functools.partial(found.append, totals))

    def done() -> bool:
        """Whether the totals have arrived."""
        return bool(found)

    def result() -> dict[str, Any]:
        """The figures, once they have."""
        return {**figures, **found[0]}
    arbiter.pump.totals(deliver)
    return Pending(done, result)


def handle_dstats(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``dstats``: the same for the daemon itself."""
    return {"info": process_stats(os.getpid())}


def handle_listsockets(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``listsockets``: the ``[socket:NAME]`` sockets bound, by fd."""
    return {"sockets": arbiter.socket_infos()}


def handle_globaloptions(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """``globaloptions``: the daemon's options (endpoints as bound, the
    process limit in force), or the one named ``option``."""
    config = arbiter.config
    options = {"endpoint": config.endpoint, "pubsub_endpoint": config.pubsub_endpoint,
               "check_delay": config.check_delay, "stats_endpoint": None,
               "max_processes": arbiter.process_limit[0],
               "multicast_endpoint": config.multicast_endpoint, **arbiter.bound_endpoints}
    wanted = properties.get("option")
    if wanted is None:
        return {"options": options}
    if wanted not in options:
        raise MessageError(f"{wanted!r} not an existing option")
    return {"options": {wanted: options[wanted]}}


def handle_reloadconfig(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """``reloadconfig``: re-read the INI file the daemon started from and
    apply what changed; reply with the file's warnings (unknown options),
    which are logged too; with ``waiting``, once what changed has settled."""
    source = arbiter.config.source
    if not source or source.startswith("<"):
        raise MinisupError("no INI file to reload: the daemon was not started from one")
    config = load_config(source)
    for message in config.warnings:  # as at start: a typo is told, not swallowed
        logger.warning("%s", message)
    for watcher_config in config.watchers:  # nothing changes if one limit cannot be had
        try:
            arbiter.check_limits(watcher_config)
        except MessageError as exc:
            raise ConfigError(exc.reason, source, f"watcher:{watcher_config.name}") from None
    arbiter.note_reloading()
    touched = arbiter.apply_config(config)
    arbiter.warn_if_over_limit()
    logger.info("reloaded %s", source)
    reply = {"warnings": config.warnings}
    return_now = functools.partial(dict, reply)
    if properties.get("waiting"):
        return Pending(functools.partial(_all_settled, touched), return_now)
    return reply


def handle_tail(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any] | Pending:
    """minisup's ``tail``: the last ``lines`` (10) lines a watcher's
    processes wrote to a captured stream (``stream``: stdout or stderr;
    default both).  The output thread holds them: it is asked, and its
    answer comes back to the worker thread as a call."""
    watcher = arbiter.get_watcher(properties["name"])
    name = watcher.name
    if not watcher.config.stdout_stream and not watcher.config.stderr_stream:
        raise MessageError(f"{name} captures no output: set stdout_stream.class (and "
                           "stderr_stream.class) to keep its lines", BAD_MSG_DATA_ERROR)
    if arbiter.pump is None:
        return {"lines": [], "entries": [], "seq": 0}
    found: list[tuple[list[dict[str, Any]], int]] = []  # appended on the worker thread only

    def deliver(entries: list[dict[str, Any]], seq: int) -> None:
        """On the output thread: hand the lines to the worker thread."""
        arbiter.call_on_worker(functools.partial(found.append, (entries, seq)))

    def done() -> bool:
        """Whether the lines have arrived."""
        return bool(found)

    def result() -> dict[str, Any]:
        """The reply, once they have: the lines, each with its origin, and
        the number of the last output event they hold (``seq``)."""
        entries, seq = found[0]
        return {"lines": [entry["line"] for entry in entries], "entries": entries, "seq": seq}
    arbiter.pump.tail(name, properties.get("lines", 10), properties.get("stream"), deliver)
    return Pending(done, result)


def handle_reopen(arbiter: Arbiter, properties: dict[str, Any]) -> dict[str, Any]:
    """minisup's ``reopen``: reopen every log file, as SIGUSR1 does."""
    if arbiter.pump is not None:
        arbiter.pump.reopen()
    return {}


#: The wire commands: name -> (handler, required, optional properties).
COMMANDS: dict[str, Command] = {
    "list": Command(handle_list, (), ("name",)),
    "status": Command(handle_status, (), ("name", "extended")),
    "health": Command(handle_health),
    "start": Command(handle_start, (), ("name", "match", "waiting")),
    "stop": Command(handle_stop, (), ("name", "match", "waiting")),
    "restart": Command(functools.partial(handle_start, action="restart"), (),
                       ("name", "match", "waiting")),
    "reload": Command(functools.partial(handle_start, action="reload"), (),
                      ("name", "match", "graceful", "sequential", "waiting")),
    "incr": Command(functools.partial(handle_resize, sign=+1), ("name",), ("nb", "waiting")),
    "decr": Command(functools.partial(handle_resize, sign=-1), ("name",), ("nb", "waiting")),
    "numprocesses": Command(handle_numprocesses, (), ("name",)),
    "numwatchers": Command(handle_numwatchers),
    "add": Command(handle_add, ("name", "cmd"), ("args", "options", "start", "waiting")),
    "rm": Command(handle_rm, ("name",), ("nostop", "waiting")),
    "quit": Command(handle_quit, (), ("waiting",)),
    "reloadconfig": Command(handle_reloadconfig, (), ("waiting",)),
    "options": Command(handle_options, ("name",)),
    "get": Command(handle_get, ("name", "keys")),
    "set": Command(handle_set, ("name", "options"), ("waiting",)),
    "signal": Command(handle_signal, ("name", "signum"),
                      ("pid", "childpid", "children", "recursive")),
    "kill": Command(handle_kill, ("name",),
                    ("pid", "signum", "graceful_timeout", "waiting")),
    "stats": Command(handle_stats, (), ("name", "process", "extended", "output")),
    "dstats": Command(handle_dstats),
    "listsockets": Command(handle_listsockets),
    "globaloptions": Command(handle_globaloptions, (), ("option",)),
    "tail": Command(handle_tail, ("name",), ("lines", "stream")),
    "reopen": Command(handle_reopen),
}

#: Commands in a View: without a name, and (the first two) with each name.
VIEW_COMMANDS = ("list", "status", "numwatchers", "numprocesses")


def build_view(arbiter: Arbiter, seq: int) -> View:
    """The replies to reads as this tick ends (see View), for the
    controller; on the worker thread, once a tick."""
    replies = {(command, None): COMMANDS[command].handler(arbiter, {"name": None})
               for command in VIEW_COMMANDS}
    for name in arbiter.watchers:
        for command in VIEW_COMMANDS[:2]:
            replies[(command, name)] = COMMANDS[command].handler(arbiter, {"name": name})
    return View(seq, replies)


# ========================================================== Controller ======

#: Requests read per poll wake-up before replies are flushed (fairness).
RECEIVE_BATCH = 256
# pyzmq's flags and options are enum members, and each | or & of one runs
# Python code (a tenth of a ``list`` round trip): plain ints on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)


class NotFinite(ValueError):
    """A request holds NaN, Infinity or a number too large for a float."""


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, if finite (1e999 is not)."""
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(f"{text[:20]} is out of range")
    return value


def _refuse_constant(name: str) -> float:
    """Python's json reads NaN and Infinity, which are not JSON: refuse them,
    so that no reply ever echoes one (a strict reader would choke on it)."""
    raise NotFinite(f"{name} is not a JSON number")


#: Strict JSON, made once: json.loads with these hooks would make a decoder
#: (and its scanner) per request.
REQUEST_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)


def decode_request(body: bytes, limit: int = 1 << 20) -> dict[str, Any]:
    """Parse one request frame into a dict; raise MinisupError if it is not
    a JSON object of at most ``limit`` bytes, strict JSON (no NaN)."""
    if len(body) > limit:
        raise MessageError(f"message too large ({len(body)} bytes, limit {limit})")
    try:
        message = REQUEST_DECODER.decode(body.decode())
    except NotFinite as exc:
        raise MinisupError(f"json invalid: {exc}", INVALID_JSON) from None
    except (ValueError, RecursionError):
        raise MinisupError("json invalid", INVALID_JSON) from None
    if not isinstance(message, dict):
        raise MessageError("message invalid: not a JSON object")
    return message


def check_request(message: dict[str, Any]) -> tuple[str, Command, dict[str, Any]]:
    """The command a request names (any case), and its properties checked;
    raise MinisupError.  Pids given as digit strings become ints."""
    name = message.get("command")
    if name is None:
        raise MessageError("message invalid 'command' is missing")
    if not isinstance(name, str):
        raise MessageError("'command' must be a string")
    if name.lower() not in COMMANDS:
        raise MinisupError(f"unknown command: {name[:100]!r}", UNKNOWN_COMMAND)
    command = COMMANDS[name.lower()]
    properties = message.get("properties")
    if properties in (None, []):  # circusctl sends [] for none
        properties = {}
    if not isinstance(properties, dict):
        raise MessageError("'properties' must be an object")
    for key in command.required:
        if properties.get(key) is None:
            raise MessageError(f"message invalid {key!r} is missing")
    for key in command.required + command.optional:
        if properties.get(key) is not None:
            properties[key] = _check_property(key, properties[key])
    return name.lower(), command, properties


def _check_property(key: str, value: Any) -> Any:
    """The property ``key``'s value to use (converted if its type says so);
    MessageError if ``value`` is not of its type."""
    types, wanted, convert = PROPERTY_TYPES[key]
    # bool is an int to Python, never to the protocol (unless a bool is wanted).
    typed = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    converted = value
    if typed and convert is not None:
        converted = convert(value)
    if not typed or converted is None:
        raise MessageError(f"{key!r} must be {wanted}, not {value!r}"[:200])
    return converted


def handshake_ivl(seconds: float) -> int:
    """libzmq's ZMQ_HANDSHAKE_IVL (whole milliseconds, rounded up) for
    ``handshake_timeout``, checked again for a Config made in Python: raise
    ConfigError for what the INI file refuses, 0 included (no limit)."""
    try:
        checked = HANDSHAKE.from_json(seconds)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), option="handshake_timeout", value=seconds) from None
    return math.ceil(checked * 1000)


def load_curve_key(path: str, secret: bool = True) -> tuple[bytes, bytes]:
    """The (public, secret) CURVE keys of a ``keygen`` file (a .key file
    has only the public one); raise OSError or ValueError."""
    import zmq.auth  # here: only CURVE users pay for its import
    keys = zmq.auth.load_certificate(path)
    if secret and keys[1] is None:
        raise ValueError(f"{path} holds no secret key: give the .key_secret file")
    return keys


#: The metrics endpoint's bounds: the most bytes of a request's head, the
#: most connections at once (Prometheus holds one), and how long one may
#: stay open before it is closed (a scrape takes milliseconds).
METRICS_REQUEST_LIMIT = 8192
METRICS_CONNECTIONS = 8
METRICS_IDLE_TIMEOUT = 10.0
#: The states ``minisup_watcher_state`` has a series for.
METRIC_STATES = ("stopped", "starting", "active", "backoff", "flapping", "stopping")
HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _label_value(text: str) -> str:
    """``text`` quoted as a label value of the text exposition format."""
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{escaped}"'


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    """One sample line: ``name{label="value",...} value``."""
    pairs = ",".join(f"{key}={_label_value(str(text))}" for key, text in labels.items())
    if pairs:
        return f"{name}{{{pairs}}} {value!r}"
    return f"{name} {value!r}"


def _family(name: str, kind: str, text: str, samples: Iterable[str]) -> list[str]:
    """A metric family: its HELP and TYPE lines, then ``samples``."""
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]


def _watcher_families(watchers: list[dict[str, Any]]) -> list[str]:
    """The per-watcher families of the metrics text.  Labels carry only
    names, states and reasons: never a command, argument or env value."""
    lines = []
    for key, name, text in (("processes", "minisup_watcher_processes", "Processes running."),
                            ("wanted", "minisup_watcher_wanted_processes",
                             "Processes wanted (numprocesses).")):
        lines += _family(name, "gauge", text, (_sample(name, {"watcher": w["name"]}, w[key])
                                               for w in watchers))
    lines += _family("minisup_watcher_state", "gauge", "1 for the watcher's state, else 0.", (
        _sample("minisup_watcher_state", {"watcher": w["name"], "state": state},
                int(w["state"] == state)) for w in watchers for state in METRIC_STATES))
    lines += _family("minisup_watcher_restarts_total", "counter",
                     "Processes replaced after dying on their own.", (
                         _sample("minisup_watcher_restarts_total", {"watcher": w["name"]},
                                 w["restarts"]) for w in watchers))
    lines += _family("minisup_process_exits_total", "counter",
                     "Process exits, by reason: exit code, signal, oom, ready_timeout or "
                     "watchdog_timeout.", (
                         _sample("minisup_process_exits_total",
                                 {"watcher": w["name"], "reason": reason}, count)
                         for w in watchers for reason, count in sorted(w["exits"].items())))
    lines += _family("minisup_watcher_cpu_seconds_total", "counter",
                     "CPU time of all the watcher's processes started (its cgroup's).", (
                         _sample("minisup_watcher_cpu_seconds_total", {"watcher": w["name"]},
                                 float(w["cpu"])) for w in watchers))
    lines += _family("minisup_watcher_memory_bytes", "gauge",
                     "Memory of all the watcher's processes started.", (
                         _sample("minisup_watcher_memory_bytes", {"watcher": w["name"]},
                                 w["memory"]) for w in watchers))
    return lines


def _histogram_family(name: str, text: str, figures: dict[str, Any]) -> list[str]:
    """A histogram family from Histogram.figures()."""
    samples = [_sample(f"{name}_bucket", {"le": repr(float(bound))}, count)
               for bound, count in zip(figures["bounds"], figures["counts"], strict=True)]
    samples.append(_sample(f"{name}_bucket", {"le": "+Inf"}, figures["count"]))
    samples += [_sample(f"{name}_sum", {}, figures["sum"]),
                _sample(f"{name}_count", {}, figures["count"])]
    return _family(name, "histogram", text, samples)


def metrics_text(figures: dict[str, Any], requests: dict[tuple[str, str], int]) -> str:
    """The Prometheus text exposition (version 0.0.4) of the worker's
    ``figures`` (see collect_metrics) and the controller's ``requests``
    counts, by (command, status)."""
    lines = _family("minisup_build_info", "gauge", "minisup's version.",
                    [_sample("minisup_build_info", {"version": __version__}, 1)])
    lines += _watcher_families(figures["watchers"])
    lines += _family("minisup_watcher_output_bytes_total", "counter",
                     "Bytes the watcher's processes wrote to a captured stream.", (
                         _sample("minisup_watcher_output_bytes_total",
                                 {"watcher": name, "stream": stream}, count)
                         for name, stream, count in sorted(figures["output"])))
    lines += _family("minisup_output_lost_bytes_total", "counter",
                     "Captured bytes a log file failed to take (a full disk).",
                     [_sample("minisup_output_lost_bytes_total", {}, figures["lost"])])
    lines += _family("minisup_control_requests_total", "counter",
                     "Control requests answered, by command and status.", (
                         _sample("minisup_control_requests_total",
                                 {"command": command, "status": status}, count)
                         for (command, status), count in sorted(requests.items())))
    lines += _histogram_family("minisup_respawn_seconds",
                               "From a death seen to its replacement running.",
                               figures["respawn"])
    return "\n".join(lines) + "\n"


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  head_only: bool = False, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    head = (f"HTTP/1.1 {status} {HTTP_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode()
    if head_only:
        return head
    return head + body


def _head_end(received: bytes) -> int:
    """Where a request's head ends in ``received`` (its blank line, CRLF or
    a bare LF as RFC 9112 lets a server take), or -1 if not yet."""
    ends = [i for i in (received.find(b"\r\n\r\n"), received.find(b"\n\n")) if i >= 0]
    if not ends:
        return -1
    return min(ends)


def http_problem(head: bytes) -> tuple[int, str] | None:
    """What is wrong with a request's ``head`` for the metrics endpoint, as
    (status, reason), or None for a GET or HEAD of /metrics."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not re.fullmatch(rb"HTTP/1\.[01]", parts[2]):
        return 400, "not an HTTP/1.x request line"
    if parts[0] not in (b"GET", b"HEAD"):
        return 405, "only GET and HEAD"
    if parts[1].split(b"?", 1)[0] != b"/metrics":
        return 404, "the metrics are at /metrics"
    return None


class MetricsConnection:
    """One HTTP connection to the metrics endpoint: what it sent, what is
    left to send it, and when it is closed whatever its state."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        """A connection just accepted, closed at ``deadline`` (monotonic)."""
        self.sock = sock
        self.deadline = deadline
        self.received = b""
        self.outgoing = b""
        self.head_only = False  # a HEAD request
        self.waiting = False  # its figures are asked of the worker
        self.answered = False  # all sent: what it still sends is read and dropped
        self.reading = True  # polled for input (not once the client has half-closed)


class MetricsServer:
    """The ``metrics_endpoint`` listener: ``GET /metrics`` in plain HTTP/1.x,
    one request per connection, bounded in size, count and time.  Owned by
    the controller thread, whose zmq.Poller polls its sockets (``poller``);
    scrapes ask the worker for figures by ``ask()``, one job for all those
    waiting, and are answered by ``answer`` when they come back."""

    def __init__(self, address: tuple[str, int], poller: Any,
                 ask: Callable[[], None]) -> None:
        """Bind the listener on ``address``; raise ConfigError."""
        self._poller = poller
        self._ask = ask
        self._asked = False  # a job for figures is with the worker
        self._connections: dict[int, MetricsConnection] = {}  # by fd
        self._listening = True  # the listener is polled
        self._paused_until = 0.0  # after EMFILE: no accept before then (monotonic)
        family = socket.AF_INET
        if ":" in address[0]:
            family = socket.AF_INET6
        self.listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                      | socket.SOCK_CLOEXEC)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(address)
            self.listener.listen(METRICS_CONNECTIONS)
        except OSError as exc:
            self.listener.close()
            raise ConfigError(f"cannot bind: {exc}", option="metrics_endpoint",
                              value=f"{address[0]}:{address[1]}") from None
        host, port = self.listener.getsockname()[:2]
        self.endpoint = f"{host}:{port}"
        if family == socket.AF_INET6:
            self.endpoint = f"[{host}]:{port}"

    def accept(self) -> None:
        """Take each waiting connection, up to METRICS_CONNECTIONS open at
        once; then the listener is not polled until one closes, and the
        others wait in its backlog."""
        while len(self._connections) < METRICS_CONNECTIONS:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of fds or memory: pause; a connection reset: go on
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning("metrics endpoint: cannot accept (%s): pausing 1 s", exc)
                    self._paused_until = time.monotonic() + 1.0
                    self._listen(False)
                    return
                continue
            sock.setblocking(False)
            connection = MetricsConnection(sock, time.monotonic() + METRICS_IDLE_TIMEOUT)
            self._connections[sock.fileno()] = connection
            self._poller.register(sock.fileno(), zmq.POLLIN)
        self._listen(False)

    def _listen(self, on: bool) -> None:
        """Poll the listener (``on``) or not, if that changes."""
        if on == self._listening:
            return
        self._listening = on
        if on:
            self._poller.register(self.listener, zmq.POLLIN)
        else:
            self._poller.unregister(self.listener)

    def owns(self, fd: Any) -> bool:
        """Whether ``fd`` (as the poller names it) is one of its connections."""
        return fd in self._connections

    def ready(self, fd: int, events: int) -> None:
        """Read from, or write to, the connection on ``fd``."""
        connection = self._connections[fd]
        if events & zmq.POLLOUT:
            self._write(connection)
        if events & zmq.POLLIN and fd in self._connections:
            self._read(connection)

    def _read(self, connection: MetricsConnection) -> None:
        """Read what the client sent; once its head is whole, answer an
        error at once or ask the worker for the figures."""
        try:
            data = connection.sock.recv(METRICS_REQUEST_LIMIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data and (connection.waiting or connection.outgoing):
            connection.reading = False  # half-closed: its answer still goes
            self._poller.modify(connection.sock.fileno(), zmq.POLLOUT * bool(connection.outgoing))
            return
        if not data:  # the client has read the answer, or went away
            self._close(connection)
            return
        if connection.waiting or connection.outgoing or connection.answered:
            return  # more than one request, or the rest of a refused one: dropped
        connection.received += data
        end = _head_end(connection.received)
        if end < 0 and len(connection.received) >= METRICS_REQUEST_LIMIT:
            self._respond(connection, http_response(431, b"request head too large\n"))
        elif end >= 0:
            self._take(connection, connection.received[:end])

    def _take(self, connection: MetricsConnection, head: bytes) -> None:
        """Answer a whole request ``head``: an error, or a scrape."""
        problem = http_problem(head)
        if problem is not None:
            status, reason = problem
            extra = ""
            if status == 405:
                extra = "Allow: GET, HEAD\r\n"
            self._respond(connection, http_response(status, f"{reason}\n".encode(), extra=extra))
            return
        connection.head_only = head.startswith(b"HEAD ")
        connection.waiting = True
        if not self._asked:  # one job serves every scrape waiting for it
            self._asked = True
            self._ask()

    def answer(self, reply: Reply, requests: dict[tuple[str, str], int]) -> None:
        """Send every scrape waiting its metrics (503 if the worker refused)."""
        self._asked = False
        waiting = [c for c in self._connections.values() if c.waiting]
        if not reply.ok:
            for connection in waiting:
                self._respond(connection, http_response(503, f"{reply.reason}\n".encode()))
            return
        body = metrics_text(reply.fields, requests).encode()
        for connection in waiting:
            self._respond(connection, http_response(200, body, "text/plain; version=0.0.4; "
                                                    "charset=utf-8", connection.head_only))

    def _respond(self, connection: MetricsConnection, response: bytes) -> None:
        """Start sending ``response``; the connection ends once it is sent."""
        connection.waiting = False
        connection.outgoing = response
        self._write(connection)

    def _write(self, connection: MetricsConnection) -> None:
        """Send what the socket takes now; close once all is sent, else wait
        until it is writable."""
        try:
            sent = connection.sock.send(connection.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went away
            self._close(connection)
            return
        connection.outgoing = connection.outgoing[sent:]
        if connection.outgoing:
            self._poller.modify(connection.sock.fileno(),
                                zmq.POLLIN * connection.reading | zmq.POLLOUT)
            return
        if not connection.reading:  # the client ended its side: nothing to linger for
            self._close(connection)
            return
        # All sent: end our side, and read (and drop) until the client ends
        # its own (or the deadline comes).  Closing with its bytes unread
        # would reset the connection, and the client could lose the answer.
        connection.answered = True
        self._poller.modify(connection.sock.fileno(), zmq.POLLIN)
        with contextlib.suppress(OSError):  # it may have gone already
            connection.sock.shutdown(socket.SHUT_WR)

    def expire(self, now: float) -> None:
        """Close every connection open past its deadline (time.monotonic),
        and accept again once a pause for want of fds is over."""
        for connection in [c for c in self._connections.values() if now >= c.deadline]:
            self._close(connection)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._listen(len(self._connections) < METRICS_CONNECTIONS)

    def next_timeout(self, now: float) -> float | None:
        """Seconds until the next deadline, None if there is none."""
        deadlines = [c.deadline for c in self._connections.values()]
        if self._paused_until:
            deadlines.append(self._paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _close(self, connection: MetricsConnection) -> None:
        """Forget and close one connection."""
        fd = connection.sock.fileno()
        with contextlib.suppress(KeyError):  # not polled once it half-closed and waits
            self._poller.unregister(fd)
        del self._connections[fd]
        connection.sock.close()
        if not self._paused_until:  # room again: accept
            self._listen(True)

    def close(self) -> None:
        """Close every connection and the listener."""
        self._paused_until = 1.0  # closing: never listen again
        for connection in list(self._connections.values()):
            self._close(connection)
        self.listener.close()


def _guarded_metrics(function: Callable[..., None], *args: Any) -> None:
    """Call a MetricsServer method for the controller's loop, logging what
    it raises: a fault of the metrics endpoint must never end the thread
    that answers the control socket."""
    try:
        function(*args)
    except Exception:
        logger.exception("metrics endpoint: %s failed", getattr(function, "__name__", function))


def _command_label(message: Any) -> str:
    """The ``command`` label of a refused request in the metrics: its
    command if minisup has one of that name, else "unknown" (a label made
    of whatever a client sends would grow without bound)."""
    command = None
    if isinstance(message, dict):
        command = message.get("command")
    if isinstance(command, str) and command in COMMANDS:
        return command
    return "unknown"


def _poll_key(sock: Any) -> Any:
    """How zmq.Poller names a ready socket: a zmq socket itself, another
    by its fd."""
    if isinstance(sock, zmq.Socket):
        return sock
    return sock.fileno()


class Controller:
    """Owns a zmq context with the ROUTER control and PUB event sockets, and
    the UDP discovery socket; ``run`` is the controller thread.  It checks each
    request, hands it to the worker (``submit``) and sends the replies and
    events posted to it.  Other threads call only ``post``, ``publish`` and
    ``shutdown``.  Once ``bound`` is set, the endpoints hold what was bound."""

    def __init__(self, config: Config, submit: Callable[[Job], None]) -> None:
        self.config = config
        self.context = zmq.Context()
        self.context.linger = 0  # for each socket it makes: a close never waits
        self.endpoint = config.endpoint  # then as bound (an ephemeral port, say)
        self.pubsub_endpoint = config.pubsub_endpoint
        self.multicast_endpoint = config.multicast_endpoint
        self.metrics_endpoint = config.metrics_endpoint
        self.bound = threading.Event()
        self.error: BaseException | None = None
        # Two references shared on purpose, each written by one thread and
        # read by others, each an immutable value swapped whole (an atomic
        # store under the GIL), never a structure modified in place:
        # ``view`` is written by the worker as each tick ends and read here;
        # ``subscribed`` is written here and read by the worker and output
        # threads (``wants``), so that no event is encoded for nobody.
        self.view: View | None = None
        self.subscribed: frozenset[bytes] = frozenset()
        self._encoded_view: View | None = None  # the view whose replies are encoded
        self._encoded: dict[tuple[str, str | None], str] = {}  # its replies as JSON, once
        self._submit = submit
        self._seq = 0  # how many jobs it was handed
        # What the other threads post: ("control", frames, (command, status)),
        # ("pubsub", frames, None), ("metrics", scrape number, Reply), None to end.
        self._outbox: queue.SimpleQueue[tuple[str, Any, Any] | None] = queue.SimpleQueue()
        self._waker = Waker()
        self._sockets: dict[str, Any] = {"waker": self._waker}  # what ``_serve`` polls
        self._paths: list[str] = []  # ipc socket files we bound
        self._poller = zmq.Poller()
        self._metrics: MetricsServer | None = None  # metrics_endpoint's, if set
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()

    def post(self, envelope: list[bytes], message_id: Any, reply: Reply,
             command: str = "unknown") -> None:
        """Queue a reply, Circus-shaped, for the controller to send to the
        client of ``envelope`` (and count, by ``command``).  Any thread;
        never blocks."""
        body = json.dumps(reply.to_json(message_id)).encode()
        status = "ok"
        if not reply.ok:
            status = "error"
        self._outbox.put(("control", [*envelope, body], (command, status)))
        self._waker.wake()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queue an event for the PUB socket, if anyone subscribed.  Any thread."""
        if self.wants(topic):
            self._outbox.put(("pubsub", [topic.encode(), json.dumps(payload).encode()], None))
            self._waker.wake()

    def _ask_figures(self) -> None:
        """Hand the worker a job for the figures of the scrapes waiting (see
        collect_metrics); its reply comes back by the outbox.  Numbered 0:
        it changes nothing, so the View stays good for reads meanwhile."""
        self._submit(Job("metrics", collect_metrics, {}, self._figures_ready, 0))

    def _figures_ready(self, reply: Reply) -> None:
        """Queue the worker's figures for the waiting scrapes.  Worker thread."""
        self._outbox.put(("metrics", None, reply))
        self._waker.wake()

    def shutdown(self) -> None:
        """Ask the loop to send what is queued, close the sockets and end."""
        self._outbox.put(None)
        self._waker.wake()

    def run(self) -> None:
        """Bind, set ``bound`` (``error`` on failure) and serve until shutdown."""
        try:
            self._bind_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised by Daemon.start
            self.error = exc
        self.bound.set()
        try:
            if self.error is None:
                self._serve()
        finally:
            for sock in self._sockets.values():
                sock.close()  # the context's linger is 0: nothing waits
            if self._metrics is not None:
                self._metrics.close()
            self.context.term()
            for path in self._paths:  # libzmq leaves them: a stale one confuses ctl
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _bind_all(self) -> None:
        """Bind every socket the config asks for: the ZAP handler first
        with CURVE, the control socket, then the PUB socket and the UDP
        discovery socket if set; raise ConfigError."""
        if self.config.curve_secret_key:
            # libzmq asks the ZAP handler of the context (RFC 27) about each
            # CURVE client before it lets it in: bound first, answered by us.
            from zmq.auth import load_certificates  # here: ctl need not pay for it
            folder = self.config.curve_authorized_keys
            if not os.path.isdir(folder or ""):
                raise ConfigError("not a folder", option="curve_authorized_keys", value=folder)
            self._authorized = {zmq.utils.z85.decode(k) for k in load_certificates(folder)}
            self._sockets["zap"] = self.context.socket(zmq.REP)
            self._sockets["zap"].bind("inproc://zeromq.zap.01")
        check_endpoint_owner(self.config.endpoint_owner)  # a Config built in Python too
        self.endpoint = self._bind_zmq("control", zmq.ROUTER, self.endpoint)
        logger.info("control socket listening on %s", self.endpoint)
        if self.pubsub_endpoint:
            self.pubsub_endpoint = self._bind_zmq("pubsub", zmq.XPUB, self.pubsub_endpoint)
            logger.info("publishing events on %s", self.pubsub_endpoint)
        if self.metrics_endpoint:
            address = check_metrics_endpoint(self.metrics_endpoint)
            self._metrics = MetricsServer(address, self._poller, self._ask_figures)
            self.metrics_endpoint = self._metrics.endpoint
            logger.info("serving metrics on http://%s/metrics", self.metrics_endpoint)
        if not self.multicast_endpoint:
            return
        host, port = check_udp_endpoint(self.multicast_endpoint)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sockets["discovery"] = sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            if not host.startswith("127."):  # checked: so a multicast group
                group = socket.inet_aton(host) + socket.inet_aton("0.0.0.0")
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
        except OSError as exc:
            raise ConfigError(f"cannot bind: {exc}", option="multicast_endpoint",
                              value=self.multicast_endpoint) from None
        self.multicast_endpoint = "udp://{}:{}".format(*sock.getsockname())

    def _bind_zmq(self, role: str, socket_type: int, endpoint: str) -> str:
        """Bind the zmq socket of ``role`` (control, pubsub) on ``endpoint``,
        CURVE if keys are set, size- and handshake-bounded; return the
        endpoint as bound.  Raise ConfigError."""
        curve = self.config.curve_secret_key
        path = prepare_ipc_endpoint(check_endpoint(endpoint, bool(curve)))
        sock = self.context.socket(socket_type)
        self._sockets[role] = sock
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * self.config.max_message_size)
        # An unfinished handshake holds an fd: bound its time, CURVE or not.
        sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ivl(self.config.handshake_timeout))
        try:
            if curve:
                sock.curve_publickey, sock.curve_secretkey = load_curve_key(curve)
                sock.curve_server = True
            sock.bind(endpoint)
            if path:
                self._paths.append(path)
                # The folder is private; belt and braces.  No chown to
                # endpoint_owner: it can only be our own user (checked).
                os.chmod(path, 0o600)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot bind: {exc}", option=f"{role} endpoint",
                              value=endpoint) from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint

    def _answer_zap(self, zap: zmq.Socket) -> None:
        """Answer libzmq's question about a CURVE client (RFC 27): in if
        its public key is among the authorized ones."""
        frames = zap.recv_multipart()  # version, id, domain, address, identity, mechanism, key
        allowed = len(frames) == 7 and frames[5] == b"CURVE" and frames[6] in self._authorized
        verdict = [b"400", b"unknown key"]
        if allowed:
            verdict = [b"200", b"OK"]
        zap.send_multipart([b"1.0", frames[1], *verdict, b"", b""])

    def _serve(self) -> None:
        """The controller thread's loop: block in the poller, read what is
        ready, then send what the other threads posted, until shutdown."""
        readers = {"waker": Waker.drain, "zap": self._answer_zap, "control": self._receive,
                   "pubsub": self._note_subscriptions, "discovery": self._answer_discovery}
        poller = self._poller
        read: dict[Any, Callable[[], None]] = {}  # by what poll names: a zmq socket or an fd
        for role, sock in self._sockets.items():
            poller.register(sock, zmq.POLLIN)
            read[_poll_key(sock)] = functools.partial(readers[role], sock)
        metrics = self._metrics
        if metrics is not None:
            poller.register(metrics.listener, zmq.POLLIN)
            read[metrics.listener.fileno()] = functools.partial(_guarded_metrics, metrics.accept)
        while True:
            for ready, events in poller.poll(self._poll_timeout()):
                if ready in read:
                    read[ready]()
                elif metrics is not None and metrics.owns(ready):
                    _guarded_metrics(metrics.ready, ready, events)
            if metrics is not None:
                _guarded_metrics(metrics.expire, time.monotonic())
            while not self._outbox.empty():  # we alone take from it: get won't block
                item = self._outbox.get()
                if item is None:
                    return
                self._dispatch(*item)

    def _poll_timeout(self) -> int | None:
        """How long the poll may block, in ms: until the metrics endpoint's
        next idle connection is due to close; None (no limit) if none is open."""
        if self._metrics is None:
            return None
        seconds = self._metrics.next_timeout(time.monotonic())
        if seconds is None:
            return None
        return math.ceil(seconds * 1000)

    def _dispatch(self, role: str, payload: Any, label: Any) -> None:
        """Send one posted item: a reply (counted by its ``label``, the
        command and status), an event, or a scrape's figures."""
        if role == "metrics":
            if self._metrics is not None:
                self._metrics.answer(label, self.requests)
            return
        if role == "control":
            self.requests[label] += 1
        self._send(role, payload)

    def wants(self, topic: str) -> bool:
        """Whether a subscriber would get ``topic``.  Any thread."""
        return any(topic.encode().startswith(prefix) for prefix in self.subscribed)

    def _note_subscriptions(self, sock: zmq.Socket) -> None:
        """Track the topics someone subscribes to: the XPUB tells of each
        topic's first subscriber (``\\x01`` TOPIC) and of its last (``\\x00``)."""
        topics = set(self.subscribed)
        while sock.getsockopt(EVENTS) & POLLIN:  # then a recv cannot fail
            message = sock.recv(NOBLOCK)
            if message[:1] == b"\x01":
                topics.add(message[1:])
            else:
                topics.discard(message[1:])
        self.subscribed = frozenset(topics)  # swapped whole: see __init__

    def _answer_discovery(self, sock: socket.socket) -> None:
        """Answer each discovery datagram (any is a question) with the
        control endpoint, to its sender."""
        answer = json.dumps({"endpoint": self.endpoint}).encode()
        with contextlib.suppress(OSError):  # BlockingIOError: all read
            while True:
                _, sender = sock.recvfrom(65536)
                sock.sendto(answer, sender)

    def _receive(self, sock: zmq.Socket) -> None:
        """Read and handle up to RECEIVE_BATCH requests.  EVENTS tells if
        one is there, even when the poll's news was stale (not a recv until
        zmq.Again: an exception per wake-up costs); a ROUTER that says so
        holds it already, so the recv cannot fail."""
        for _ in range(RECEIVE_BATCH):
            if not sock.getsockopt(EVENTS) & POLLIN:
                return
            frames = sock.recv_multipart(NOBLOCK)
            try:
                self._handle(frames)
            except Exception as exc:  # noqa: BLE001 - a bug must not silence the daemon
                self.post(frames[:1], None, server_error("(request)", exc))

    def _handle(self, frames: list[bytes]) -> None:
        """Check one request (``frames``: envelope, then the JSON body) and
        answer it from the View or hand it to the worker; a bad one gets its
        error reply, a cast none."""
        envelope = frames[:-1]
        message_id = None
        message = None
        cast = False
        try:
            # A REQ client adds an empty frame; the same envelope answers it.
            if len(envelope) != 1 and envelope[1:] != [b""]:
                envelope = envelope[:1]
                raise MessageError("message invalid: send the request as one frame")
            message = decode_request(frames[-1], self.config.max_message_size)
            message_id = message.get("id")
            cast = message.get("msg_type") == "cast"
            name, command, properties = check_request(message)
        except MinisupError as exc:
            if not cast:
                self.post(envelope, message_id, Reply.refusal(exc), _command_label(message))
            return
        viewed = None
        if not properties.get("extended"):
            viewed = self._from_view(name, properties)
        if viewed is not None:
            if not cast:  # post's shape, with the body encoded once a view
                self.requests[(name, "ok")] += 1
                self._send("control", [*envelope, (
                    f'{{"status": "ok", "time": {time.time()!r}, {viewed}, '
                    f'"id": {json.dumps(message_id)}}}').encode()])
            return
        reply = ignore_reply
        if not cast:
            reply = functools.partial(self.post, envelope, message_id, command=name)
        self._seq += 1
        self._submit(Job(name, command.handler, properties, reply, self._seq))

    def _from_view(self, command: str, properties: dict[str, Any]) -> str | None:
        """The reply's fields as JSON text, if the latest view has them and
        the worker has run every job handed to it (else None: ask it)."""
        view = self.view  # one read: the worker may replace it meanwhile
        if view is None or view.seq != self._seq:
            return None  # a job of ours is not run yet: ask the worker
        if view is not self._encoded_view:
            self._encoded_view = view
            self._encoded = {}
        name = properties.get("name")
        if not isinstance(name, str):  # unchecked: the command takes none
            name = None
        key = (command, name)
        if name is not None:
            key = (command, name.lower())
        if key not in self._encoded and key in view.replies:
            self._encoded[key] = json.dumps(view.replies[key])[1:-1]
        return self._encoded.get(key)

    def _send(self, role: str, frames: list[bytes]) -> None:
        """Send a reply or an event without blocking: one to a client that
        stopped reading is dropped (and logged at debug)."""
        sock = self._sockets[role]  # send per frame: pyzmq's send_multipart costs more
        try:
            for frame in frames[:-1]:
                sock.send(frame, NOBLOCK_MORE)
            sock.send(frames[-1], NOBLOCK)
        except zmq.ZMQError as exc:  # a client that stopped reading: never block
            logger.debug("%s message dropped: %s", role, exc)


# ========================================================== SysHandler ======
# The main thread's signal handlers, as Circus's SysHandler: each only queues
# work for another thread and wakes it, never does the work itself.

class SysHandler:
    """Installs the daemon's signal handlers (``install``, on the main
    thread) and sends each signal to its ``handle_<name>``: TERM, INT and
    QUIT quit gracefully (a second one SIGKILLs every child), HUP reloads
    every watcher, CHLD looks for orphans, USR1 reopens the log files.  The
    four actions are callables (the Daemon's ``request_quit``,
    ``request_reload``, ``Arbiter.notice_child_exit``, ``Pump.reopen``),
    each safe in a signal handler: this section needs nothing below it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
               signal.SIGCHLD, signal.SIGUSR1)

    def __init__(self, quit: Callable[[bool], None], reload: Callable[[], None],
                 child_exited: Callable[[], None], reopen: Callable[[], None]) -> None:
        self._quit = quit
        self._reload = reload
        self._child_exited = child_exited
        self._reopen = reopen
        self._quits = 0  # the first is graceful, any later one forced

    def install(self) -> None:
        """Install the handlers.  On the main thread only (Python's rule)."""
        for signum in self.SIGNALS:
            signal.signal(signum, self.dispatch)

    def dispatch(self, signum: int, frame: Any) -> None:
        """The handler of every signal: calls ``handle_<name>`` (``handle_term``)."""
        name = signal.Signals(signum).name[len("SIG"):].lower()
        getattr(self, f"handle_{name}")()

    def _request_quit(self) -> None:
        """Quit gracefully the first time, SIGKILL every child after."""
        self._quits += 1
        self._quit(self._quits > 1)

    def handle_term(self) -> None:
        """SIGTERM (systemd, kill, docker stop): quit."""
        self._request_quit()

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C): quit."""
        self._request_quit()

    def handle_quit(self) -> None:
        """SIGQUIT: quit."""
        self._request_quit()

    def handle_hup(self) -> None:
        """SIGHUP: reload every watcher gracefully."""
        self._reload()

    def handle_chld(self) -> None:
        """SIGCHLD: a child died; in subreaper mode, orphans may wait."""
        self._child_exited()

    def handle_usr1(self) -> None:
        """SIGUSR1: reopen every log file (after a logrotate)."""
        self._reopen()


# ============================================================== Daemon ======

#: How long ``Daemon.start`` waits for the bind and the first spawns.
START_TIMEOUT = 30.0


class Daemon:
    """A whole supervisor inside this process: the controller, worker and output
    threads around one ``Config``.  For the caller (one thread): ``start``, ``stop``,
    ``wait``, ``client``; ``request_quit`` and ``request_reload`` are safe in a signal
    handler.  It installs no signal handler and has its own zmq context, so several
    live in one process.  ``subreaper`` (the CLI's) adopts orphans: for a process
    that is only the daemon.  ``systemd``: a NOTIFY_SOCKET to tell (``watchdog``:
    WATCHDOG_USEC in seconds)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 subreaper: bool = False, systemd: str | None = None,
                 watchdog: float = 0.0) -> None:
        self.config = config
        self.endpoint = config.endpoint  # then as bound (an ephemeral port, say)
        self.pump = Pump()
        self.arbiter = Arbiter(config, clock, self.pump, subreaper, systemd, watchdog)
        self._started = False
        self._contained = False  # open_containment has run
        self._stopped = False
        self._client: Client | None = None
        self._worker_thread: threading.Thread | None = None  # started once the rest is up

    @classmethod
    def from_ini(cls, text: str, source: str = "<string>") -> Daemon:
        """A Daemon for INI ``text``; raise ConfigError."""
        return cls(parse_config(text, source))

    def __enter__(self) -> Self:
        """Start the daemon (see ``start``)."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the daemon (see ``stop``)."""
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Bind the control socket, start the autostart watchers and return
        once they have spawned and are ready (``timeout`` at most).  Raise
        ConfigError if a bind fails."""
        if self._started:
            raise MinisupError("a Daemon starts only once")
        self.open_containment()
        self._started = True
        raise_fd_limit()  # before process_limit counts on it
        self.arbiter.process_limit = process_limit(self.config.max_processes)
        self._warn_at_start()
        # The start is the worker's first job, queued before the control
        # socket exists: a command sent the moment it does runs after it.
        started: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        self.arbiter.submit(Job("start", handle_start, {"waiting": True}, started.put))
        self._output_thread = self._thread(self.pump.run, "output")
        self.controller = Controller(self.config, self.arbiter.submit)
        self._controller_thread = self._thread(self.controller.run, "controller")
        self.controller.bound.wait()
        try:
            self._prepare_worker()
        except BaseException:
            self.stop()
            raise
        self._worker_thread = self._thread(self._run_worker, "worker")
        reply = Reply.refusal(MinisupError(f"the start did not finish in {timeout}s"))
        with contextlib.suppress(queue.Empty):
            reply = started.get(timeout=timeout)
        if not reply.ok:  # a watcher slow or unable to start: not fatal
            logger.error("not every watcher started: %s", reply.reason)
        return self

    def open_containment(self) -> None:
        """Make the daemon's cgroup subtree, or choose the fallback, and
        check every watcher's limits (see Arbiter.open_containment); once,
        by ``start``, or before it by a caller that tells these config
        errors apart.  Raise ConfigError, having released what it made."""
        if self._contained:
            return
        self._contained = True
        try:
            self.arbiter.open_containment()
        except BaseException:
            self.stop()
            raise

    def _warn_at_start(self) -> None:
        """Log the config's warnings, a process limit too low for it, and a
        root daemon that every local user may drive."""
        for message in self.config.warnings:
            logger.warning("%s", message)
        self.arbiter.warn_if_over_limit()
        tcp = self.config.endpoint.startswith("tcp://")
        if os.geteuid() == 0 and tcp and not self.config.curve_secret_key:
            logger.warning("every local user may send commands to %s, so may act as root: "
                           "use an ipc:// endpoint or CURVE keys", self.config.endpoint)

    def _prepare_worker(self) -> None:
        """Once the controller has bound (or failed: its error is raised
        here), bind the watchers' sockets, become a subreaper, start the
        guardian and connect the worker to the controller.  The worker does
        not run yet, so nothing here races with it."""
        if self.controller.error is not None:
            raise self.controller.error
        self.arbiter.bind_sockets()
        if self.arbiter.reaper.subreaper:
            set_child_subreaper()
        if self.config.guardian:
            self.arbiter.start_guardian()
        try:
            self.arbiter.spawner = Spawner()
        except OSError as exc:  # no private fd table: the worker forks, as it can
            logger.debug("no spawner thread: %s", exc)
        # What the controller really bound (an ephemeral port, say) is what
        # globaloptions reports.
        self.endpoint = self.controller.endpoint
        self.arbiter.bound_endpoints = {key: getattr(self.controller, key) for key in (
            "endpoint", "pubsub_endpoint", "multicast_endpoint", "metrics_endpoint")}
        # Events go out by the controller's queue (from the worker and the
        # output threads); each View is handed over as a reference swap.
        self.arbiter.on_event = self.controller.publish
        self.pump.publish = self.controller.publish
        self.pump.wanted = self.controller.wants
        self.arbiter.on_view = self._publish_view

    def _publish_view(self, arbiter: Arbiter, seq: int) -> None:
        """On the worker thread as a tick ends: hand the controller the
        replies to reads (the shared ``Controller.view``)."""
        self.controller.view = build_view(arbiter, seq)

    def _thread(self, target: Callable[[], None], role: str) -> threading.Thread:
        """Start a daemon thread named ``minisup-ROLE`` running ``target``."""
        thread = threading.Thread(target=target, name=f"minisup-{role}", daemon=True)
        thread.start()
        return thread

    def _run_worker(self) -> None:
        """The worker thread: the arbiter's loop; the controller ends with it."""
        try:
            self.arbiter.run()
        finally:
            self.controller.shutdown()

    def request_quit(self, force: bool = False) -> None:
        """Ask for a graceful quit (``force``: SIGKILL every child now).
        Never blocks; safe in a signal handler."""
        if force:
            self.arbiter.call_on_worker(self.arbiter.kill_everything)
        else:
            self.arbiter.call_on_worker(self.arbiter.begin_quit)

    def request_reload(self) -> None:
        """Ask for a graceful reload of every watcher (SIGHUP).  Never
        blocks; safe in a signal handler."""
        reload = functools.partial(handle_start, self.arbiter, {}, "reload")
        self.arbiter.call_on_worker(reload)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the daemon has quit (say by a ``quit`` command);
        True if it has."""
        if self._worker_thread is None:
            raise MinisupError("the Daemon was never started")
        self._worker_thread.join(timeout)
        return not self._worker_thread.is_alive()

    @property
    def client(self) -> Client:
        """A Client connected to this daemon, closed by ``stop``."""
        if self._client is None:
            self._client = Client(self.endpoint)
        return self._client

    def stop(self) -> None:
        """Stop every child gracefully, join both threads and release every
        socket and fd.  Idempotent; blocks up to the longest graceful_timeout."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            self.arbiter.close()
            self.pump.close()
            return
        if self._worker_thread is not None:
            self.request_quit()  # left unanswered if the worker has quit already
            self._worker_thread.join()
        if self.arbiter.spawner is not None:  # after the worker: no spawn can come
            self.arbiter.spawner.close()
            self.arbiter.spawner = None
        self.controller.shutdown()  # as the worker did as it ended, if it ran
        self._controller_thread.join()
        if self._client is not None:
            self._client.close()
        self.arbiter.close()
        self.pump.stop()  # after the worker: every pipe is drained by now
        self._output_thread.join()
        # A hook past its timeout may still run (no thread can be stopped):
        # a moment for it, then it is left behind, a daemon thread.
        self.arbiter.hooks.join(HOOK_JOIN_TIMEOUT)


# ============================================================== Client ======

#: How long a client waits for a reply by default, as circusctl does.
CLIENT_TIMEOUT = 5.0


def ipc_problem(endpoint: str) -> str | None:
    """Why no daemon can answer on ``endpoint`` now, when its ipc socket
    file tells (missing, not ours to open, or nobody listening: a stale
    file), else None.  Never blocks: the probe connects without waiting."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if not os.path.exists(path):
        return f"no socket at {path}: is the daemon running (minisup run)?"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no permission on {path}: run as the daemon's user"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog says EAGAIN: someone listens
        if probe.connect_ex(path) == errno.ECONNREFUSED:
            return f"nothing listens at {path} (a stale socket file): is the daemon running?"
    return None


class Client:
    """A DEALER on a daemon's control socket, as Circus's; one thread only.
    ``call`` returns the reply, whatever its status; CallError: no reply."""

    def __init__(self, endpoint: str | None = None, timeout: float = CLIENT_TIMEOUT,
                 curve_key: str | None = None, server_key: str | None = None) -> None:
        """``curve_key``: our keygen .key_secret file, ``server_key`` the
        daemon's .key file, for a daemon that has CURVE keys."""
        if not endpoint:  # None or "": the default, as ctl's
            endpoint = default_endpoint()
        self.endpoint = endpoint
        self.timeout = timeout
        keys = None
        if curve_key or server_key:  # read first: a bad file leaks no context
            keys = (load_curve_key(curve_key or ""), load_curve_key(server_key or "", False))
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        if keys is not None:
            self._socket.curve_publickey, self._socket.curve_secretkey = keys[0]
            self._socket.curve_serverkey = keys[1][0]
        try:
            self._socket.connect(self.endpoint)
        except zmq.ZMQError:  # "foo", "tcp://nohost": libzmq says only EINVAL
            self.close()
            raise ConfigError("use ipc://PATH or tcp://HOST:PORT", option="endpoint",
                              value=self.endpoint) from None
        self._counter = 0
        self._answered = False  # until a first reply, a missing socket fails at once

    def __enter__(self) -> Self:
        """The client itself, closed at the block's end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the client (see ``close``)."""
        self.close()

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        """Send ``command`` with ``properties``; return the reply."""
        return self.send({"command": command, "properties": properties})

    def send(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send a whole request dict (an ``id`` is added) and wait for the
        reply carrying that id; raise CallError after ``timeout``."""
        if not self._answered:  # no waiting out the timeout for a daemon that is not there
            problem = ipc_problem(self.endpoint)
            if problem is not None:
                raise CallError(f"no daemon at {self.endpoint}; {problem}")
        self._counter += 1
        message_id = f"{os.getpid()}-{id(self):x}-{self._counter}"
        self._socket.send(json.dumps(dict(message, id=message_id)).encode())
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._socket.poll(left * 1000):
            reply = json.loads(self._socket.recv())
            if isinstance(reply, dict) and reply.get("id") == message_id:
                self._answered = True
                return reply
            # A late reply to an earlier call that timed out: skip it.
        hint = ipc_problem(self.endpoint)
        if hint is None:
            hint = "is the daemon running, and on this endpoint (--endpoint)?"
        raise CallError(f"no answer from {self.endpoint} within {self.timeout:g}s; {hint}")

    def close(self) -> None:
        """Close the socket and the client's own zmq context.  Idempotent."""
        if not self._context.closed:
            self._socket.close(linger=0)
            self._context.term()


# ================================================================= CLI ======

#: ctl sub-commands: name -> (help, arguments): ``x`` positional, ``x?``
#: optional, ``x+`` one or more; ``--flag`` a boolean property, ``--opt=``
#: one with a value.  Arguments named in ARG_TYPES are converted.
CTL_COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "list": ("list the watchers, or the pids of one", ("name?",)),
    "status": ("a table of every watcher's processes, or of one's",
               ("name?", "--extended")),
    "watch": ("redraw the status table every --interval seconds", ("name?", "--interval=")),
    "top": ("a live view of every watcher and process (q quits)", ("name?", "--interval=")),
    "health": ("exit 0 if every autostart watcher is up and ready, else 3 and why", ()),
    "start": ("start the autostart watchers, or NAME", ("name?", "--match=", "--waiting")),
    "stop": ("stop every watcher, or NAME", ("name?", "--match=", "--waiting")),
    "restart": ("stop, then start, all or NAME", ("name?", "--match=", "--waiting")),
    "reload": ("replace processes gracefully", ("name?", "--sequential", "--waiting")),
    "reloadconfig": ("re-read the INI file and apply what changed", ("--waiting",)),
    "incr": ("run more processes of a watcher", ("name", "nb?", "--waiting")),
    "decr": ("run fewer processes of a watcher", ("name", "nb?", "--waiting")),
    "numprocesses": ("how many processes are wanted (with NAME: running)", ("name?",)),
    "numwatchers": ("how many watchers there are", ()),
    "add": ("add a watcher", ("name", "cmd", "--start", "--waiting")),
    "rm": ("remove a watcher, stopping it", ("name", "--nostop", "--waiting")),
    "options": ("show every option of a watcher", ("name",)),
    "get": ("show some options of a watcher", ("name", "keys+")),
    "set": ("set NAME KEY VALUE [KEY VALUE ...]", ("name", "pairs+", "--waiting")),
    "signal": ("send a signal", ("name", "pid?", "signum", "--children", "--recursive")),
    "kill": ("stop processes gracefully with another signal or grace period",
             ("name", "pid?", "--signum=", "--graceful_timeout=", "--waiting")),
    "stats": ("cpu (over --interval), memory and age of processes",
              ("name?", "process?", "--interval=")),
    "dstats": ("cpu, memory and age of the daemon", ()),
    "listsockets": ("list the sockets the daemon bound", ()),
    "globaloptions": ("show the daemon's options", ("option?",)),
    "tail": ("a watcher's last lines (minisup's own)", ("name", "--lines=", "--stream=",
                                                        "--follow")),
    "reopen": ("reopen every log file (minisup's own)", ()),
    "quit": ("stop every process and the daemon", ("--waiting",)),
}
def _positive_seconds(text: str) -> float:
    """``--interval``'s value: a number of seconds above 0 (argparse says
    so otherwise)."""
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text}: not a number of seconds above 0")
    return value


#: The ctl arguments that are not strings: name -> converter.
#: The short spellings of some ctl flags, as tail and watch have them.
SHORT_FLAGS = {"--lines": "-n", "--follow": "-f", "--interval": "-n"}
ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "nb": int, "pid": int, "process": int, "graceful_timeout": float, "lines": int,
    "interval": _positive_seconds}

#: Exit codes, as circusctl's: scripts written for it keep working.
EXIT_OK = 0
EXIT_NO_ANSWER = 1  # ctl: no reply; run: the daemon could not start or gave up
EXIT_USAGE = 2  # argparse's own, for a usage error
EXIT_ERROR_REPLY = 3  # ctl: the daemon answered with an error


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line: ``run``, ``keygen`` and ``ctl`` with their options.
    Only the sub-commands ``argv`` names are built, if it names any:
    argparse takes long to build each one, and ``ctl`` should answer fast."""
    if argv is None:
        argv = sys.argv[1:]
    words = set(argv)
    parser = argparse.ArgumentParser(prog="minisup", description="A small process "
                                     "supervisor that speaks Circus's control protocol.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="action", required=True)
    if "run" in words or "ctl" not in words:
        _add_run_parser(commands)
        _add_keygen_parser(commands)
        completion = commands.add_parser("completion", help="print a shell's completion "
                                         "script", description="Print the completion script "
                                         "for SHELL: eval \"$(minisup completion bash)\".")
        completion.add_argument("shell", choices=["bash"])
    _add_ctl_parser(commands, words)
    return parser


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``run`` and its options to build_parser's sub-commands."""
    run = commands.add_parser("run", help="run the daemon in the foreground", description=(
        "Supervise the programs of CONFIG (a Circus-style INI file) or of --cmd."))
    run.add_argument("config", nargs="?", help="the INI file")
    run.add_argument("--cmd", help="run this one command with no INI file")
    run.add_argument("--name", help="the watcher's name with --cmd")
    run.add_argument("--numprocesses", type=int, default=1, metavar="N",
                     help="how many copies of --cmd (default 1)")
    run.add_argument("--endpoint", help="control endpoint (default: a private "
                     "ipc socket that ctl finds too)")
    run.add_argument("--log-level", dest="loglevel", help="debug, info, warning or error")
    run.add_argument("--log-output", dest="logoutput", help="'-', 'stdout', 'stderr' or a file")
    run.add_argument("--check-delay", type=float, metavar="S",
                     help="seconds between safety sweeps of every child")
    run.add_argument("--pidfile", help="write the daemon's pid there (refused if it is alive)")
    run.add_argument("--daemon", action="store_true", help="detach; exit once it serves")


def _add_keygen_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``keygen`` and its arguments to build_parser's sub-commands."""
    keygen = commands.add_parser("keygen", help="make a CURVE key pair", description="Write "
                                 "FOLDER/NAME.key (public), FOLDER/NAME.key_secret (0600).")
    keygen.add_argument("folder")
    keygen.add_argument("name", nargs="?", default="minisup")


def _add_ctl_parser(commands: argparse._SubParsersAction, words: set[str]) -> None:
    """Add ``ctl`` with its options to build_parser's sub-commands, and
    under it the CTL_COMMANDS that ``words`` names (every one if none)."""
    ctl = commands.add_parser("ctl", help="send a command to a running daemon", description=(
        "Drive a running daemon, like circusctl. Exit: 0 ok, 1 no answer, 2 usage, 3 error."))
    ctl.add_argument("--endpoint", action="append", help="the daemon's control endpoint; "
                     "again for more daemons (status, health, stats, top)")
    ctl.add_argument("--endpoints-file", metavar="FILE", help="daemons, one per line: "
                     "ENDPOINT [CURVE_KEY SERVER_KEY]")
    ctl.add_argument("-c", "--config", metavar="INI", help="the daemon's INI file: its endpoint")
    ctl.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT, metavar="S")
    ctl.add_argument("--json", action="store_true", help="print the raw JSON reply")
    ctl.add_argument("--curve-key", help="your keygen .key_secret file (CURVE)")
    ctl.add_argument("--server-key", help="the daemon's keygen .key file (CURVE)")
    ctl_commands = ctl.add_subparsers(dest="command", required=True)
    for name in _ctl_commands_named(words):
        text, arguments = CTL_COMMANDS[name]
        sub = ctl_commands.add_parser(name, help=text, description=text)
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print the raw JSON reply")
        for argument in arguments:
            _add_ctl_argument(sub, argument)


def _ctl_commands_named(words: set[str]) -> list[str]:
    """The ctl sub-commands for _add_ctl_parser to build: those among
    ``words``, or all of them if it names none (``ctl --help`` lists all)."""
    named = [name for name in CTL_COMMANDS if name in words]
    if named:
        return named
    return list(CTL_COMMANDS)


def _add_ctl_argument(sub: argparse.ArgumentParser, argument: str) -> None:
    """Add one argument, in CTL_COMMANDS's notation, to the ctl sub-command
    parser ``sub``: a boolean flag, an option with a value or a positional."""
    flag = argument.rstrip("?+=")  # or a positional's name
    flags = [flag]
    if flag in SHORT_FLAGS:
        flags.insert(0, SHORT_FLAGS[flag])
    if argument.startswith("--") and not argument.endswith("="):
        sub.add_argument(*flags, action="store_true")
        return
    nargs = None  # exactly one
    if argument[-1] in "?+":
        nargs = argument[-1]
    sub.add_argument(*flags, nargs=nargs, type=ARG_TYPES.get(flag.lstrip("-"), str))


def _option_value(option_type: OptionType | None, text: str) -> Any:
    """One value of ``ctl set``, for an option of ``option_type``, read as the INI
    would (``env`` as ``A=1,B=2``; an unknown option's text as it is), for
    _parse_pairs.  Raise ValueError."""
    if option_type is ENV:
        return dict(part.split("=", 1) for part in text.split(",") if part)
    if option_type:
        return option_type.from_text(text)
    return text


def _parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``KEY VALUE ...`` of ``ctl set``, each value read as the INI would;
    raise SystemExit (main prints it) if one cannot be read."""
    if len(pairs) % 2:
        raise SystemExit(f"minisup: set needs KEY VALUE pairs, got {pairs}")
    options = {}
    for key, text in zip(pairs[::2], pairs[1::2]):
        key = key.lower()
        try:
            options[key] = _option_value(watcher_option_type(key), text)
        except ValueError as exc:
            raise SystemExit(f"minisup: {key} = {text!r}: {exc}") from None
    return options


def _ctl_properties(args: argparse.Namespace) -> dict[str, Any]:
    """The request's properties from ctl's parsed ``args``: each argument of
    the command that was given (a flag only if set), ``set``'s pairs read
    into ``options``.  Raise SystemExit for pairs that cannot be read."""
    properties = {}
    for argument in CTL_COMMANDS[args.command][1]:
        key = argument.strip("-?+=")
        value = getattr(args, key)
        # Not "in (None, False)": 0 == False, and "incr web 0" means 0.
        if value is not None and value is not False:
            properties[key] = value
    if "pairs" in properties:
        properties["options"] = _parse_pairs(properties.pop("pairs"))
    return properties


class Target(NamedTuple):
    """A daemon ctl talks to: its endpoint (None: the private default) and
    the CURVE key files to reach it with."""

    endpoint: str | None
    curve_key: str | None
    server_key: str | None


#: The ctl commands that take several daemons (``--endpoint`` again, or a file).
MULTI_COMMANDS = ("status", "health", "stats", "top")
#: Where ctl finds an endpoint when no option names one, in this order.
ENDPOINT_VARIABLES = ("MINISUP_ENDPOINT", "CIRCUSCTL_ENDPOINT")


def ctl_targets(args: argparse.Namespace) -> list[Target]:
    """The daemons ctl's ``args`` name: each ``--endpoint``, else each line
    of ``--endpoints-file``, else the endpoint of ``-c``'s INI file, else
    $MINISUP_ENDPOINT or $CIRCUSCTL_ENDPOINT, else the private default.
    Raise SystemExit (main prints it) for a file that cannot be read."""
    if args.endpoint:
        return [Target(e, args.curve_key, args.server_key) for e in args.endpoint]
    if args.endpoints_file:
        return _targets_from_file(args)
    if args.config:
        return [_target_from_config(args)]
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return [Target(os.environ[variable], args.curve_key, args.server_key)]
    return [Target(None, args.curve_key, args.server_key)]


def _targets_from_file(args: argparse.Namespace) -> list[Target]:
    """The daemons of ``--endpoints-file``: a line each, ``ENDPOINT`` or
    ``ENDPOINT CURVE_KEY SERVER_KEY``; ``#`` comments and blank lines
    skipped.  Raise SystemExit naming a bad line."""
    try:
        with open(args.endpoints_file, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"minisup: cannot read {args.endpoints_file}: {exc}") from None
    targets = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if len(words) == 1:
            targets.append(Target(words[0], args.curve_key, args.server_key))
        elif len(words) == 3:
            targets.append(Target(*words))
        elif words:
            raise SystemExit(f"minisup: {args.endpoints_file}, line {number}: use ENDPOINT "
                             "or ENDPOINT CURVE_KEY SERVER_KEY")
    if not targets:
        raise SystemExit(f"minisup: {args.endpoints_file} names no endpoint")
    return targets


def _target_from_config(args: argparse.Namespace) -> Target:
    """The daemon of ``-c``'s INI file: its endpoint, and with CURVE the
    public key beside its curve_secret_key (keygen's NAME.key) unless
    ``--server-key`` names one.  Raise SystemExit if it cannot be read."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"minisup: {exc}") from None
    server_key = args.server_key
    secret = config.curve_secret_key
    if server_key is None and secret and secret.endswith(".key_secret"):
        server_key = secret.removesuffix("_secret")
    return Target(config.endpoint, args.curve_key, server_key)


def _open_client(target: Target, timeout: float) -> Client | None:
    """A Client for ``target``, or None once it printed why there is none
    (an unreadable CURVE key, an endpoint libzmq cannot parse)."""
    try:
        return Client(target.endpoint, timeout, target.curve_key, target.server_key)
    except (OSError, ValueError) as exc:
        print(f"minisup: cannot read a CURVE key: {exc}", file=sys.stderr)
    except ConfigError as exc:  # an endpoint libzmq cannot even parse
        print(f"minisup: {exc}", file=sys.stderr)
    return None


def _print_reply(reply: dict[str, Any], raw_json: bool) -> int:
    """Print ctl's ``reply`` (as JSON if ``raw_json``; an error's reason on
    stderr otherwise) and return ctl's exit code for it."""
    failed = reply.get("status") == "error"
    if raw_json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif failed:
        print(f"error: {reply.get('reason')}", file=sys.stderr)
    else:
        print(format_reply(reply))
    if failed:
        return EXIT_ERROR_REPLY
    return EXIT_OK


def run_ctl(args: argparse.Namespace) -> int:
    """``minisup ctl``: send one command to one daemon (or to several, for
    MULTI_COMMANDS) and print the reply; or follow a tail, redraw ``watch``,
    run ``top``.  Return the exit code.  Blocks."""
    targets = ctl_targets(args)
    properties = _ctl_properties(args)
    if args.command == "top":
        return run_top(targets, args, properties)
    if len(targets) > 1:
        if args.command not in MULTI_COMMANDS:
            raise SystemExit(f"minisup: {args.command} takes one endpoint; several are for "
                             f"{', '.join(MULTI_COMMANDS)}")
        return run_ctl_many(targets, args, properties)
    client = _open_client(targets[0], args.timeout)
    if client is None:
        return EXIT_USAGE
    with client:
        try:
            reply = _ctl_call(client, args, properties)
        except CallError as exc:
            print(f"minisup: {exc}", file=sys.stderr)
            return EXIT_NO_ANSWER
    if isinstance(reply, int):  # follow or watch: done, with this exit code
        return reply
    return _print_reply(reply, args.json)


def _ctl_call(client: Client, args: argparse.Namespace,
              properties: dict[str, Any]) -> dict[str, Any] | int:
    """Send ``args.command`` to one daemon and return its reply, or run a
    tail's follow or ``watch`` to its end and return the exit code.  Raise
    CallError."""
    if properties.pop("follow", False):
        return follow(client, args.name, properties, args.json)
    if args.command == "watch":
        return watch(client, properties)
    if args.command == "status" and not args.json:
        properties["extended"] = True  # what status_table shows
    if args.command == "stats":
        return sampled_stats(client, properties)
    return client.call(args.command, **properties)


def sampled_stats(client: Client, properties: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with CPU over the last ``interval`` seconds (0.5): asked
    twice, as the daemon gives each process's CPU since its last stats (the
    first over its life).  Raise CallError."""
    interval = properties.pop("interval", None)
    if interval is None:
        interval = 0.5
    first = client.call("stats", **properties)
    if first.get("status") != "ok":
        return first
    threading.Event().wait(interval)
    return client.call("stats", **properties)


def run_ctl_many(targets: list[Target], args: argparse.Namespace,
                 properties: dict[str, Any]) -> int:
    """``status``, ``health`` or ``stats`` of several daemons: asked of each
    in turn, printed together with a column (or heading) naming the daemon;
    one that does not answer says so in its place.  Exit 0 if all answered
    ok, 1 if one did not answer, else 3."""
    replies: dict[str, dict[str, Any]] = {}
    code = EXIT_OK
    for target in targets:
        label = target.endpoint or default_endpoint()
        client = _open_client(target, args.timeout)
        if client is None:
            replies[label] = {"status": "error", "reason": "cannot connect", "answered": False}
            code = EXIT_NO_ANSWER
            continue
        with client:
            try:
                reply = _ctl_call(client, args, dict(properties))
            except CallError as exc:
                reply = {"status": "error", "reason": str(exc), "answered": False}
                code = EXIT_NO_ANSWER
        if reply.get("status") != "ok" and code == EXIT_OK:
            code = EXIT_ERROR_REPLY
        replies[label] = reply
    if args.json:
        print(json.dumps(replies, indent=2, sort_keys=True))
    else:
        print(many_text(args.command, replies))
    return code


def many_text(command: str, replies: dict[str, dict[str, Any]]) -> str:
    """The replies of several daemons, by endpoint, as ctl prints them: one
    status table with a DAEMON column, or each daemon's text under its name."""
    if command == "status":
        return status_table_many(replies)
    blocks = []
    for label, reply in replies.items():
        text = f"error: {reply.get('reason')}"
        if reply.get("status") == "ok":
            text = format_reply(reply)
        blocks.append(f"== {label}\n{text}")
    return "\n\n".join(blocks)


#: The bash completion script (``minisup completion bash``); {commands} and
#: {flags} are filled in from CTL_COMMANDS.  Watcher names come from the
#: daemon the line names (``--endpoint``, ``-c``), asked with ``ctl list``.
BASH_COMPLETION = r"""# minisup's bash completion: eval "$(minisup completion bash)" in ~/.bashrc
_minisup() {
    # The words as the line has them: COMP_WORDS splits ipc:///x at each ':'.
    local line=${COMP_LINE:0:COMP_POINT} words
    read -ra words <<< "$line"
    [[ $line == *[[:space:]] || ${#words[@]} -eq 0 ]] && words+=("")
    local cword=$(( ${#words[@]} - 1 ))
    local cur=${words[cword]} prev=${words[cword-1]}
    local commands="{commands}" options="--endpoint --endpoints-file --config --timeout --json --curve-key --server-key"
    if [ "$cword" -eq 1 ]; then
        COMPREPLY=($(compgen -W "run ctl keygen completion --help --version" -- "$cur")); return
    fi
    case ${words[1]} in
        run) COMPREPLY=($(compgen -f -- "$cur")); return;;
        completion) COMPREPLY=($(compgen -W "bash" -- "$cur")); return;;
        ctl) ;;
        *) return;;
    esac
    local i command="" target=()
    for ((i = 2; i < cword; i++)); do
        case ${words[i]} in
            --endpoint|-c|--config|--endpoints-file|--curve-key|--server-key)
                target+=("${words[i]}" "${words[i+1]}"); ((i++));;
            --timeout) ((i++));;
            -*) ;;
            *) command=${words[i]}; break;;
        esac
    done
    case $prev in
        --config|-c|--endpoints-file|--curve-key|--server-key) COMPREPLY=($(compgen -f -- "$cur")); return;;
        --endpoint|--timeout|--interval|-n|--lines|--signum|--graceful_timeout) return;;
    esac
    if [ -z "$command" ]; then
        COMPREPLY=($(compgen -W "$commands $options" -- "$cur")); return
    fi
    local flags
    case $command in
{flags}
    esac
    local watchers
    watchers=$("${words[0]}" ctl --timeout 1 "${target[@]}" list 2>/dev/null | tr ',' ' ')
    COMPREPLY=($(compgen -W "$flags $watchers" -- "$cur"))
}
complete -F _minisup minisup
"""


def bash_completion() -> str:
    """The bash completion script: ctl's commands and each one's flags
    from CTL_COMMANDS, filled into BASH_COMPLETION."""
    cases = []
    for name, (_, arguments) in CTL_COMMANDS.items():
        flags = ["--json"]
        for argument in arguments:
            if argument.startswith("--"):
                flags.append(argument.rstrip("="))
                if argument.rstrip("=") in SHORT_FLAGS:
                    flags.append(SHORT_FLAGS[argument.rstrip("=")])
        cases.append(f'        {name}) flags="{" ".join(flags)}";;')
    return BASH_COMPLETION.replace("{commands}", " ".join(CTL_COMMANDS)).replace(
        "{flags}", "\n".join(cases))


def run_completion(args: argparse.Namespace) -> int:
    """``minisup completion bash``: print the completion script."""
    print(bash_completion(), end="")
    return EXIT_OK


def run_keygen(args: argparse.Namespace) -> int:
    """``minisup keygen``: a CURVE key pair for a daemon or a client."""
    import zmq.auth  # here: only CURVE users pay for its import
    os.makedirs(args.folder, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.folder, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return EXIT_OK


#: ANSI: cursor to the top left corner, then erase the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def watch(client: Client, properties: dict[str, Any]) -> int:
    """``ctl watch``: the status table, redrawn every ``interval`` seconds
    (cleared first on a terminal) until interrupted.  Raise CallError."""
    interval = properties.pop("interval", None)
    if not interval:
        interval = 1.0
    clear = ""
    if sys.stdout.isatty():  # not into a file or a pipe
        clear = CLEAR_SCREEN
    with contextlib.suppress(KeyboardInterrupt):  # how it ends
        while True:
            reply = client.call("status", extended=True, **properties)
            if reply["status"] == "ok":
                text = format_reply(reply)
            else:
                text = f"error: {reply['reason']}"
            print(clear + time.strftime("%H:%M:%S\n") + text + "\n", flush=True)
            threading.Event().wait(interval)
    return EXIT_OK


STATUS_HEADER = ("WATCHER", "STATE", "PID", "WID", "PROCESS", "UPTIME", "RESTARTS",
                 "LAST EXIT")


def status_table(watchers: dict[str, Any]) -> str:
    """``ctl status``: an aligned row per process (a watcher without any
    has one), then the reason of each watcher that gave up."""
    rows = [STATUS_HEADER, *_status_rows(watchers)]
    reasons = [f"{n}: {i['reason']}" for n, i in watchers.items() if i["reason"]]
    return "\n".join(_aligned(rows) + reasons)


def _status_rows(watchers: dict[str, Any]) -> list[tuple[Any, ...]]:
    """status_table's rows (STATUS_HEADER's columns), watchers by name."""
    rows: list[tuple[Any, ...]] = []
    for name, info in sorted(watchers.items()):
        processes = info["processes"]
        if not processes:
            processes = [{}]  # a row of dashes: the watcher's state still shows
        for process in processes:
            rows.append((name, info["status"], *_process_cells(process),
                         info["restarts"], last_exit_text(info)))
    return rows


def last_exit_text(info: dict[str, Any]) -> str:
    """A watcher's last exit as the tables show it: the signal's name or
    code, or why minisup ended it (OOM kill, watchdog, readiness)."""
    reason = str(info.get("last_exit_reason"))
    if reason.startswith("OOM"):
        return "OOM kill"
    if reason.startswith("watchdog"):
        return "watchdog"
    if reason.startswith("not ready"):
        return "not ready"
    return _exit_text(info["last_exit"])


def status_table_many(replies: dict[str, dict[str, Any]]) -> str:
    """``ctl status`` of several daemons: one table with a DAEMON column; a
    daemon that did not answer (or refused) has one row that says so."""
    rows: list[tuple[Any, ...]] = [("DAEMON", *STATUS_HEADER)]
    reasons = []
    for label, reply in replies.items():
        if reply.get("status") != "ok":
            what = "no answer"
            if reply.get("answered", True):
                what = "error"
            rows.append((label, what, *["-"] * (len(STATUS_HEADER) - 1)))
            reasons.append(f"{label}: {reply.get('reason')}")
            continue
        rows += [(label, *row) for row in _status_rows(reply["watchers"])]
        reasons += [f"{label}: {n}: {i['reason']}" for n, i in reply["watchers"].items()
                    if i["reason"]]
    return "\n".join(_aligned(rows) + reasons)


def _exit_text(code: int | None) -> str:
    """A watcher's last exit ``code`` as status_table shows it: ``-`` if
    none yet, the signal's name if one killed it (a negative code)."""
    if code is None:
        return "-"
    if code < 0:
        return _signal_name(-code)
    return str(code)


def _process_cells(process: dict[str, Any]) -> tuple[Any, ...]:
    """status_table's PID, WID, PROCESS and UPTIME cells for one process,
    dashes for ``{}`` (the row of a watcher that runs none)."""
    uptime = "-"
    if process:
        uptime = _duration(process["uptime"])
    return process.get("pid", "-"), process.get("wid", "-"), process.get("state", "-"), uptime


def _aligned(rows: list[tuple[Any, ...]]) -> list[str]:
    """``rows`` of cells as lines, for status_table: each column as wide as
    its widest cell, two spaces apart, no trailing spaces."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _duration(seconds: float) -> str:
    """An uptime as status_table shows it, in its two largest units:
    ``2d03h``, ``5h07m``, ``3m09s``, or ``4.2s`` under a minute."""
    minutes = int(seconds) // 60
    hours = int(seconds) // 3600
    if hours >= 24:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes % 60:02d}m"
    if minutes:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{seconds:.1f}s"


def tail_line(entry: dict[str, Any]) -> str:
    """One line of ``ctl tail``: when it was read (local time, ms), the
    pid and wid of the process that wrote it, its stream, then the line."""
    when = entry.get("time") or 0.0
    clock = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"
    return f"{clock} {entry.get('pid')} {entry.get('wid')} {entry.get('stream')}: {entry['line']}"


def _print_tail(entries: list[dict[str, Any]], raw_json: bool) -> None:
    """Print ``entries`` of ``tail``: a tail_line each, or a JSON object
    each with ``raw_json``."""
    for entry in entries:
        if raw_json:
            print(json.dumps(entry, sort_keys=True), flush=True)
        else:
            print(tail_line(entry), flush=True)


def _event_entries(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """An ``output`` event's data as tail entries, a line each (its end of
    line dropped, as in ``tail``'s reply)."""
    lines = payload.get("data", "").split("\n")
    if lines[-1] == "":
        lines.pop()  # the data ends a line: no empty one after it
    return [{"stream": payload.get("stream"), "pid": payload.get("pid"),
             "wid": payload.get("wid"), "time": payload.get("time"), "line": line}
            for line in lines]


def follow(client: Client, name: str, properties: dict[str, Any], raw_json: bool = False) -> int:
    """``ctl tail --follow`` (``-f``): subscribe to the watcher's output
    events, print its last lines, then each line as it is written (an event
    the tail already held, by its ``seq``, is skipped), until interrupted.
    Raise CallError."""
    try:
        with zmq.Context() as context, context.socket(zmq.SUB) as sub:
            sub.linger = 0
            sub.subscribe(f"watcher.{name.lower()}.output")
            endpoint = client.call("globaloptions")["options"].get("pubsub_endpoint")
            if not endpoint:
                return _no_events()
            sub.connect(endpoint)
            reply = client.call("tail", **properties)
            if reply.get("status") != "ok":
                print(f"error: {reply.get('reason')}", file=sys.stderr)
                return EXIT_ERROR_REPLY
            _print_tail(reply.get("entries", []), raw_json)
            printed = reply.get("seq", 0)  # events up to this one are in the tail
            while True:
                payload = json.loads(sub.recv_multipart()[1])
                if payload.get("seq", printed + 1) > printed:
                    _print_tail(_event_entries(payload), raw_json)
    except KeyboardInterrupt:
        return EXIT_OK
    except zmq.ZMQError:  # an endpoint we cannot connect to
        return _no_events()


#: How often ``ctl top`` refreshes its figures by default, in seconds.
TOP_INTERVAL = 1.0
#: The events that make ``ctl top`` read the states again at once.
TOP_EVENTS = ("spawn", "reap", "kill", "start", "stop", "ready", "reload", "updated",
              "add", "remove")
TOP_KEYS = "up/down select  s stop/start  r restart  + more  - fewer  t output  q quit"
TOP_WATCHER_HEADER = ("WATCHER", "STATE", "RUNNING", "RESTARTS", "LAST EXIT", "WHY")
TOP_PROCESS_HEADER = ("PID", "WID", "UPTIME", "CPU%", "MEMORY", "LINES/S")


class TopDaemon:
    """One daemon as ``ctl top`` sees it: its client, its latest status and
    stats, the line counts it had at the last refresh, and its event
    socket.  Owned by the main thread."""

    def __init__(self, label: str, client: Client) -> None:
        """A daemon not read yet."""
        self.label = label
        self.client = client
        self.watchers: dict[str, Any] = {}  # status --extended's
        self.stats: dict[str, dict[str, Any]] = {}  # stats --output's, by watcher
        self.rates: dict[int, float] = {}  # lines per second, by pid
        self.error: str | None = None  # why the last read failed
        self.events: Any = None  # a SUB socket, once its pubsub endpoint is known
        self._counts: tuple[float, dict[int, int]] = (0.0, {})  # (monotonic, lines by pid)
        self._subscribed: set[str] = set()

    def _ask(self, command: str, **properties: Any) -> dict[str, Any] | None:
        """The daemon's reply to ``command``, or None if it did not answer
        (``error`` says so)."""
        try:
            return self.client.call(command, **properties)
        except CallError as exc:
            self.error = f"no answer ({exc})"
            return None

    def read_status(self) -> None:
        """Read every watcher's state; on failure keep the last and say why."""
        reply = self._ask("status", extended=True)
        if reply is None:
            return
        if reply.get("status") != "ok":
            self.error = str(reply.get("reason"))
            return
        self.error = None
        self.watchers = reply["watchers"]

    def read_stats(self) -> None:
        """Read every process's CPU (since the last read), memory and line
        count, and make each process's lines per second from the counts."""
        reply = self._ask("stats", output=True)
        if reply is None or reply.get("status") != "ok":
            return
        self.stats = reply["infos"]
        now = time.monotonic()
        counts = {int(pid): info.get("lines", 0) for infos in self.stats.values()
                  for pid, info in infos.items() if isinstance(info, dict)}
        then, before = self._counts
        self.rates = {pid: (count - before[pid]) / (now - then)
                      for pid, count in counts.items() if pid in before and now > then}
        self._counts = (now, counts)

    def subscribe(self, context: Any, poller: Any) -> None:
        """Follow the state events of each watcher (not their output, which
        the daemon then need not encode), once the pubsub endpoint is known."""
        if self.events is None:
            try:
                options = self.client.call("globaloptions")["options"]
            except (CallError, KeyError):
                return
            if not options.get("pubsub_endpoint"):
                self._subscribed = set(self.watchers)  # none to follow: ask no more
                return
            self.events = context.socket(zmq.SUB)
            self.events.linger = 0
            self.events.connect(options["pubsub_endpoint"])
            poller.register(self.events, zmq.POLLIN)
        for name in set(self.watchers) - self._subscribed:
            for topic in TOP_EVENTS:
                self.events.subscribe(f"watcher.{name}.{topic}")
            self._subscribed.add(name)

    def drain_events(self) -> bool:
        """Read every event that came; whether there was one."""
        heard = False
        while self.events is not None and self.events.poll(0):
            self.events.recv_multipart()
            heard = True
        return heard


def _top_process_cells(daemon: TopDaemon, name: str, process: dict[str, Any]) -> tuple[Any, ...]:
    """TOP_PROCESS_HEADER's cells for one process of watcher ``name``."""
    stats = daemon.stats.get(name, {}).get(str(process["pid"]))
    if not isinstance(stats, dict):
        stats = {}
    memory = "-"
    if isinstance(stats.get("tree"), dict):  # the whole tree's, cgroup's where there is one
        memory = human_bytes(stats["tree"]["memory"])
    rate = daemon.rates.get(process["pid"])
    rate_text = "-"
    if rate is not None:
        rate_text = f"{rate:.1f}"
    return (process["pid"], process["wid"], _duration(process["uptime"]),
            stats.get("cpu", "-"), memory, rate_text)


def _top_rows(daemons: list[TopDaemon]) -> list[tuple[tuple[Any, ...], TopDaemon, str | None]]:
    """top_lines's watcher rows, each with its daemon and watcher name (None
    for the row of a daemon that did not answer: not selectable)."""
    several = len(daemons) > 1
    rows: list[tuple[tuple[Any, ...], TopDaemon, str | None]] = []
    for daemon in daemons:
        if daemon.error is not None and not daemon.watchers:
            rows.append(((daemon.label,) * several + ("-", daemon.error, "", "", "", ""),
                         daemon, None))
        for name, info in sorted(daemon.watchers.items()):
            running = sum(1 for p in info["processes"] if p.get("state") != "stopping")
            cells = (name, info["status"], f"{running}/{info['numprocesses']}",
                     info["restarts"], last_exit_text(info), info.get("last_exit_reason") or "")
            rows.append(((daemon.label,) * several + cells, daemon, name))
    return rows


def top_lines(daemons: list[TopDaemon], selected: int, width: int) -> tuple[list[str], int]:
    """``ctl top``'s table as text lines fit to ``width`` columns: a row per
    watcher (with a DAEMON column for several daemons; a daemon that did
    not answer gets a row saying so), the selected watcher (``selected``:
    its index among the watchers; -1: none) marked, its processes indented
    below it; and the selection, kept within the watchers."""
    header = TOP_WATCHER_HEADER
    if len(daemons) > 1:
        header = ("DAEMON", *header)
    rows = _top_rows(daemons)
    aligned = _aligned([header, *[cells for cells, _, _ in rows]])
    count = sum(1 for _, _, name in rows if name is not None)
    if selected >= 0:  # -1: none (the plain table)
        selected = max(0, min(selected, count - 1))
    lines = ["  " + aligned[0]]
    index = 0
    for text, (_, daemon, name) in zip(aligned[1:], rows, strict=True):
        marker = "  "
        if name is not None and index == selected:
            marker = "> "
        lines.append(marker + text)
        if name is None:
            continue
        index += 1
        info = daemon.watchers[name]
        if info["processes"]:
            processes = [TOP_PROCESS_HEADER] + [_top_process_cells(daemon, name, p)
                                                for p in info["processes"]]
            lines += ["      " + row for row in _aligned(processes)]
    return [fit_to_width(line, width) for line in lines], selected


def fit_to_width(text: str, width: int) -> str:
    """``text`` as one terminal line at most ``width`` columns wide: tabs
    expanded, other control characters shown as ``?`` (a NUL or an escape
    must not reach the terminal), wide characters counted as two."""
    import unicodedata  # here: only top needs it
    shown = []
    used = 0
    for char in text.expandtabs(8):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            char = "?"
        columns = 1
        if unicodedata.east_asian_width(char) in ("W", "F"):
            columns = 2
        if used + columns > width:
            break
        shown.append(char)
        used += columns
    return "".join(shown)


def top_selection(daemons: list[TopDaemon], selected: int) -> tuple[TopDaemon, str] | None:
    """The daemon and watcher name of row ``selected`` (None if none)."""
    index = 0
    for daemon in daemons:
        for name in sorted(daemon.watchers):
            if index == selected:
                return daemon, name
            index += 1
    return None


def top_command(daemons: list[TopDaemon], selected: int, key: str) -> str:
    """Run key ``key``'s command on the selected watcher (s: stop or start,
    r: restart, +: incr, -: decr); return what the status line says: done,
    or the error.  Never raises: an error never ends the view."""
    found = top_selection(daemons, selected)
    if found is None:
        return "no watcher selected"
    daemon, name = found
    command = {"s": "stop", "r": "restart", "+": "incr", "-": "decr"}[key]
    if command == "stop" and daemon.watchers[name]["status"] == "stopped":
        command = "start"
    try:
        reply = daemon.client.call(command, name=name)
    except CallError as exc:
        return f"{command} {name}: no answer ({exc})"
    if reply.get("status") != "ok":
        return f"{command} {name}: error: {reply.get('reason')}"
    return f"{command} {name}: ok"


def top_output(daemon: TopDaemon, name: str, count: int, width: int) -> list[str]:
    """The last ``count`` lines watcher ``name`` wrote (``t``), as tail
    prints them, or why there are none."""
    try:
        reply = daemon.client.call("tail", name=name, lines=count)
    except CallError as exc:
        return [f"no answer ({exc})"]
    if reply.get("status") != "ok":
        return [f"{name}: {reply.get('reason')}"]
    return [fit_to_width(tail_line(entry), width) for entry in reply.get("entries", [])]


def run_top(targets: list[Target], args: argparse.Namespace, properties: dict[str, Any]) -> int:
    """``ctl top``: a live view of one or several daemons, full-screen on a
    terminal (see TopScreen), else one plain table per interval.  Runs until
    ``q`` or Ctrl-C; exit 1 if a daemon never answered."""
    interval = properties.get("interval") or TOP_INTERVAL
    daemons = []
    with contextlib.ExitStack() as stack:
        for target in targets:
            client = _open_client(target, args.timeout)
            if client is None:
                return EXIT_USAGE
            stack.enter_context(client)
            daemons.append(TopDaemon(target.endpoint or default_endpoint(), client))
        with contextlib.suppress(KeyboardInterrupt):
            if sys.stdout.isatty() and sys.stdin.isatty():
                TopScreen(daemons, interval).run()
            else:
                _top_plain(daemons, interval)
        for daemon in daemons:
            if daemon.events is not None:
                daemon.events.close()
    if any(daemon.error is not None and not daemon.watchers for daemon in daemons):
        return EXIT_NO_ANSWER
    return EXIT_OK


def _top_plain(daemons: list[TopDaemon], interval: float) -> None:
    """``ctl top`` without a terminal: one plain table per interval, until
    interrupted (or its reader goes away)."""
    while True:
        for daemon in daemons:
            daemon.read_status()
            daemon.read_stats()
        lines, _ = top_lines(daemons, -1, 10_000)
        try:
            print(time.strftime("%H:%M:%S") + "\n" + "\n".join(lines) + "\n", flush=True)
        except BrokenPipeError:  # piped into head, say
            return
        threading.Event().wait(interval)


def curses_error() -> type[Exception]:
    """curses's error class (imported only when top runs)."""
    import curses
    return curses.error


class TopScreen:
    """``ctl top`` on a terminal, with curses: states redrawn the moment an
    event says they changed, figures every ``interval``, keys acted on at
    once, the layout redrawn on a resize.  Main thread only (it installs a
    SIGWINCH handler, restored as it ends)."""

    def __init__(self, daemons: list[TopDaemon], interval: float) -> None:
        """A view of ``daemons``, not drawn yet."""
        self.daemons = daemons
        self.interval = interval
        self.selected = 0
        self.message = ""  # the status line: what the last key did
        self.output_of: tuple[TopDaemon, str] | None = None  # ``t``: whose output is shown
        self._resized = Waker()
        self._context = zmq.Context()
        self._poller = zmq.Poller()

    def run(self) -> None:
        """Draw until ``q`` (or Ctrl-C, which the caller takes)."""
        import curses  # here: only top needs it
        previous = signal.signal(signal.SIGWINCH, self._on_resize)
        try:
            curses.wrapper(self._loop)
        except curses.error as exc:  # a terminal curses cannot drive (an unknown TERM)
            print(f"minisup: ctl top cannot use this terminal ({exc}): plain tables",
                  file=sys.stderr)
            _top_plain(self.daemons, self.interval)
        finally:
            signal.signal(signal.SIGWINCH, previous)
            self._resized.close()
            for daemon in self.daemons:
                if daemon.events is not None:
                    daemon.events.close()
                    daemon.events = None
            self._context.term()

    def _on_resize(self, signum: int, frame: Any) -> None:
        """SIGWINCH: only wake the loop, which redraws."""
        self._resized.wake()

    def _loop(self, screen: Any) -> None:
        """The view's loop: wait on the keyboard, the events and the clock."""
        import curses
        with contextlib.suppress(curses.error):  # a terminal without cursor control
            curses.curs_set(0)
        screen.nodelay(True)
        screen.keypad(True)
        self._poller.register(sys.stdin.fileno(), zmq.POLLIN)
        self._poller.register(self._resized.fileno(), zmq.POLLIN)
        due = 0.0
        while True:
            if time.monotonic() >= due:
                self._refresh(stats=True)
                due = time.monotonic() + self.interval
            self._draw(screen)
            ready = dict(self._poller.poll(max(0.0, due - time.monotonic()) * 1000))
            if self._resized.fileno() in ready:
                self._resized.drain()
                size = os.get_terminal_size(sys.stdout.fileno())
                curses.resizeterm(size.lines, size.columns)
            if any(daemon.drain_events() for daemon in self.daemons):
                self._refresh(stats=False)
            if not self._keys(screen):
                return

    def _refresh(self, stats: bool) -> None:
        """Read the states (and with ``stats`` the figures) of each daemon."""
        for daemon in self.daemons:
            daemon.read_status()
            if stats:
                daemon.read_stats()
            daemon.subscribe(self._context, self._poller)

    def _keys(self, screen: Any) -> bool:
        """Act on every key pressed; False once ``q`` says to end."""
        import curses
        while True:
            key = screen.getch()
            if key == -1:
                return True
            if key == curses.KEY_RESIZE:
                continue
            char = ""
            if 0 <= key < 256:
                char = chr(key)
            if char == "q" and self.output_of is None:
                return False
            if self.output_of is not None:
                if char in ("q", "t") or key == 27:  # Esc
                    self.output_of = None
                continue
            self._key(key, char, curses)

    def _key(self, key: int, char: str, curses: Any) -> None:
        """Act on one key of the table view."""
        if key in (curses.KEY_UP, ord("k")):
            self.selected = max(0, self.selected - 1)
        elif key in (curses.KEY_DOWN, ord("j")):
            self.selected += 1
        elif char in ("s", "r", "+", "-"):
            self.message = top_command(self.daemons, self.selected, char)
            self._refresh(stats=False)
        elif char == "t":
            self.output_of = top_selection(self.daemons, self.selected)

    def _draw(self, screen: Any) -> None:
        """Draw the whole view into curses's buffer; curses sends only what
        changed (no flicker)."""
        height, width = screen.getmaxyx()
        labels = ", ".join(daemon.label for daemon in self.daemons)
        head = f"minisup top  {time.strftime('%H:%M:%S')}  {labels}  every {self.interval:g}s"
        if self.output_of is None:
            lines, self.selected = top_lines(self.daemons, self.selected, width - 1)
        else:
            daemon, name = self.output_of
            lines = [f"output of {name} (t or q: back)",
                     *top_output(daemon, name, max(1, height - 4), width - 1)]
        errors = [f"{d.label}: {d.error}" for d in self.daemons if d.error]
        footer = [self.message or "; ".join(errors), TOP_KEYS]
        screen.erase()
        rows = [(row, text) for row, text in enumerate([head, *lines][:max(0, height - 2)])]
        rows += [(height - 2 + offset, text) for offset, text in enumerate(footer)
                 if height - 2 + offset > 0]
        for row, text in rows:
            with contextlib.suppress(curses_error()):  # a corner curses cannot fill
                screen.addstr(row, 0, fit_to_width(text, max(0, width - 1)))
        screen.refresh()


def _no_events() -> int:
    """Say, for follow, that there are no events to follow; return the exit code."""
    print("minisup: the daemon publishes no events (set pubsub_endpoint)", file=sys.stderr)
    return EXIT_ERROR_REPLY


STATS_HEADER = ("WATCHER", "PID", "WID", "USER", "CPU%", "MEM%", "RSS", "CPU TIME", "TREE",
                "COMMAND")


def _stats_rows(name: str, info: dict[str, Any] | str, pid: Any = "",
                depth: int = 0) -> list[tuple[Any, ...]]:
    """stats_table's rows for one process (``pid``, or why it has no
    stats) and, indented below, its children's."""
    if not isinstance(info, dict):
        return [(name, pid, "-", "-", "-", "-", "-", "-", "-", str(info))]
    tree = "-"
    if isinstance(info.get("tree"), dict):
        tree = f"{info['tree']['processes']}p {human_bytes(info['tree']['memory'])}"
    command = info.get("command") or info.get("cmdline")
    rows: list[tuple[Any, ...]] = [(
        name, "  " * depth + str(info["pid"]), info.get("wid", "-"), info["username"],
        info["cpu"], info["mem"], info["mem_info1"], info["ctime"], tree, command)]
    for child in info.get("children", []):
        rows += _stats_rows("", child, "", depth + 1)
    return rows


def _exits_lines(exits: dict[str, dict[str, Any]]) -> list[str]:
    """Under ``ctl stats``'s table: each watcher that restarted or exited,
    how often and why it last died."""
    lines = []
    for name, facts in sorted(exits.items()):
        if facts.get("last_exit") is None and not facts.get("restarts"):
            continue
        lines.append(f"{name}: {facts.get('restarts', 0)} restarts, last exit "
                     f"{last_exit_text(facts)} ({facts.get('last_exit_reason')})")
    return lines


def stats_table(watchers: dict[str, dict[Any, Any]],
                exits: dict[str, dict[str, Any]] | None = None) -> str:
    """``ctl stats``: a header row, then a row per process (its children
    indented below it) with its whole command line; CPU% is over the last
    interval when the reply says one; then why each watcher last died."""
    rows: list[tuple[Any, ...]] = [STATS_HEADER]
    intervals = set()
    for name, infos in watchers.items():
        for pid, info in infos.items():
            rows += _stats_rows(name, info, pid)
            if isinstance(info, dict) and info.get("cpu_interval"):
                intervals.add(info["cpu_interval"])
    lines = _aligned(rows)
    if intervals:
        lines.append(f"CPU% over the last {max(intervals):.2f}s")
    return "\n".join(lines + _exits_lines(exits or {}))


def _tree_text(tree: dict[str, Any]) -> str:
    """``stats``'s ``tree`` (a process with all it started) as ctl shows it."""
    return (f"tree: {tree['processes']} processes, {_cpu_time_text(tree['cpu'])} CPU, "
            f"{human_bytes(tree['memory'])}")


def _stats_text(info: dict[str, Any] | str) -> str:
    """The daemon's own stats (``dstats``): a line, then its tree's."""
    if not isinstance(info, dict):
        return str(info)
    return "\n".join(_aligned([STATS_HEADER[1:], *[row[1:] for row in _stats_rows("", info)]]))


def _value_text(value: Any) -> str:
    """A list as ``a,b,c``, anything else as str(), for format_reply."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _options_text(options: dict[str, Any]) -> str:
    """``options``, for format_reply: a ``KEY: VALUE`` line each, None as
    nothing and ``env`` as ``set`` takes it (``A=1,B=2``)."""
    lines = []
    for key, value in options.items():
        if key == "env" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        if value is None:
            value = ""
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _socket_text(socket_info: dict[str, Any]) -> str:
    """One socket of ``listsockets``, for format_reply: its fd, name and
    path (a unix socket's) or host and port."""
    address = socket_info.get("path")
    if not address:
        address = f"{socket_info['host']}:{socket_info['port']}"
    return f"{socket_info['fd']}:socket '{socket_info['name']}' at {address}"


def _containment_text(reply: dict[str, Any]) -> list[str]:
    """The ``containment:`` line of ctl status and health (none from a
    daemon that does not say): the cgroup, or why the fallback."""
    containment = reply.get("containment")
    if not isinstance(containment, dict):
        return []
    if containment.get("mode") == "cgroup":
        return [f"containment: cgroup {containment.get('cgroup')}"]
    return [f"containment: process groups ({containment.get('reason')})"]


def format_reply(reply: dict[str, Any]) -> str:
    """A successful reply as circusctl prints it, for ctl.  Which keys it
    has tell the command; the first match wins, so the order matters."""
    if isinstance(reply.get("watchers"), dict):  # ``status`` extended
        return "\n".join([status_table(reply["watchers"]), *_containment_text(reply)])
    if reply.get("healthy"):
        return "\n".join(["healthy", *_containment_text(reply)])
    if "statuses" in reply:
        return "\n".join(f"{n}: {s}" for n, s in sorted(reply["statuses"].items()))
    if "singleton" in reply:
        return "This watcher is a Singleton - not changing the number of processes"
    for key in ("watchers", "pids", "numprocesses", "numwatchers"):
        if key in reply:
            return _value_text(reply[key])
    if "entries" in reply:  # tail
        return "\n".join(tail_line(entry) for entry in reply["entries"])
    if "lines" in reply:
        return "\n".join(reply["lines"])
    if reply.get("warnings"):  # reloadconfig's, printed as it logs them
        return "\n".join(f"warning: {message}" for message in reply["warnings"])
    if "options" in reply:
        return _options_text(reply["options"])
    if "sockets" in reply:
        return "\n".join(_socket_text(socket_info) for socket_info in reply["sockets"])
    if "infos" in reply:  # ``stats`` of every watcher
        return stats_table(reply["infos"], reply.get("exits"))
    if "name" in reply:  # ``stats`` of one
        text = stats_table({reply["name"]: reply["info"]}, {reply["name"]: reply})
        if isinstance(reply.get("tree"), dict):
            text += "\nwhole watcher: " + _tree_text(reply["tree"])
        return text
    if "process" in reply:
        return stats_table({"": {reply["process"]: reply["info"]}})
    if isinstance(reply.get("info"), dict) and "pid" in reply["info"]:  # dstats
        return "Main Process:\n" + _stats_text(reply["info"])
    return str(reply.get("status", "ok"))


def _command_config(args: argparse.Namespace) -> Config:
    """The Config of ``run --cmd``, for config_from_args: one watcher with
    the environment, named after the program unless --name says."""
    name = args.name
    try:
        words = shlex.split(args.cmd)
    except ValueError as exc:  # "No closing quotation"
        raise ConfigError(str(exc), option="--cmd", value=args.cmd) from None
    if not words:
        raise ConfigError("names no program", option="--cmd", value=args.cmd)
    if not name:
        name = os.path.basename(words[0])
    watcher = WatcherConfig(name=name, cmd=args.cmd, numprocesses=args.numprocesses,
                            copy_env=True)
    return Config(watchers=[watcher])


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config for ``run``: the INI file, or one --cmd watcher, with the
    command line's overrides; raise ConfigError."""
    if bool(args.config) == bool(args.cmd):
        raise ConfigError("give either an INI file or --cmd, not both or neither")
    if args.config:
        config = load_config(args.config)
    else:
        config = _command_config(args)
    for key in ("endpoint", "loglevel", "logoutput", "check_delay", "pidfile"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    check_endpoint(config.endpoint, bool(config.curve_secret_key))
    return config


def setup_logging(level: str, output: str) -> None:
    """Send minisup's log to ``output`` ('-', 'stdout', 'stderr' or a file)."""
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ConfigError("use debug, info, warning or error", option="loglevel", value=level)
    stream = {"-": sys.stdout, "stdout": sys.stdout, "stderr": sys.stderr}.get(output)
    if stream:
        handler: logging.Handler = logging.StreamHandler(stream)
    else:
        handler = logging.FileHandler(output)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s minisup[%(process)d] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def daemonize() -> int:
    """Detach, for init scripts (``--daemon``): fork, new session, fork,
    stdio on /dev/null.  The first process exits 0 once "1" arrives on the
    returned fd (the daemon serves), or 1 once "0" and a reason arrive
    (printed) or the daemon died first."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        if os.read(read_end, 1) == b"1":  # EOF: every writer is gone
            os._exit(EXIT_OK)
        why = os.read(read_end, 4096)  # "0" then the reason, or EOF: it died
        os.write(2, why or b"minisup: the daemon did not start; see its log\n")
        os._exit(EXIT_NO_ANSWER)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(EXIT_OK)  # the session leader goes: no terminal can come back
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return write_end


def check_pidfile(path: str | None) -> None:
    """Raise ConfigError if the pidfile ``path`` names a live process (a
    stale one, whose process is gone, will be replaced)."""
    if not path:
        return
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise ConfigError("cannot write in its folder", option="pidfile", value=path)
    # Silent if there is no file, no pid in it, or no such process.
    with contextlib.suppress(OSError, ValueError, IndexError), open(path) as stream:
        pid = int(stream.read().split()[0])
        if pid <= 0:  # kill(0 or -1) would ask about groups: not a pid at all
            return
        with contextlib.suppress(PermissionError):  # it exists: another user's
            os.kill(pid, 0)  # signal 0: only asks whether it exists
        raise ConfigError(f"pid {pid} is alive: is minisup running already?",
                          option="pidfile", value=path)


def install_signal_handlers(daemon: Daemon) -> None:
    """On the main thread: the daemon's signal handlers (see SysHandler)."""
    SysHandler(daemon.request_quit, daemon.request_reload, daemon.arbiter.notice_child_exit,
               daemon.pump.reopen).install()


def report_start_failure(exc: MinisupError, logoutput: str, started: int | None) -> None:
    """Say why the daemon could not start (its endpoint is taken, say): in
    its log, on stderr too unless the log goes there already (a log file is
    not where a person at the terminal looks), and to the first process of
    ``--daemon`` through ``started``, which prints it."""
    logger.error("%s", exc)
    if logoutput != "stderr":
        print(f"minisup: {exc}", file=sys.stderr)
    if started is not None:
        with contextlib.suppress(OSError):  # the first process is gone: nobody to tell
            os.write(started, f"0minisup: {exc}\n".encode())


def write_pidfile(path: str) -> None:
    """Write this process's pid to ``path``, for run_daemon, whole or not at
    all (a file of its own, renamed over ``path``): a reader never sees half
    a pid.  Raise OSError."""
    with open(f"{path}.{os.getpid()}", "w") as stream:
        stream.write(f"{os.getpid()}\n")
    os.replace(stream.name, path)


def remove_pidfile(path: str | None) -> None:
    """Remove the pidfile ``path``, for run_daemon as it ends, if it still
    names this process; silent if it is gone or unreadable."""
    if not path:
        return
    # Silent if there is no file or no pid in it: nothing of ours to remove.
    with contextlib.suppress(OSError, ValueError), open(path) as stream:
        if int(stream.read()) == os.getpid():  # ours, not a successor's
            os.unlink(stream.name)


def systemd_settings() -> tuple[str | None, float]:
    """Take systemd's variables out of the environment (they are not the
    children's), for run_daemon before the daemon starts: the address of
    its notify socket (None without one), and the watchdog interval in
    seconds (0.0 without one, or if WATCHDOG_PID names another process)."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    usec = os.environ.pop("WATCHDOG_USEC", "")
    meant_for_us = os.environ.pop("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
    if usec.isdigit() and meant_for_us:
        return address, int(usec) / 1e6
    return address, 0.0


def run_daemon(args: argparse.Namespace) -> int:
    """``minisup run``: supervise (in the foreground unless ``--daemon``)
    until told to quit.  The pidfile is checked before detaching (a live
    pid is a usage error the caller sees), written after (the pid changes)."""
    try:
        config = config_from_args(args)
        setup_logging(config.loglevel, config.logoutput)
        check_pidfile(config.pidfile)
    except (ConfigError, OSError) as exc:
        print(f"minisup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.daemon and config.logoutput in ("-", "stdout", "stderr"):
        print("minisup: --daemon: the log goes to /dev/null (see --log-output)", file=sys.stderr)
    started = None  # with --daemon: the pipe to tell the first process we serve
    if args.daemon:
        started = daemonize()  # before any thread starts
    if config.pidfile:
        write_pidfile(config.pidfile)
    address, watchdog = systemd_settings()
    daemon = Daemon(config, subreaper=True, systemd=address, watchdog=watchdog)
    install_signal_handlers(daemon)  # first: a Ctrl-C during start is clean
    try:  # a limit or cgroup = required that cannot be had: refused as the config is
        daemon.open_containment()
    except ConfigError as exc:
        report_start_failure(exc, config.logoutput, started)
        remove_pidfile(config.pidfile)
        return EXIT_USAGE
    try:
        daemon.start()
        if started is not None:
            os.write(started, b"1")
        daemon.wait()  # signal handlers run meanwhile: a join is interruptible
    except MinisupError as exc:
        report_start_failure(exc, config.logoutput, started)
        return EXIT_NO_ANSWER
    finally:
        daemon.stop()
        remove_pidfile(config.pidfile)
    if daemon.arbiter.failed:
        return EXIT_NO_ANSWER
    logger.info("stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``, else sys.argv's): run the sub-command it
    names and return the exit code; a usage error is EXIT_USAGE, not a
    SystemExit.  ``run`` blocks until the daemon quits."""
    actions = {"run": run_daemon, "ctl": run_ctl, "keygen": run_keygen,
               "completion": run_completion}
    try:
        args = build_parser(argv).parse_args(argv)
        return actions[args.action](args)
    except SystemExit as exc:  # --help, --version or a usage error
        if isinstance(exc.code, str):  # ours, as sys.exit would print it
            print(exc.code, file=sys.stderr)
        if isinstance(exc.code, int):
            return exc.code
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
