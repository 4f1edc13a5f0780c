"""Side-by-side suite: minisup beside circusd (0.19.0) and supervisord (4.3.0).

Each scenario runs against the three daemons in turn, alternating
(minisup, circusd, supervisord, minisup, ...) across repetitions, with the
same child programs (by absolute path) and equivalent configs.  Each group
of scenarios gets three fresh daemons, each in a temp folder of its own,
whose config holds only that group's programs: 1-5, 7 and 12 share one
(N sleeps, stopped, and one running); 6, 8, 9, 10-11, 13-14 and 15-16
have one each (13-14 has a second minisup), and 17-24 a minisup alone.
That matters: supervisord's main loop visits every configured process on
every turn, so with all the programs in one config (some 1100 processes at
N=500) its round trip went from about 0.6 to 5 ms and its capture from
several hundred to about 30 MiB/s.  Most scenarios also measure a "floor"
in the same run: what the machine does with no supervisor in the way (the
"floor" column).

 1. control round trip (us, lower is better): one client, one call after
    another; each repetition is the median of 1000 calls (--quick: 300).
    minisup and circusd: ``list`` through minisup.Client (same wire
    protocol); supervisord: XML-RPC ``supervisor.getState`` over its unix
    socket.  Floor: a bare pyzmq ROUTER echo server (another Python process,
    a zmq.Poller/recv/send loop sending back the frames it got) on ipc://,
    called by the same client loop.
 2. throughput, 8 clients (requests/s, higher is better): 8 client
    processes (not threads: the GIL), started once for the whole scenario,
    each sends the request of 1 back-to-back, 2000 times (--quick: 500);
    all requests / (last end - first start).  Floor: the echo server.
 3. start N (ms): a watcher/program of N ``sleep 1000`` with autostart off
    (N=500, --quick 100); from the start request until N children of the
    daemon have /proc/PID/exe == the sleep binary, i.e. have exec'd.
    minisup/circusd: ``start`` (no waiting); supervisord:
    ``startProcessGroup(name, wait=False)`` over XML-RPC, in process, which
    is what ``supervisorctl start name:*`` sends (the in-process call keeps
    supervisorctl's interpreter start-up out of the figure, as for the
    others).  Floor: this script starts N ``sleep`` with subprocess.Popen.
 4. stop N (ms): from the stop request until none of those pids is left in
    /proc as a child of the daemon (killed *and* reaped), for all three.
    Floor: this script sends SIGTERM to its N sleeps and waits for each.
 5. daemon RSS (MiB): VmRSS of the daemon with the N processes running.
    Floor: VmRSS of the echo server (a Python with pyzmq and one socket).
 6. stop N deaf (ms): as 4, but the N children ignore SIGTERM (``sh -c
    "trap '' TERM; exec sleep 3000"``: an ignored signal stays ignored
    across exec) and the grace period is 1 s (graceful_timeout = 1;
    supervisord: stopwaitsecs = 1); the stop request is sent once all N
    have exec'd sleep and the start command has returned (it is sent
    waiting: circusd refuses a stop while its start runs).  Target: 1.3 s.
    Floor: this script sends SIGTERM, waits 1 s, sends SIGKILL, reaps.
 7. respawn (ms): kill -9 the one child of a one-process watcher, until the
    daemon has a new child that has exec'd sleep; 5 kills (--quick 3), 1.3 s
    apart, so that minisup's crash-loop backoff (min_uptime 1 s) and
    supervisord's startsecs (1) never apply.  Floor: this script kills one
    of its own sleeps, waits for it and starts another.
 8. crash loop, first retry (ms): a one-process watcher/program whose child
    (``python -S -c``) appends ``time.time()`` to a file and exits 1 at once,
    with every restart setting left at its default (supervisord:
    autorestart = true, startsecs 1, startretries 3).  It runs 5 s (longer,
    up to 15 s, until there is a retry), then is stopped; the figure is the
    gap between the first two timestamps (so it includes the child's
    interpreter start-up), and the note under the table lists every gap.
    3 repetitions (--quick 2), each on a program of its own, never started
    before (supervisord keeps a program's backoff count across stop and
    start).  Floor: the median gap of a shell loop running the same child
    6 times back to back.
 9. idle CPU (s): with 100 ``sleep`` running under each daemon, the
    daemon's utime + stime (all its threads, from /proc/PID/stat) over 30 s
    (--quick 10); the three are measured over the same window, once.
    Helper processes are not counted: minisup's guardian (a ``python -S``
    child) and circusd's circusd-stats (on by default); their own figures
    are in the notes.
10. capture (MiB/s, higher is better): the child is ``cat`` of a file of
    numbered lines (about 200 MiB, --quick 50), stdout to a log file
    (circus.stream.FileStream; supervisord: stdout_logfile, no rotation);
    from the start request until the log holds every byte; then the bytes
    are compared with the input (notes: "identical").  Floor: ``sh -c 'cat
    IN | cat > OUT'``.  11. the daemon's CPU time for it (s per 100 MiB).
12. status command (ms): wall time of the whole command line:
    ``python -m minisup ctl --endpoint E status``, circus's ``circusctl
    --endpoint E status`` (its own venv) and ``supervisorctl -c CONF
    status``; 5 runs.  Floor: ``python -c "import zmq"``.
13. stop, 50 setsid'd left (ms): a one-process watcher/program
    (graceful_timeout 1; supervisord: stopwaitsecs 1) whose child
    (``python -S orphans.py``, written to the daemon's folder) leaves 50
    descendants as a classic daemon does: fork, setsid, fork, the middle
    process exits (so each is re-parented to the daemon if it is a
    subreaper, as minisup's CLI is, else to init), stdio on /dev/null,
    exec ``sleep`` with argv[0] a marker naming the daemon's folder; then
    it sleeps, and exits on SIGTERM without touching them.  Once all 50
    have exec'd (the start is waited for), ``stop`` (no waiting); ms from
    the request until no live process carries the marker (a zombie counts
    as gone), or "S of 50 survive" at 10 s.  Every survivor is then
    killed.  3 runs (--quick 2); no floor.  minisup runs in its default
    containment (issue 18: a cgroup where it can write one).
14. 13 with minisup's ``[circus] cgroup = off`` (issue 18's fallback:
    process groups, subreaper, a tag in each child's environment), a
    fourth daemon next after minisup in the alternation; the circusd and
    supervisord cells are 13's runs.  Skipped (and said) with a minisup
    that refuses or ignores the option.  The notes give the containment
    each minisup reports in ``health``, and the minisup.* cgroups in this
    script's cgroup before and after (one left by these daemons is killed
    and removed, and said).
15. start 2000, stock fd limit (ms): as 3, with N=2000 (--scale-all;
    --quick 500), and every daemon of 15-24 started with the soft
    RLIMIT_NOFILE a login shell has, 1024, its hard limit unchanged (a
    ``python -S -c`` that sets it and execs the daemon: same pid; the
    notes give each daemon's limits once it runs: minisup raises its soft
    limit to the hard one, circusd and supervisord keep 1024).  A start
    that gets no new exec'd child for 10 s has stalled: the cell says
    "stalls at K of 2000" (supervisord: 3 pipes a process), the notes how
    long the stop of those K took.  The daemon's children are looked at
    every 20 ms here and in 16-20 (a look at 10000 is some 4 ms).  3 runs
    (--quick 1; fewer with --reps).  Floor: as 3.
16. stop 2000 (ms): as 4, after 15 (a stalled start: its cell again).
    Floor: as 4.
17-24: minisup alone, in a daemon of its own (the same stock soft limit),
    with N=10000 (--scale; --quick 2000) ``sleep`` (respawning) and N deaf
    children as in 6, both stopped; one run each, in this order: 17-18,
    21, 23, 24, 22, 19, 20.  Targets at 10000 in brackets.
17. start N (ms, <= 8000): as 3 (or a stall, as 15).
18. start N, per process (ms, flat from 500 to 10000): 17 / N; the notes
    give each daemon's median per process at every N measured (3, 15, 17).
19. stop N (ms, <= 1000): as 4, once 21-24 are over.
20. stop N deaf, grace 1 s (ms, <= 1500): as 6.
21. idle CPU (s, <= 0.05; --quick window 10 s): as 9, with the N running,
    from 1 s after the start; the guardian's in the notes.
22. daemon RSS (MiB, <= 60): VmRSS with the N running, after 21, 23 and
    24; the notes give the peak (VmHWM), the start's included.
23. status command (ms, <= 300): as 12, with the N running; 5 runs.
24. respawn (ms, <= 10): kill -9 one of the N (each time another of those
    the start made: no backoff), until the daemon has a new child that has
    exec'd sleep; 5 kills (--quick 3), 0.5 s apart.  The new child is
    found among the pids allocated since the kill (ns_last_pid), not by a
    walk of the N.

Rows show the median (min-max) over repetitions, the floor likewise, and the
ratios minisup/circusd and minisup/supervisord of the medians; the
"better" column says which way is better.

    bash bench/setup.sh            # the anchors, in venvs of their own
    python bench/run.py [--quick] [--processes N] [--reps R] [--rst]
                        [--scale N] [--scale-all N] [--only GROUP ...]

``--only`` runs some groups of scenarios: ``base`` (1-5, 7, 12), ``deaf``
(6), ``crash`` (8), ``idle`` (9), ``capture`` (10-11), ``orphans``
(13-14), ``scale`` (15-24).  The full run has them all; ``scale`` takes
some 3 to 4 minutes of it.

An anchor that is not installed is skipped (its column shows "-").  Every
endpoint is an ipc:// path or unix socket in a temp folder (circusd's
multicast discovery is switched off, its pubsub and stats are on ipc);
every wait is bounded; every daemon, client and echo process is stopped,
then killed by pid, in a finally, and the daemons' children are checked.
"""

import argparse
import contextlib
import http.client
import itertools
import os
import py_compile
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from capture import cpu_seconds, digest, make_input

import minisup

ANCHORS = os.environ.get("MINISUP_BENCH", os.path.expanduser("~/.cache/minisup-bench"))
SLEEP = shutil.which("sleep") or "/bin/sleep"  # absolute: a child's PATH may be empty
SLEEP_EXE = os.path.realpath(SLEEP)
CAT = shutil.which("cat") or "/bin/cat"
SH = "/bin/sh"
PYTHON = sys.executable
# The argument of sleep tells the watchers apart.
GROUP_ARG, ONE_ARG, DEAF_ARG, IDLE_ARG, FLOOR_ARG = b"1000", b"2000", b"3000", b"4000", b"4500"
IDLE_COUNT = 100
CLIENTS = 8
LIMIT = 60.0  # seconds: a wait longer than this is a failure, not a sample
NAMES = ("minisup", "circusd", "supervisord")
# The groups of scenarios, each with daemons of its own (--only names them).
GROUPS = ("base", "deaf", "crash", "idle", "capture", "orphans", "scale")
GROUP_ROWS = {"base": "1-5, 7, 12", "deaf": "6", "crash": "8", "idle": "9",
              "capture": "10-11", "orphans": "13-14", "scale": "15-24"}
ORPHANS = 50  # 13-14: the setsid'd descendants the watcher's process leaves
ORPHAN_LIMIT = 10.0  # seconds after the stop: what is still alive then survived
ORPHAN_SLEEP = "5000"  # seconds: a survivor the bench failed to kill ends on its own
# 13-14, minisup's fallback (issue 18); a minisup without the option warns.
FALLBACK = "cgroup = off\n"
# 15-24: the sleeps of the scale programs (15-16; 17-24: respawning, deaf).
SCALE_ARG, BIG_ARG, BIG_DEAF_ARG = b"6000", b"7000", b"8000"
STOCK_NOFILE = 1024  # the soft RLIMIT_NOFILE the scale daemons start with
STALL = 10.0  # seconds without a new exec'd child: a start has stalled
SCALE_PAUSE = 0.02  # seconds between two looks at thousands of children
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
# Runs argv[2:] (an absolute path first) with the soft RLIMIT_NOFILE
# argv[1], the hard one unchanged: exec, so the pid is the daemon's.
STOCK_LIMIT_CODE = ("import os, resource, sys; which = resource.RLIMIT_NOFILE; "
                    "resource.setrlimit(which, (int(sys.argv[1]), resource.getrlimit(which)[1])); "
                    "os.execv(sys.argv[2], sys.argv[2:])")
STOCK_LIMIT = (PYTHON, "-S", "-c", STOCK_LIMIT_CODE, str(STOCK_NOFILE))


def deaf_cmd(arg):
    """A child that ignores SIGTERM (an ignored signal stays ignored across
    exec), then is ``sleep arg`` (bytes).  No " ;" and no "%": both INI
    dialects would take them."""
    return f"{SH} -c \"trap '' TERM; exec {SLEEP} {arg.decode()}\""


DEAF_CMD = deaf_cmd(DEAF_ARG)
CRASH_CODE = "import time,sys; open({!r},'a').write(repr(time.time())+chr(10)); sys.exit(1)"
# The child of 13-14: leaves COUNT daemons as a classic daemon does (fork,
# setsid, fork, the middle process exits, stdio on /dev/null), each an
# exec'd sleep whose argv[0] is MARKER; then sleeps, and on SIGTERM exits
# without touching them.
ORPHAN_CODE = """import os, signal, sys, time
SLEEP, MARKER, COUNT, SECONDS = sys.argv[1:5]


def daemonize():
    os.setsid()  # a session and process group of its own
    if os.fork():
        return  # the middle process exits: its child is re-parented
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.execv(SLEEP, [MARKER, SECONDS])


def leave_one():
    middle = os.fork()
    if middle == 0:
        try:
            daemonize()
        finally:
            os._exit(0)  # never back into the loop
    os.waitpid(middle, 0)


def exit_now(signum, frame):
    os._exit(0)  # the descendants are left be


signal.signal(signal.SIGTERM, exit_now)
for _ in range(int(COUNT)):
    leave_one()
while True:
    time.sleep(3600)
"""
ECHO_CODE = """import sys, zmq
context = zmq.Context()
server = context.socket(zmq.ROUTER)
server.bind(sys.argv[1])
poller = zmq.Poller()
poller.register(server, zmq.POLLIN)
poller.register(0, zmq.POLLIN)  # stdin: its end is the stop
print("ready", flush=True)
while True:
    ready = dict(poller.poll(600000))
    if not ready or 0 in ready:
        break
    server.send_multipart(server.recv_multipart())
"""


# ------------------------------------------------------------------ /proc ---

def children(pid):
    """Direct children of ``pid``, from every thread's children file."""
    found = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as stream:
                found.update(int(p) for p in stream.read().split())
        except OSError:
            pass  # a thread that just ended
    return found


def sleep_arg(pid):
    """The argument of an exec'd ``sleep``, or None (not exec'd, not sleep, gone)."""
    try:
        if os.readlink(f"/proc/{pid}/exe") != SLEEP_EXE:
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            argv = stream.read().split(b"\0")
    except OSError:
        return None
    return argv[1] if len(argv) > 1 else None


def stat_fields(pid):
    """/proc/PID/stat after the command name (field 3 is index 0), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_of(pid):
    """The ppid of ``pid``, or None once it is reaped (a zombie still has one)."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def birth(pid):
    """Start time of ``pid`` (clock ticks since boot): with the pid, an identity."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def rss_mib(pid, field="VmRSS"):
    """A memory figure of ``pid`` from /proc/PID/status (VmRSS, VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def open_files_limit(pid):
    """The soft and hard RLIMIT_NOFILE of ``pid`` (text), from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as stream:
        for line in stream:
            if line.startswith("Max open files"):
                return "/".join(line.split()[3:5])
    raise RuntimeError(f"no open files limit for {pid}")


def execd(parent, arg, count, started, known=None, pause=0.001):
    """Wait until ``count`` children of ``parent`` have exec'd ``sleep arg``,
    looking every ``pause`` s; returns (seconds since ``started``, their pids)."""
    known = set() if known is None else known
    while True:
        for pid in children(parent) - known:
            if sleep_arg(pid) == arg:
                known.add(pid)
        if len(known) >= count:
            return time.perf_counter() - started, known
        if time.perf_counter() - started > LIMIT:
            raise RuntimeError(f"only {len(known)} of {count} children exec'd "
                               f"within {LIMIT:g}s")
        time.sleep(pause)  # 2 cores: leave one to the daemon


class Stalled:
    """A sample of 15-17 that is no time: the start got ``count`` of
    ``total`` children, then none for STALL s; ``stop_ms``, the stop of
    those it had."""

    def __init__(self, count, total):
        self.count, self.total, self.stop_ms = count, total, None


def execd_or_stall(parent, arg, count, started):
    """As execd, looking every SCALE_PAUSE s; the seconds are Stalled once
    no new child has exec'd for STALL s."""
    known, last = set(), time.perf_counter()
    while len(known) < count:
        new = {p for p in children(parent) - known if sleep_arg(p) == arg}
        now = time.perf_counter()
        if new:
            known |= new
            last = now
        elif now - last > STALL:
            return Stalled(len(known), count), known
        if now - started > LIMIT:
            raise RuntimeError(f"only {len(known)} of {count} children exec'd "
                               f"within {LIMIT:g}s")
        time.sleep(SCALE_PAUSE)
    return time.perf_counter() - started, known


def reaped(parent, pids, started, pause=0.001):
    """Wait until no pid of ``pids`` is a child of ``parent`` any more (a
    zombie still is: it stays in the children file until reaped), looking
    every ``pause`` s: one read of the children files, whatever their
    number."""
    alive = set(pids)
    while alive:
        alive &= children(parent)
        if time.perf_counter() - started > LIMIT:
            raise RuntimeError(f"{len(alive)} children still there after {LIMIT:g}s")
        if alive:
            time.sleep(pause)
    return time.perf_counter() - started


def pids_after(last, newest):
    """The pids the kernel allocated after ``last`` up to ``newest`` (both
    read from ns_last_pid), oldest first: pids wrap at pid_max."""
    if newest >= last:
        return list(range(last + 1, newest + 1))
    with open("/proc/sys/kernel/pid_max") as stream:
        pid_max = int(stream.read())
    return [*range(last + 1, pid_max), *range(1, newest + 1)]


def last_pid():
    """The last pid the kernel allocated in this PID namespace."""
    with open(NS_LAST_PID) as stream:
        return int(stream.read())


def kill_pids(pids):
    """SIGKILL every (pid, birth) pair still alive as that same process."""
    killed = []
    for pid, born in pids:
        if born is not None and birth(pid) == born:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def marked(pid, marker):
    """Whether ``pid`` is alive (not a zombie: its cmdline is empty) with
    argv[0] ``marker`` (bytes)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read().split(b"\0", 1)[0] == marker
    except OSError:
        return False


def find_marked(marker):
    """Every live process with argv[0] ``marker``: one walk of /proc."""
    return {int(name) for name in os.listdir("/proc")
            if name.isdigit() and marked(name, marker)}


def wait_marked(marker, count):
    """Wait until ``count`` live processes carry ``marker``; their pids."""
    started = time.monotonic()
    while True:
        pids = find_marked(marker)
        if len(pids) >= count:
            return pids
        if time.monotonic() - started > LIMIT:
            raise RuntimeError(f"only {len(pids)} of {count} descendants exec'd "
                               f"within {LIMIT:g}s")
        time.sleep(0.01)


def kill_marked(marker):
    """SIGKILL every live process that carries ``marker``, and wait (5 s at
    most) until none does; returns how many there were."""
    pids = find_marked(marker)
    for pid in pids:
        with contextlib.suppress(OSError):  # gone since the walk
            # It carried the marker a moment ago: a reused pid is no worry.
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while find_marked(marker):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes with argv[0] {marker!r} outlive SIGKILL")
        time.sleep(0.01)
    return len(pids)


# ---------------------------------------------------------------- cgroups ---

def cgroup_home():
    """The cgroup2 directory this script runs in (its daemons start there),
    or None without a cgroup2 mount."""
    with open("/proc/self/mountinfo") as stream:
        mounts = [line.split() for line in stream]
    roots = [f[4] for f in mounts if "-" in f and f[f.index("-") + 1] == "cgroup2"]
    with open("/proc/self/cgroup") as stream:
        paths = [line[3:].strip() for line in stream if line.startswith("0::")]
    if not roots or not paths:
        return None
    return os.path.normpath(os.path.join(roots[0], paths[0].lstrip("/")))


def minisup_cgroups(home):
    """The names of the minisup.* cgroups right under ``home``."""
    if home is None:
        return []
    return sorted(n for n in os.listdir(home) if n.startswith("minisup."))


def remove_cgroup(path):
    """Kill every process in cgroup ``path`` and below, then remove it,
    the leaves first."""
    kill = os.path.join(path, "cgroup.kill")
    # No cgroup.kill before Linux 5.14: then rmdir waits, then fails.
    with contextlib.suppress(OSError), open(kill, "w") as stream:
        stream.write("1")
    deadline = time.monotonic() + 5
    for folder, _, _ in os.walk(path, topdown=False):
        while True:
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:  # removed meanwhile (by its daemon's guardian)
                break
            except OSError:  # EBUSY until its last process has exited
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


# --------------------------------------------------------------- programs ---

class Program:
    """One watcher/program, as both config dialects will say it."""

    def __init__(self, name, cmd, count=1, autostart=False, respawn=True,
                 grace=None, log=None):
        self.name, self.cmd, self.count = name, cmd, count
        self.autostart, self.respawn, self.grace, self.log = autostart, respawn, grace, log

    def circus(self):
        text = (f"[watcher:{self.name}]\ncmd = {self.cmd}\nnumprocesses = {self.count}\n"
                f"autostart = {str(self.autostart).lower()}\n")
        if not self.respawn:
            text += "respawn = false\n"
        if self.grace is not None:
            text += f"graceful_timeout = {self.grace}\n"
        if self.log:
            text += ("stdout_stream.class = circus.stream.FileStream\n"
                     f"stdout_stream.filename = {self.log}\n")
        return text

    def supervisord(self):
        text = (f"[program:{self.name}]\ncommand = {self.cmd}\nnumprocs = {self.count}\n"
                f"autostart = {str(self.autostart).lower()}\n"
                f"autorestart = {str(self.respawn).lower()}\n"
                f"stdout_logfile = {self.log or 'NONE'}\nstdout_logfile_maxbytes = 0\n"
                "stderr_logfile = NONE\n")
        if self.count > 1:
            text += "process_name = %(program_name)s_%(process_num)d\n"
        if not self.respawn:
            text += "startsecs = 0\n"
        if self.grace is not None:
            text += f"stopwaitsecs = {self.grace}\n"
        return text


def base_programs(folder, settings):
    """Scenarios 1-5, 7 and 12: N sleeps (stopped) and one (running)."""
    return [Program("group", f"{SLEEP} {GROUP_ARG.decode()}", settings.count,
                    respawn=False, grace=10),
            Program("one", f"{SLEEP} {ONE_ARG.decode()}", autostart=True, grace=10)]


def deaf_programs(folder, settings):
    return [Program("deaf", DEAF_CMD, settings.count, respawn=False, grace=1)]


def crash_programs(folder, settings):
    """One crash program per repetition: supervisord keeps a program's
    backoff count across stop and start, so each repetition gets a fresh one."""
    return [Program(f"crash{i}", crash_cmd(crash_log(folder, i)))
            for i in range(settings.crash_reps)]


def idle_programs(folder, settings):
    return [Program("idle", f"{SLEEP} {IDLE_ARG.decode()}", IDLE_COUNT, respawn=False,
                    grace=10)]


def orphan_marker(folder):
    """argv[0] of the descendants left by the orphans program in ``folder``."""
    return f"orphan:{folder}".encode()


def orphan_programs(folder, settings):
    """13-14: one process that leaves ORPHANS setsid'd descendants; its
    code is written to ``folder``, whose path marks them."""
    path = os.path.join(folder, "orphans.py")
    with open(path, "w") as f:
        f.write(ORPHAN_CODE)
    cmd = (f"{PYTHON} -S {path} {SLEEP} {orphan_marker(folder).decode()} {ORPHANS} "
           f"{ORPHAN_SLEEP}")
    return [Program("orphans", cmd, respawn=False, grace=1)]


def scale_programs(folder, settings):
    """15-16: N (2000, --quick 500) sleeps, stopped."""
    return [Program("scale", f"{SLEEP} {SCALE_ARG.decode()}", settings.scale_all,
                    respawn=False, grace=10)]


def big_programs(folder, settings):
    """17-24, minisup alone: N (10000, --quick 2000) sleeps that respawn (24
    kills one at a time), and N that ignore SIGTERM (20); both stopped."""
    return [Program("big", f"{SLEEP} {BIG_ARG.decode()}", settings.scale, grace=10),
            Program("bigdeaf", deaf_cmd(BIG_DEAF_ARG), settings.scale, respawn=False,
                    grace=1)]


def capture_programs(folder, settings):
    return [Program("cat", f"{CAT} {settings.data}", respawn=False,
                    log=os.path.join(folder, "capture.out"))]


# ---------------------------------------------------------------- daemons ---

class Daemon:
    name = ""
    proc = None

    def __init__(self, folder):
        self.folder = folder
        self.crash_runs = 0  # the crash programs used so far
        self.capture_log = os.path.join(folder, "capture.out")
        self.kids = {}  # pid -> birth: every child seen, for the final check

    @property
    def pid(self):
        return self.proc.pid

    def note_children(self):
        for pid in children(self.pid):
            self.kids.setdefault(pid, birth(pid))

    def close(self):
        """Stop gracefully, then kill by pid; returns the children left over
        (which are then killed)."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.note_children()
        with contextlib.suppress(Exception):  # cleanup goes on whatever happens
            self.quit()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.2)  # a guardian or a redirector finishes its own cleanup
        return kill_pids(self.kids.items())

    def abort(self, message):
        """The daemon did not come up: kill it and its children; raise."""
        self.note_children()
        self.proc.kill()
        self.proc.wait()
        kill_pids(self.kids.items())
        raise RuntimeError(message)

    def wait_gone(self, name, arg):
        """After a failure: stop ``name`` and wait (bounded) for its children."""
        with contextlib.suppress(Exception):
            self.stop(name)
        pids = {p for p in children(self.pid) if sleep_arg(p) == arg}
        with contextlib.suppress(RuntimeError):
            reaped(self.pid, pids, time.perf_counter())


class Circusish(Daemon):
    """minisup or circusd: same INI, same wire protocol, same client."""

    def __init__(self, name, argv, folder, progs, ctl, extra=""):
        super().__init__(folder)
        self.name, self.ctl = name, ctl
        self.endpoint = self.address = f"ipc://{folder}/control.sock"
        ini = os.path.join(folder, f"{name}.ini")
        with open(ini, "w") as f:
            f.write(f"[circus]\nendpoint = {self.endpoint}\n"
                    f"pubsub_endpoint = ipc://{folder}/pubsub.sock\ncheck_delay = 5\n{extra}")
            f.write("".join(p.circus() for p in progs))
        self.proc = subprocess.Popen([*argv, ini], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.client = minisup.Client(self.endpoint, timeout=LIMIT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.send({"command": "numwatchers", "properties": {}}, timeout=1.0)
                return
            except minisup.CallError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.client.close()
                    self.abort(f"{name} did not answer on {self.endpoint}")

    def ping(self):
        self.client.call("list")

    def start(self, name, wait=False):
        self._check(self.client.call("start", name=name, waiting=wait))

    def stop(self, name, wait=False):
        self._check(self.client.call("stop", name=name, waiting=wait))

    def status_argv(self):
        return [*self.ctl, "--endpoint", self.endpoint, "status"], (0,)

    @staticmethod
    def _check(reply):
        if reply.get("status") != "ok":
            raise RuntimeError(f"error reply: {reply}")

    def quit(self):
        try:
            self.client.send({"command": "quit", "properties": {}}, timeout=5.0)
        finally:
            self.client.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the host name is only the Host header."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path, timeout):
        super().__init__()
        self.unix_path, self.timeout = path, timeout

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, UnixHTTPConnection(self.unix_path, self.timeout)
        return self._connection[1]


def supervisor_proxy(path):
    return xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(path, LIMIT))


class Supervisord(Daemon):
    name = "supervisord"

    def __init__(self, folder, progs, launcher=()):
        super().__init__(folder)
        self.conf = os.path.join(folder, "supervisord.conf")
        sock = os.path.join(folder, "supervisor.sock")
        self.address = f"unix:{sock}"
        with open(self.conf, "w") as f:
            f.write(f"[unix_http_server]\nfile = {sock}\n"
                    f"[supervisord]\nlogfile = {folder}/supervisord.log\nloglevel = warn\n"
                    f"pidfile = {folder}/supervisord.pid\nnodaemon = true\n"
                    f"childlogdir = {folder}\n"
                    "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = "
                    "supervisor.rpcinterface:make_main_rpcinterface\n"
                    f"[supervisorctl]\nserverurl = unix://{sock}\n")
            f.write("".join(p.supervisord() for p in progs))
        self.proc = subprocess.Popen([*launcher, f"{ANCHORS}/supervisor/bin/supervisord",
                                      "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.rpc = supervisor_proxy(sock)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rpc.supervisor.getState()
                return
            except (OSError, xmlrpc.client.Error, http.client.HTTPException):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.abort("supervisord did not answer")
                time.sleep(0.05)

    def ping(self):
        self.rpc.supervisor.getState()

    def start(self, name, wait=False):
        self.rpc.supervisor.startProcessGroup(name, wait)

    def stop(self, name, wait=False):
        # Per-process faults (e.g. FATAL: not running) come back in the list.
        self.rpc.supervisor.stopProcessGroup(name, wait)

    def status_argv(self):
        # supervisorctl status exits 3 when some process is not running
        # (the stopped group): that is an answer, not a failure.
        return [f"{ANCHORS}/supervisor/bin/supervisorctl", "-c", self.conf, "status"], (0, 3)

    def quit(self):
        self.proc.send_signal(signal.SIGTERM)


class Echo:
    """The floor of 1 and 2: a bare pyzmq ROUTER echo server, own process."""

    name = "floor"

    def __init__(self, folder):
        self.address = f"ipc://{folder}/echo.sock"
        self.proc = subprocess.Popen([PYTHON, "-c", ECHO_CODE, self.address],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            read_line_each([self.proc], time.monotonic() + 30)
        except Exception:
            end_process(self.proc, 0)
            raise
        self.client = minisup.Client(self.address, timeout=LIMIT)

    @property
    def pid(self):
        return self.proc.pid

    def ping(self):
        self.client.call("list")

    def close(self):
        self.client.close()
        end_process(self.proc)


def end_process(proc, timeout=5):
    """Close its stdin (the polite stop), then kill it by pid if need be."""
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------- client workers ---

def read_line_each(procs, deadline):
    """One line from each process's stdout, waiting no longer than ``deadline``."""
    pending = {p.stdout.fileno(): p for p in procs}
    got = {fd: b"" for fd in pending}
    while pending:
        left = deadline - time.monotonic()
        ready = select.select(list(pending), [], [], left)[0] if left > 0 else []
        if not ready:
            raise RuntimeError(f"{len(pending)} of {len(procs)} processes did not answer")
        for fd in ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"process {pending[fd].pid} ended")
            got[fd] += chunk
            if b"\n" in got[fd]:
                del pending[fd]
    return [got[p.stdout.fileno()].split(b"\n")[0].decode() for p in procs]


def pinger(address):
    """A callable sending the request of scenario 1 to ``address``."""
    if address.startswith("unix:"):
        proxy = supervisor_proxy(address[len("unix:"):])
        return proxy.supervisor.getState
    client = minisup.Client(address, timeout=LIMIT)
    return lambda: client.call("list")


def worker(count, targets):
    """A client process of scenario 2: ``targets`` are NAME=ADDRESS; reads a
    NAME per line, sends ``count`` requests there, prints start and end."""
    pings = {}
    for target in targets:
        name, address = target.split("=", 1)
        pings[name] = pinger(address)
        for _ in range(20):  # warm up: connection, caches
            pings[name]()
    print("ready", flush=True)
    for line in sys.stdin:
        ping = pings[line.strip()]
        started = time.perf_counter()
        for _ in range(count):
            ping()
        print(f"{started!r} {time.perf_counter()!r}", flush=True)
    return 0


class Workers:
    """CLIENTS worker processes, each with a client for every target."""

    def __init__(self, count, targets):
        self.count = count
        self.procs = []
        argv = [PYTHON, os.path.abspath(__file__), "--worker", str(count),
                *(f"{t.name}={t.address}" for t in targets)]
        try:
            for _ in range(CLIENTS):
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, bufsize=0))
            read_line_each(self.procs, time.monotonic() + LIMIT)
        except Exception:
            self.close(0)
            raise

    def run(self, target):
        """Requests per second, all workers at once on ``target``."""
        for proc in self.procs:
            proc.stdin.write(f"{target.name}\n".encode())
        lines = read_line_each(self.procs, time.monotonic() + LIMIT)
        spans = [tuple(map(float, line.split())) for line in lines]
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        return CLIENTS * self.count / wall

    def close(self, timeout=5):
        for proc in self.procs:
            end_process(proc, timeout)


# -------------------------------------------------------------- scenarios ---

def round_trip(target, calls):
    for _ in range(20):  # warm up: connection, caches
        target.ping()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        target.ping()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def start_stop(daemon, count):
    """One cycle: start N, RSS with them running, stop N.  Milliseconds, MiB."""
    started = time.perf_counter()
    daemon.start("group")
    start_s, pids = execd(daemon.pid, GROUP_ARG, count, started)
    time.sleep(0.3)  # let the daemon settle before reading its RSS
    rss = rss_mib(daemon.pid)
    started = time.perf_counter()
    daemon.stop("group")
    stop_s = reaped(daemon.pid, pids, started)
    return start_s * 1000, stop_s * 1000, rss


def spawn_sleeps(argv, count):
    return [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(count)]


def floor_cycle(count):
    """Start N sleeps from here, then SIGTERM and wait for each: ms, ms."""
    started = time.perf_counter()
    procs = spawn_sleeps([SLEEP, FLOOR_ARG.decode()], count)
    start_s, _ = execd(os.getpid(), FLOOR_ARG, count, started)
    started = time.perf_counter()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(LIMIT)
    return start_s * 1000, (time.perf_counter() - started) * 1000


def floor_start_stop(count, echo):
    """floor_cycle, and the echo server's RSS."""
    return (*floor_cycle(count), rss_mib(echo.pid))


def stop_deaf(daemon, count, name="deaf", arg=DEAF_ARG, pause=0.001):
    """Start N children that ignore SIGTERM; ms from the stop request until
    all are reaped, looking every ``pause`` s.  The start is waited for:
    circusd refuses a command while its start is still running."""
    daemon.start(name, wait=True)
    _, pids = execd(daemon.pid, arg, count, time.perf_counter(), pause=pause)
    started = time.perf_counter()
    daemon.stop(name)
    return reaped(daemon.pid, pids, started, pause) * 1000


def floor_stop_deaf(count):
    """SIGTERM N deaf children of this script, 1 s, SIGKILL, wait for each."""
    procs = spawn_sleeps(["/bin/sh", "-c", f"trap '' TERM; exec {SLEEP} {FLOOR_ARG.decode()}"],
                         count)
    execd(os.getpid(), FLOOR_ARG, count, time.perf_counter())
    started = time.perf_counter()
    for proc in procs:
        proc.terminate()
    time.sleep(1.0)  # the grace period: none of them listens
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(LIMIT)
    return (time.perf_counter() - started) * 1000


def the_one(daemon):
    _, pids = execd(daemon.pid, ONE_ARG, 1, time.perf_counter())
    (pid,) = pids
    return pid


def respawn(daemon, old):
    """kill -9 ``old``; ms until a new child has exec'd; and the new pid."""
    started = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    while time.perf_counter() - started < LIMIT:
        for pid in children(daemon.pid) - {old}:
            if sleep_arg(pid) == ONE_ARG:
                return (time.perf_counter() - started) * 1000, pid
    raise RuntimeError(f"no respawn within {LIMIT:g}s")


def floor_respawn(proc):
    """kill -9 one sleep of this script, wait for it, start another."""
    started = time.perf_counter()
    proc.kill()
    proc.wait(LIMIT)
    (new,) = spawn_sleeps([SLEEP, FLOOR_ARG.decode()], 1)
    return (time.perf_counter() - started) * 1000, new


def read_stamps(path, since):
    """The timestamps of a crash log written after ``since`` (time.time())."""
    try:
        with open(path) as stream:
            stamps = [float(line) for line in stream if line.strip()]
    except (OSError, ValueError):
        return []
    return sorted(s for s in stamps if s >= since)


def gaps_ms(stamps):
    return [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]


def crash_cmd(log):
    return f'{PYTHON} -S -c "{CRASH_CODE.format(log)}"'


def crash_log(folder, index):
    return os.path.join(folder, f"crash{index}.log")


def crash_loop(daemon, window):
    """Run the next crash program ``window`` s (longer until a retry, 15 s
    at most); the gaps between spawns, in ms."""
    name, log = f"crash{daemon.crash_runs}", crash_log(daemon.folder, daemon.crash_runs)
    daemon.crash_runs += 1
    since = time.time()
    daemon.start(name)
    time.sleep(window)
    deadline = time.monotonic() + 15 - window
    while len(read_stamps(log, since)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.stop(name)
    stamps = read_stamps(log, since)
    if len(stamps) < 2:
        raise RuntimeError(f"{len(stamps)} spawn(s) and no retry within 15 s")
    return gaps_ms(stamps)


def floor_crash(folder, runs=6):
    """The crash child run ``runs`` times back to back by a shell loop."""
    path = os.path.join(folder, "floor-crash.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    since = time.time()
    loop = f"for i in {' '.join(map(str, range(runs)))}; do {crash_cmd(path)}; done"
    subprocess.run([SH, "-c", loop], timeout=LIMIT, check=False, env={})
    return gaps_ms(read_stamps(path, since))


def idle_cpu(daemons, window):
    """CPU seconds of each daemon (and of its helper) over ``window``
    s with IDLE_COUNT sleeps running under each; measured side by side."""
    for daemon in daemons:
        daemon.start("idle")
    pids = {d.name: execd(d.pid, IDLE_ARG, IDLE_COUNT, time.perf_counter())[1]
            for d in daemons}
    time.sleep(1.0)  # the start is over, the window is idle
    helpers = {d.name: helper(d) for d in daemons}
    before = {d.name: cpu_seconds(d.pid) for d in daemons}
    helper_before = {n: cpu_seconds(p) for n, p in helpers.items() if p}
    time.sleep(window)
    used = {d.name: cpu_seconds(d.pid) - before[d.name] for d in daemons}
    helper_used = {n: cpu_seconds(helpers[n]) - s for n, s in helper_before.items()}
    for daemon in daemons:
        daemon.stop("idle")
    for daemon in daemons:
        reaped(daemon.pid, pids[daemon.name], time.perf_counter())
    return used, helper_used


def helper(daemon):
    """A child of the daemon that is a Python (minisup's guardian, circusd's
    circusd-stats), or None."""
    python = os.path.realpath(PYTHON)
    for pid in children(daemon.pid):
        with contextlib.suppress(OSError):
            if os.path.realpath(os.readlink(f"/proc/{pid}/exe")) == python:
                return pid
    return None


def wait_size(path, size, started):
    while time.monotonic() - started < LIMIT:
        with contextlib.suppress(OSError):
            if os.path.getsize(path) >= size:
                return time.monotonic() - started
        time.sleep(0.002)
    raise RuntimeError(f"{path} did not reach {size} bytes within {LIMIT:g}s")


def capture(daemon, size, expected):
    """MiB/s from the start request until the log holds ``size`` more bytes;
    the daemon's CPU s per 100 MiB; whether those bytes are the input's."""
    before = os.path.getsize(daemon.capture_log) if os.path.exists(daemon.capture_log) else 0
    cpu = cpu_seconds(daemon.pid)
    started = time.monotonic()
    daemon.start("cat")
    elapsed = wait_size(daemon.capture_log, before + size, started)
    cpu = cpu_seconds(daemon.pid) - cpu
    daemon.stop("cat", wait=True)
    same = digest(daemon.capture_log, before) == expected
    # Every writer appends (O_APPEND, "a+", "ab"): emptying the log is safe.
    os.truncate(daemon.capture_log, 0)
    mib = size / (1 << 20)
    return mib / elapsed, cpu * 100 / mib, same


def floor_capture(data, folder, size):
    """MiB/s of ``cat DATA | cat > OUT``."""
    out = os.path.join(folder, "floor-capture.out")
    started = time.monotonic()
    subprocess.run([SH, "-c", f"{CAT} {data} | {CAT} > {out}"], timeout=LIMIT, check=True)
    elapsed = time.monotonic() - started
    os.unlink(out)
    return size / (1 << 20) / elapsed


def status_command(daemon):
    argv, codes = daemon.status_argv()
    return timed_command(argv, codes)


def timed_command(argv, codes=(0,)):
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=LIMIT, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode not in codes:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-300:]}")
    return elapsed


class Survivors:
    """A sample of 13-14 that is no time: ``count`` processes outlived
    ORPHAN_LIMIT."""

    def __init__(self, count):
        self.count = count


def outlived(pids, marker, started):
    """Wait until none of ``pids`` (nor any other process) carries
    ``marker``: ms since ``started``, or Survivors once ORPHAN_LIMIT s
    have passed."""
    alive = set(pids)
    elapsed = time.perf_counter() - started
    while alive:
        if elapsed > ORPHAN_LIMIT:
            return Survivors(len(alive))
        time.sleep(0.002)  # 2 cores: leave one to the daemon
        alive = {p for p in alive if marked(p, marker)}
        elapsed = time.perf_counter() - started
        if not alive:
            alive = find_marked(marker)  # and none new with the marker
    return elapsed * 1000


def stop_orphans(daemon):
    """13-14 on ``daemon``: start the orphans watcher, wait until its
    ORPHANS descendants have exec'd, stop it; ms until none is alive, or
    Survivors.  Whatever survived is killed after."""
    marker = orphan_marker(daemon.folder)
    try:
        daemon.start("orphans", wait=True)
        pids = wait_marked(marker, ORPHANS)
        started = time.perf_counter()
        daemon.stop("orphans")
        return outlived(pids, marker, started)
    finally:
        kill_marked(marker)


# ---------------------------------------------------------------- running ---

class Suite:
    def __init__(self, top, settings):
        self.top, self.settings = top, settings
        self.daemons = []  # those of the scenario running
        self.missing = []  # anchors not installed
        self.rows = {}  # label -> {column name: [samples]}
        self.kinds = {}  # label -> (unit, better)
        self.errors = {}  # (label, column name) -> message
        self.skips = {}  # (label, column name) -> why the cell was not measured
        self.notes = []

    def row(self, label, unit, better="lower"):
        self.rows[label] = {}
        self.kinds[label] = unit, better
        return label

    def record(self, label, name, value):
        self.rows[label].setdefault(name, []).append(value)

    def fail(self, label, name, exc):
        self.errors.setdefault((label, name), f"{type(exc).__name__}: {exc}")
        print(f"  {name}: {label} failed: {exc}", file=sys.stderr)

    def alive(self):
        return [d for d in self.daemons if d.proc.poll() is None]


def attempt(suite, labels, name, measure):
    """Record ``measure()`` (one value per label) under ``name``, or the failure."""
    try:
        values = measure()
    except Exception as exc:  # noqa: BLE001 - one failed cell, not the suite
        for label in labels:
            suite.fail(label, name, exc)
        return False
    values = values if len(labels) > 1 else (values,)
    for label, value in zip(labels, values):
        suite.record(label, name, value)
    return True


def repeat(suite, labels, runs, measure, floor=None, cleanup=None):
    """``measure(daemon)`` for every live daemon, then ``floor()``, ``runs``
    rounds; ``cleanup(daemon)`` after a failure."""
    labels = labels if isinstance(labels, tuple) else (labels,)
    for _ in range(runs):
        for daemon in suite.alive():
            done = attempt(suite, labels, daemon.name, lambda d=daemon: measure(d))
            if not done and cleanup:
                cleanup(daemon)
        if floor:
            attempt(suite, labels, "floor", floor)


def run_round_trip(suite, echo):
    calls, reps = suite.settings.calls, suite.settings.reps
    label = suite.row("1. control round trip", "us")
    print(f"{label}: {reps} x {calls} calls", file=sys.stderr)
    repeat(suite, label, reps, lambda d: round_trip(d, calls), lambda: round_trip(echo, calls))


def run_throughput(suite, echo):
    count, reps = suite.settings.requests, suite.settings.reps
    label = suite.row(f"2. throughput, {CLIENTS} clients", "req/s", "higher")
    print(f"{label}: {reps} x {CLIENTS} x {count} requests", file=sys.stderr)
    workers = Workers(count, [*suite.alive(), echo])
    try:
        repeat(suite, label, reps, workers.run, lambda: workers.run(echo))
    finally:
        workers.close()


def run_start_stop(suite, echo):
    count, reps = suite.settings.count, suite.settings.reps
    labels = (suite.row(f"3. start {count} until exec'd", "ms"),
              suite.row(f"4. stop {count} until reaped", "ms"),
              suite.row(f"5. daemon RSS with {count}", "MiB"))
    print(f"start/stop {count}: {reps} cycles each", file=sys.stderr)
    repeat(suite, labels, reps, lambda d: start_stop(d, count),
           lambda: floor_start_stop(count, echo), lambda d: d.wait_gone("group", GROUP_ARG))
    time.sleep(0.5)


def run_stop_deaf(suite):
    count, reps = suite.settings.count, suite.settings.reps
    label = suite.row(f"6. stop {count} deaf, grace 1 s", "ms")
    print(f"{label}: {reps} cycles each", file=sys.stderr)
    repeat(suite, label, reps, lambda d: stop_deaf(d, count),
           lambda: floor_stop_deaf(count), lambda d: d.wait_gone("deaf", DEAF_ARG))


def run_respawn(suite):
    label = suite.row("7. respawn after kill -9", "ms")
    kills = suite.settings.kills
    print(f"{label}: {kills} kills each", file=sys.stderr)
    current = {}
    for daemon in suite.alive():
        try:
            current[daemon.name] = the_one(daemon)
        except Exception as exc:  # noqa: BLE001
            suite.fail(label, daemon.name, exc)
    (current["floor"],) = spawn_sleeps([SLEEP, FLOOR_ARG.decode()], 1)
    try:
        for _ in range(kills):
            time.sleep(1.3)  # the pids are at least 1.3 s old: no backoff, startsecs passed
            for daemon in [d for d in suite.alive() if d.name in current]:
                if not attempt(suite, (label,), daemon.name,
                               lambda d=daemon: kill_one(current, d)):
                    current.pop(daemon.name)
            attempt(suite, (label,), "floor", lambda: kill_floor(current))
    finally:
        end_process(current["floor"], 0)


def kill_one(current, daemon):
    elapsed, current[daemon.name] = respawn(daemon, current[daemon.name])
    return elapsed


def kill_floor(current):
    elapsed, current["floor"] = floor_respawn(current["floor"])
    return elapsed


def run_crash_loop(suite, folder):
    window, reps = suite.settings.window, suite.settings.crash_reps
    label = suite.row("8. crash loop, first retry", "ms")
    print(f"{label}: {reps} x {window:g} s each", file=sys.stderr)
    gaps = {}

    def measure(name, run, pick):
        gaps.setdefault(name, []).append(run())
        return pick(gaps[name][-1])

    repeat(suite, label, reps,
           lambda d: measure(d.name, lambda: crash_loop(d, window), lambda g: g[0]),
           lambda: measure("floor", lambda: floor_crash(folder), statistics.median))
    for name, runs in gaps.items():
        text = " | ".join(", ".join(f"{g:.0f}" for g in run) for run in runs)
        suite.notes.append(f"8. gaps between spawns, ms, {name}: {text}")


def run_idle(suite):
    window = suite.settings.idle
    label = suite.row(f"9. idle CPU, {IDLE_COUNT} procs, {window:g} s", "s")
    print(f"{label}: one window, side by side", file=sys.stderr)
    daemons = suite.alive()
    try:
        used, helpers = idle_cpu(daemons, window)
    except Exception as exc:  # noqa: BLE001
        for daemon in daemons:
            suite.fail(label, daemon.name, exc)
            daemon.wait_gone("idle", IDLE_ARG)
        return
    for name, seconds in used.items():
        suite.record(label, name, seconds)
    if helpers:
        text = ", ".join(f"{n} {s:.2f} s" for n, s in helpers.items())
        suite.notes.append(f"9. CPU of the helper processes (minisup: guardian; circusd: "
                           f"circusd-stats), not counted above: {text}")


def run_capture(suite, data, folder):
    reps, size = suite.settings.reps, os.path.getsize(data)
    rate = suite.row(f"10. capture {size / (1 << 20):.0f} MiB", "MiB/s", "higher")
    cpu = suite.row("11. capture: daemon CPU", "s/100MiB")
    print(f"{rate}: {reps} runs each", file=sys.stderr)
    expected, same = digest(data), {}

    def measure(daemon):
        mib_s, cpu_s, identical = capture(daemon, size, expected)
        same[daemon.name] = same.get(daemon.name, True) and identical
        return mib_s, cpu_s

    repeat(suite, (rate, cpu), reps, measure,
           lambda: (floor_capture(data, folder, size), None))
    suite.rows[cpu].pop("floor", None)
    text = ", ".join(f"{n} {'identical' if ok else 'ALTERED'}" for n, ok in same.items())
    suite.notes.append(f"10. captured bytes vs input: {text}")


def run_status(suite):
    runs = suite.settings.status_runs
    label = suite.row("12. status command", "ms")
    print(f"{label}: {runs} runs each", file=sys.stderr)
    repeat(suite, label, runs, status_command,
           lambda: timed_command([PYTHON, "-c", "import zmq"]))


def run_orphans(suite):
    """13-14: four daemons (minisup twice: its default, then cgroup = off);
    every survivor killed, and the minisup.* cgroups checked, after."""
    reps = suite.settings.orphan_reps
    auto = suite.row(f"13. stop, {ORPHANS} setsid'd left", "ms")
    off = suite.row("14. 13, minisup cgroup = off", "ms")
    print(f"{auto} (and 14): {reps} runs each, {ORPHAN_LIMIT:g} s deadline", file=sys.stderr)
    home = cgroup_home()
    before = minisup_cgroups(home)
    daemons = []
    try:
        with daemons_for(suite, "orphans", orphan_programs) as top:
            fallback = start_fallback(suite, top, off)
            daemons = list(suite.daemons)
            note_containment(suite, fallback)
            for _ in range(reps):
                for daemon in suite.alive():
                    orphan_run(suite, daemon, off if daemon is fallback else auto)
    finally:
        share_anchor_runs(suite, auto, off)
        clean_orphans(suite, daemons, home, before)


def start_fallback(suite, top, label):
    """A second minisup, with ``cgroup = off``, next after the first in the
    alternation; None (the cell skipped or failed) if it cannot run."""
    refused = fallback_refused()
    if refused:
        suite.skips[(label, "minisup")] = f"this minisup refuses {FALLBACK.strip()!r}: {refused}"
        return None
    path = os.path.join(top, "minisup-off")
    os.mkdir(path)
    try:
        fallback = Circusish("minisup", [PYTHON, "-m", "minisup", "run"], path,
                             orphan_programs(path, suite.settings),
                             [PYTHON, "-m", "minisup", "ctl"], extra=FALLBACK)
    except RuntimeError as exc:
        suite.fail(label, "minisup", exc)
        return None
    suite.daemons.insert(1, fallback)
    return fallback


def fallback_refused():
    """Why this minisup would not run with FALLBACK (an error, or the warning
    that it ignores the option), or None."""
    text = f"[circus]\n{FALLBACK}[watcher:probe]\ncmd = {SLEEP} 1\n"
    try:
        config = minisup.parse_config(text)
    except minisup.ConfigError as exc:
        return str(exc)
    unknown = [w for w in config.warnings if "cgroup" in w]
    if unknown:
        return unknown[0]
    return None


def note_containment(suite, fallback):
    """Note the containment each minisup reports in its ``health`` reply."""
    texts = []
    for daemon in suite.daemons:
        if daemon.name != "minisup":
            continue
        mode = "default"
        if daemon is fallback:
            mode = FALLBACK.strip()
        try:
            reply = daemon.client.call("health")
        except minisup.CallError as exc:
            texts.append(f"minisup {mode}: no health reply ({exc})")
            continue
        texts.append(f"minisup {mode}: {containment_text(reply.get('containment'))}")
    suite.notes.append("13-14. containment: " + "; ".join(texts))


def containment_text(containment):
    """What a ``containment`` reply says, or that it is not there."""
    if not containment:
        return "not reported (a minisup before issue 18)"
    detail = containment.get("cgroup")
    if detail is None:
        detail = containment.get("reason")
    return f"{containment.get('mode')} ({detail})"


def orphan_run(suite, daemon, label):
    """One run of 13 or 14 (``label``) on ``daemon``; after a failure, the
    watcher is stopped."""
    if not attempt(suite, (label,), daemon.name, lambda: stop_orphans(daemon)):
        with contextlib.suppress(Exception):  # the cell has failed already
            daemon.stop("orphans")


def share_anchor_runs(suite, auto, off):
    """Row 14 shows circusd's and supervisord's runs of 13: one run each
    (their stop does not depend on minisup's mode)."""
    for name in NAMES[1:]:
        if name in suite.rows[auto]:
            suite.rows[off][name] = list(suite.rows[auto][name])
        if (auto, name) in suite.errors:
            suite.errors[(off, name)] = suite.errors[(auto, name)]
    suite.notes.append("14. circusd and supervisord: the runs of 13")


def clean_orphans(suite, daemons, home, before):
    """After 13-14: kill any marked process left (noted), note the minisup.*
    cgroups before and after, and kill and remove those that ``daemons``
    left (noted)."""
    for daemon in daemons:
        left = kill_marked(orphan_marker(daemon.folder))
        if left:
            suite.notes.append(f"13-14. {left} descendants of {daemon.name} left (killed)")
    after = minisup_cgroups(home)
    suite.notes.append(f"13-14. minisup.* cgroups in {home}: before {before}, after {after}")
    pids = {str(d.pid) for d in daemons if d.name == "minisup"}
    ours = [n for n in after if n not in before and n.split(".")[1] in pids]
    for name in ours:
        remove_cgroup(os.path.join(home, name))
    if ours:
        suite.notes.append(f"13-14. minisup left cgroups {ours} (killed, removed)")


def scale_cycle(daemon, count):
    """15-16 on ``daemon``: start N until all have exec'd, then stop until
    all are reaped: ms, ms; or, if the start stalls, its Stalled sample
    twice (with the ms it took to stop those it had started)."""
    started = time.perf_counter()
    daemon.start("scale")
    start_s, pids = execd_or_stall(daemon.pid, SCALE_ARG, count, started)
    stalled = isinstance(start_s, Stalled)
    if stalled:  # all that run now, a late one too
        pids = {p for p in children(daemon.pid) if sleep_arg(p) == SCALE_ARG}
    started = time.perf_counter()
    daemon.stop("scale")
    stop_s = reaped(daemon.pid, pids, started, SCALE_PAUSE)
    if stalled:
        start_s.stop_ms = stop_s * 1000
        return start_s, start_s
    return start_s * 1000, stop_s * 1000


def run_scale_shared(suite):
    """15-16: start and stop N (2000) on the three daemons; then a note on
    each stall."""
    count, reps = suite.settings.scale_all, suite.settings.scale_reps
    labels = (suite.row(f"15. start {count}, stock fd limit", "ms"),
              suite.row(f"16. stop {count} until reaped", "ms"))
    print(f"15-16. start/stop {count}, soft fd limit {STOCK_NOFILE}: {reps} cycles each",
          file=sys.stderr)
    note_limits(suite, "15-16")
    repeat(suite, labels, reps, lambda d: scale_cycle(d, count), lambda: floor_cycle(count),
           lambda d: d.wait_gone("scale", SCALE_ARG))
    for name, samples in suite.rows[labels[1]].items():
        stalls = [s for s in samples if isinstance(s, Stalled)]
        if stalls:
            reached = ", ".join(f"{s.count}" for s in stalls)
            stops = ", ".join(f"{s.stop_ms:.0f}" for s in stalls)
            suite.notes.append(f"15-16. {name} stalled (no new child for {STALL:g} s) in "
                               f"{len(stalls)} of {len(samples)} runs, at {reached} of "
                               f"{count}; stopping those took {stops} ms")


def note_limits(suite, rows):
    """Note the RLIMIT_NOFILE each daemon has now: started with the stock
    soft limit, minisup raises its own to the hard one."""
    own = "/".join(map(str, resource.getrlimit(resource.RLIMIT_NOFILE)))
    texts = []
    for daemon in suite.alive():
        try:
            texts.append(f"{daemon.name} {open_files_limit(daemon.pid)}")
        except (OSError, RuntimeError) as exc:
            texts.append(f"{daemon.name} unknown ({exc})")
    suite.notes.append(f"{rows}. daemons started with the soft fd limit {STOCK_NOFILE} "
                       f"(hard unchanged; this script's {own}); soft/hard now: "
                       + ", ".join(texts))


def big_rows(suite, count):
    """The rows 17-24 (minisup alone), by what they measure."""
    window = suite.settings.idle
    return {"start": suite.row(f"17. start {count} until exec'd", "ms"),
            "cost": suite.row(f"18. start {count}: per process", "ms"),
            "stop": suite.row(f"19. stop {count} until reaped", "ms"),
            "deaf": suite.row(f"20. stop {count} deaf, grace 1 s", "ms"),
            "idle": suite.row(f"21. idle CPU, {count} procs, {window:g} s", "s"),
            "rss": suite.row(f"22. daemon RSS with {count}", "MiB"),
            "status": suite.row(f"23. status command, {count} procs", "ms"),
            "respawn": suite.row(f"24. respawn, kill -9 1 of {count}", "ms")}


def run_scale_big(suite):
    """17-24 on a minisup alone: start N, then with them running idle CPU,
    status commands, respawns, RSS, then stop; then N deaf, stopped."""
    count, kills = suite.settings.scale, suite.settings.kills
    rows = big_rows(suite, count)
    print(f"17-24. minisup alone, {count} processes: one run each, {kills} kills for 24",
          file=sys.stderr)
    note_limits(suite, "17-24")
    suite.notes.append(f"17-24. minisup alone (circusd and supervisord not run at {count}), "
                       "one run each")
    for daemon in suite.alive():
        victims = big_start(suite, daemon, rows, count)
        if victims:
            big_running(suite, daemon, rows, victims)
        else:
            for key in ("idle", "status", "respawn", "rss", "stop"):
                suite.skips[(rows[key], daemon.name)] = f"the start of {count} did not end"
            daemon.wait_gone("big", BIG_ARG)
        time.sleep(0.5)
        if not attempt(suite, (rows["deaf"],), daemon.name,
                       lambda d=daemon: stop_deaf(d, count, "bigdeaf", BIG_DEAF_ARG,
                                                  SCALE_PAUSE)):
            daemon.wait_gone("bigdeaf", BIG_DEAF_ARG)


def big_start(suite, daemon, rows, count):
    """17-18: start the N; their pids once all have exec'd, else None (the
    cells say the failure or the stall)."""
    found = {}

    def measure():
        """17 and 18, or the Stalled sample twice; keeps the pids."""
        started = time.perf_counter()
        daemon.start("big")
        value, found["pids"] = execd_or_stall(daemon.pid, BIG_ARG, count, started)
        if isinstance(value, Stalled):
            return value, value
        return value * 1000, value * 1000 / count

    if not attempt(suite, (rows["start"], rows["cost"]), daemon.name, measure):
        return None
    if isinstance(suite.rows[rows["start"]][daemon.name][-1], Stalled):
        return None
    return found["pids"]


def big_running(suite, daemon, rows, victims):
    """19 and 21-24 with the N running: idle CPU, status commands, kills
    (each of one of ``victims``, the first N), RSS, then the stop."""
    name, settings = daemon.name, suite.settings
    attempt(suite, (rows["idle"],), name, lambda: idle_window(suite, daemon, settings.idle))
    for _ in range(settings.status_runs):
        attempt(suite, (rows["status"],), name, lambda: status_command(daemon))
    for _ in range(settings.kills):
        time.sleep(0.5)
        attempt(suite, (rows["respawn"],), name, lambda: respawn_one(daemon, victims))
    attempt(suite, (rows["rss"],), name, lambda: big_rss(suite, daemon))
    if not attempt(suite, (rows["stop"],), name, lambda: stop_big(daemon)):
        daemon.wait_gone("big", BIG_ARG)


def idle_window(suite, daemon, window):
    """21: the daemon's CPU seconds over ``window`` s, 1 s after the start
    (its helper's in the notes)."""
    time.sleep(1.0)  # the start is over, the window is idle
    watched = [p for p in (daemon.pid, helper(daemon)) if p]  # the helper if any
    before = [cpu_seconds(p) for p in watched]
    time.sleep(window)
    used = [cpu_seconds(p) - b for p, b in zip(watched, before)]
    if len(used) > 1:
        suite.notes.append(f"21. CPU of {daemon.name}'s guardian, not counted above: "
                           f"{used[1]:.2f} s")
    return used[0]


def respawn_one(daemon, victims):
    """24: kill -9 one of ``victims`` (started long before: no crash-loop
    backoff); ms until the daemon has a new child that has exec'd ``sleep
    BIG_ARG``.  The new pids are read from ns_last_pid, not from a walk of
    the N children (some 4 ms at 10000)."""
    old = victims.pop()
    last, pending = last_pid(), set()
    started = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    while time.perf_counter() - started < LIMIT:
        newest = last_pid()
        pending.update(pids_after(last, newest))
        last = newest
        if newborn(daemon.pid, BIG_ARG, pending):
            return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"no respawn within {LIMIT:g}s")


def newborn(parent, arg, pending):
    """The first of ``pending`` (new pids) that is a child of ``parent``
    and has exec'd ``sleep arg``, or None; drops from ``pending`` the pids
    of others (one not in /proc yet stays: it may be being born)."""
    for pid in sorted(pending):
        fields = stat_fields(pid)
        if fields is None:
            continue
        if int(fields[1]) != parent:
            pending.discard(pid)
        elif sleep_arg(pid) == arg:
            return pid
    return None


def big_rss(suite, daemon):
    """22: VmRSS with the N running (after 21, 23 and 24); VmHWM noted."""
    rss = rss_mib(daemon.pid)
    suite.notes.append(f"22. {daemon.name} peak RSS (VmHWM) {rss_mib(daemon.pid, 'VmHWM'):.1f} "
                       "MiB")
    return rss


def stop_big(daemon):
    """19: ms from the stop request until every running child is reaped."""
    pids = {p for p in children(daemon.pid) if sleep_arg(p) == BIG_ARG}
    started = time.perf_counter()
    daemon.stop("big")
    return reaped(daemon.pid, pids, started, SCALE_PAUSE) * 1000


def note_start_cost(suite):
    """18's note: each daemon's start cost per process (median ms / N) at
    every N measured (3, 15, 17)."""
    settings = suite.settings
    sizes = (("3", settings.count), ("15", settings.scale_all), ("17", settings.scale))
    texts = []
    for name in NAMES:
        costs = []
        for number, count in sizes:
            cells = [c for label, c in suite.rows.items() if label.startswith(f"{number}. ")]
            samples = [v for c in cells for v in c.get(name, []) if isinstance(v, float)]
            if samples:
                costs.append(f"{statistics.median(samples) / count:.3f} at {count} ({number})")
        if costs:
            texts.append(f"{name} " + ", ".join(costs))
    suite.notes.append("18. start cost per process, ms at N (row): " + "; ".join(texts))


def run_scale(suite):
    """15-24, every daemon started with the stock soft fd limit: 15-16 on
    the three, then 17-24 on a minisup alone."""
    with daemons_for(suite, "scale", scale_programs, launcher=STOCK_LIMIT):
        run_scale_shared(suite)
    with daemons_for(suite, "big", big_programs, ("minisup",), STOCK_LIMIT):
        run_scale_big(suite)
    note_start_cost(suite)


def run_base(suite):
    """Scenarios 1-5, 7 and 12: one set of daemons, and the echo server."""
    echo = Echo(suite.top)
    try:
        with daemons_for(suite, "base", base_programs):
            run_round_trip(suite, echo)
            run_throughput(suite, echo)
            run_start_stop(suite, echo)
            run_respawn(suite)
            run_status(suite)
    finally:
        echo.close()


def run_all(suite):
    """Each group of scenarios in turn, or only those ``--only`` names."""
    chosen = suite.settings.only
    if "base" in chosen:
        run_base(suite)
    if "deaf" in chosen:
        with daemons_for(suite, "deaf", deaf_programs):
            run_stop_deaf(suite)
    if "crash" in chosen:
        with daemons_for(suite, "crash", crash_programs):
            run_crash_loop(suite, suite.top)
    if "idle" in chosen:
        with daemons_for(suite, "idle", idle_programs):
            run_idle(suite)
    if "capture" in chosen:
        suite.settings.data = os.path.join(suite.top, "input")
        make_input(suite.settings.data, suite.settings.mib)
        with daemons_for(suite, "capture", capture_programs):
            run_capture(suite, suite.settings.data, suite.top)
    if "orphans" in chosen:
        run_orphans(suite)
    if "scale" in chosen:
        run_scale(suite)


@contextlib.contextmanager
def daemons_for(suite, tag, make_programs, names=NAMES, launcher=()):
    """Fresh daemons (those of ``names`` that are installed) for a group of
    scenarios, each with a config of only ``make_programs(folder,
    settings)``, in folders under the one yielded, each started through
    ``launcher`` (an argv prefix); stopped (and their children checked)
    after."""
    top = os.path.join(suite.top, tag)
    os.mkdir(top)
    suite.daemons = []
    try:
        start_daemons(top, suite, make_programs, names, launcher)
        yield top
    finally:
        for daemon in suite.daemons:
            left = daemon.close()
            if left:
                suite.notes.append(f"{daemon.name} ({tag}) left children {left} (killed)")
        suite.daemons = []


# ---------------------------------------------------------------- reports ---

def number(value):
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value):
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def table(suite):
    """The header and the rows of the report, as strings."""
    head = ["scenario", "unit", "better", *NAMES, "floor", "minisup/circusd",
            "minisup/superv."]
    lines = []
    for label in sorted(suite.rows, key=lambda label: int(label.split(".")[0])):
        cells = suite.rows[label]
        medians, line = {}, [label, *suite.kinds[label]]
        for name in (*NAMES, "floor"):
            samples = [s for s in cells.get(name, []) if s is not None]
            survived = [s.count for s in samples if isinstance(s, Survivors)]
            if survived:
                line.append(survivors_text(survived, len(samples)))
                continue
            stalled = [s for s in samples if isinstance(s, Stalled)]
            if stalled:
                line.append(stalled_text(stalled, len(samples)))
                continue
            if not samples:
                line.append(empty_cell(suite, label, name))
                continue
            medians[name] = statistics.median(samples)
            text = f"{number(medians[name])} ({number(min(samples))}-{number(max(samples))})"
            line.append(text + ("!" if (label, name) in suite.errors else ""))
        for other in NAMES[1:]:
            good = "minisup" in medians and medians.get(other)
            line.append(ratio(medians["minisup"] / medians[other]) if good else "-")
        lines.append(line)
    return head, lines


def survivors_text(counts, runs):
    """A cell of 13-14 where some run left processes alive: the most that
    survived, and in how many runs if not all."""
    text = f"{max(counts)} of {ORPHANS} survive"
    if len(counts) < runs:
        text += f" ({len(counts)} of {runs} runs)"
    return text


def stalled_text(stalls, runs):
    """A cell of 15-18 where some start stalled: how far it got, and in
    how many runs if not all."""
    reached = sorted({s.count for s in stalls})
    text = f"stalls at {reached[0]}"
    if len(reached) > 1:
        text += f"-{reached[-1]}"
    text += f" of {stalls[0].total}"
    if len(stalls) < runs:
        text += f" ({len(stalls)} of {runs} runs)"
    return text


def empty_cell(suite, label, name):
    """A cell without samples: failed, skipped, or not installed ("-")."""
    if (label, name) in suite.errors:
        return "failed"
    if (label, name) in suite.skips:
        return "skipped"
    return "-"


def plain(head, lines):
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = []
    for row in [head, None, *lines]:
        if row is None:
            out.append("-" * (sum(widths) + 2 * len(widths) - 2))
            continue
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
        cells += [cell.rjust(width) for cell, width in zip(row[3:], widths[3:])]
        out.append("  ".join(cells))
    return "\n".join(out)


def rst(head, lines):
    """An RST simple table: "1." escaped (not a list), "-" as "n/a" (not a
    bullet)."""
    lines = [[re.sub(r"^(\d+)\. ", r"\1\\. ", row[0]),
              *("n/a" if cell == "-" else cell for cell in row[1:])] for row in lines]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)
    body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in lines]
    header = "  ".join(cell.ljust(w) for cell, w in zip(head, widths)).rstrip()
    return "\n".join([rule, header, rule, *body, rule])


def report(suite, args, began):
    s = suite.settings
    print()
    print(f"minisup {minisup.__version__} vs circusd 0.19.0 vs supervisord 4.3.0; "
          f"N={s.count}, {s.reps} repetitions ({s.calls} calls for 1, "
          f"{CLIENTS}x{s.requests} requests for 2, {s.kills} kills for 7, {s.crash_reps} "
          f"runs for 8, {s.status_runs} runs for 12, {s.orphan_reps} runs for 13-14, "
          f"{s.scale_reps} for 15-16 at N={s.scale_all}, 1 for 17-23 at N={s.scale}); "
          "median (min-max)")
    head, lines = table(suite)
    print(rst(head, lines) if args.rst else plain(head, lines))
    for note in suite.notes:
        print(note)
    skipped = [f"{n} (not installed under {ANCHORS}; bash bench/setup.sh)"
               for n in suite.missing]
    skipped += [f"{label} for {name}: {message}"
                for (label, name), message in [*suite.skips.items(), *suite.errors.items()]]
    print("skipped or failed: " + ("; ".join(skipped) if skipped else "none"))
    print(f"total {time.monotonic() - began:.0f} s")


# ------------------------------------------------------------------- main ---

def settings_for(args):
    quick = args.quick
    return argparse.Namespace(
        count=args.processes or (100 if quick else 500), reps=args.reps or (3 if quick else 5),
        calls=300 if quick else 1000, requests=500 if quick else 2000,
        kills=3 if quick else 5, crash_reps=2 if quick else 3, window=5.0,
        idle=10.0 if quick else 30.0, mib=50 if quick else 200, status_runs=5,
        orphan_reps=2 if quick else 3, only=tuple(args.only or GROUPS),
        scale=args.scale or (2000 if quick else 10000),
        scale_all=args.scale_all or (500 if quick else 2000),
        scale_reps=1 if quick else min(args.reps or 3, 3))


def start_daemons(top, suite, make_programs, names=NAMES, launcher=()):
    """Start minisup, circusd and supervisord (those of ``names`` that are
    installed), in that order, each through ``launcher``."""
    def folder(name):
        path = os.path.join(top, name)
        os.mkdir(path)
        return path, make_programs(path, suite.settings)

    wanted = [n for n in names if n not in suite.missing]
    if "minisup" in wanted:
        path, progs = folder("minisup")
        suite.daemons.append(Circusish("minisup", [*launcher, PYTHON, "-m", "minisup", "run"],
                                       path, progs, [PYTHON, "-m", "minisup", "ctl"]))
    if "circusd" in wanted:
        path, progs = folder("circusd")
        suite.daemons.append(Circusish("circusd", [*launcher, f"{ANCHORS}/circus/bin/circusd"],
                                       path, progs, [f"{ANCHORS}/circus/bin/circusctl"],
                                       extra=f"multicast_endpoint =\n"
                                       f"stats_endpoint = ipc://{path}/stats.sock\n"))
    if "supervisord" in wanted:
        path, progs = folder("supervisord")
        suite.daemons.append(Supervisord(path, progs, launcher))


def missing_anchors():
    return [name for name, program in (("circusd", "circus/bin/circusd"),
                                       ("supervisord", "supervisor/bin/supervisord"))
            if not os.path.exists(f"{ANCHORS}/{program}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N=100, 3 repetitions, fewer calls, kills and runs, "
                             "10 s idle, 50 MiB capture, scale 500 and 2000")
    parser.add_argument("--processes", type=int, help="N (default 500, --quick 100)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 3)")
    parser.add_argument("--scale", type=int, metavar="N",
                        help="N of 17-24, minisup alone (default 10000, --quick 2000)")
    parser.add_argument("--scale-all", type=int, metavar="N",
                        help="N of 15-16, all three (default 2000, --quick 500)")
    parser.add_argument("--rst", action="store_true", help="print the table as RST")
    parser.add_argument("--only", nargs="+", choices=GROUPS, metavar="GROUP",
                        help="run only these groups of scenarios: "
                             + ", ".join(f"{g} ({GROUP_ROWS[g]})" for g in GROUPS))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(int(args.worker[0]), args.worker[1:])
    settings = settings_for(args)
    began = time.monotonic()
    # As pip does at install (the anchors' venvs hold their .pyc): without it
    # (PYTHONDONTWRITEBYTECODE, a read-only tree), every minisup start and
    # every ctl would compile the module again, some 70 ms and 5 MiB here.
    py_compile.compile(minisup.__file__, doraise=True)

    top = tempfile.mkdtemp(prefix="minisup-bench-")
    suite = Suite(top, settings)
    suite.missing = missing_anchors()
    try:
        run_all(suite)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(suite, args, began)
    return 1 if suite.errors else 0


if __name__ == "__main__":
    sys.exit(main())
