"""Side-by-side suite: minisup beside circusd (0.19.0) and supervisord (4.3.0).

Each scenario runs against the three daemons in turn, alternating
(minisup, circusd, supervisord, minisup, ...) across repetitions, with the
same child program (``sleep``, by absolute path) and equivalent configs.
All three daemons run for the whole suite, each in a temp folder of its own;
lower is better everywhere.

1. control round trip (us): one client, one call after another; each
   repetition is the median of 1000 calls (--quick: 300).  minisup and
   circusd: ``list`` through minisup.Client (same wire protocol);
   supervisord: XML-RPC ``supervisor.getState`` over its unix socket.
2. start N (ms): a watcher/program of N ``sleep 1000`` with autostart off
   (N=500, --quick 100); from the start request until N children of the
   daemon have /proc/PID/exe == the sleep binary, i.e. have exec'd.
   minisup/circusd: ``start`` (no waiting); supervisord:
   ``startProcessGroup(name, wait=False)`` over XML-RPC, in process, which
   is what ``supervisorctl start name:*`` sends (the in-process call keeps
   supervisorctl's interpreter start-up out of the figure, as for the others).
3. stop N (ms): from the stop request until none of those pids is left in
   /proc as a child of the daemon (killed *and* reaped), for all three.
4. daemon RSS (MiB): VmRSS of the daemon with the N processes running.
5. respawn (ms): kill -9 the one child of a one-process watcher, until the
   daemon has a new child that has exec'd sleep; 5 kills (--quick 3), 1.3 s
   apart, so that minisup's crash-loop backoff (min_uptime 1 s) and
   supervisord's startsecs (1) never apply.
6. status command (ms): wall time of the whole command line:
   ``python -m minisup ctl --endpoint E status``, circus's ``circusctl
   --endpoint E status`` (its own venv) and ``supervisorctl -c CONF status``;
   5 runs.

Rows show the median (min-max) over repetitions, and the ratios
minisup/circusd and minisup/supervisord of the medians (< 1: minisup is
faster or smaller).

    bash bench/setup.sh            # the anchors, in venvs of their own
    python bench/run.py [--quick] [--processes N] [--reps R]

An anchor that is not installed is skipped (its column shows "-").  Every
endpoint is an ipc:// path or unix socket in a temp folder (circusd's
multicast discovery is switched off, its pubsub is on ipc); every wait is
bounded; every daemon is stopped, then killed by pid, and its children
checked, in a finally.
"""

import argparse
import contextlib
import http.client
import os
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

import minisup

ANCHORS = os.environ.get("MINISUP_BENCH", os.path.expanduser("~/.cache/minisup-bench"))
SLEEP = shutil.which("sleep") or "/bin/sleep"  # absolute: a child's PATH may be empty
SLEEP_EXE = os.path.realpath(SLEEP)
GROUP_ARG, ONE_ARG = b"1000", b"2000"  # tells the N group from the single one
LIMIT = 60.0  # seconds: a wait longer than this is a failure, not a sample


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


def parent_of(pid):
    """The ppid of ``pid``, or None once it is reaped (a zombie still has one)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return int(stream.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def execd(daemon_pid, arg, count, started, known=None):
    """Wait until ``count`` children of the daemon have exec'd ``sleep arg``;
    returns (seconds since ``started``, their pids)."""
    known = set() if known is None else known
    while True:
        for pid in children(daemon_pid) - known:
            if sleep_arg(pid) == arg:
                known.add(pid)
        if len(known) >= count:
            return time.perf_counter() - started, known
        if time.perf_counter() - started > LIMIT:
            raise RuntimeError(f"only {len(known)} of {count} children exec'd "
                               f"within {LIMIT:g}s")
        time.sleep(0.001)  # 2 cores: leave one to the daemon


def reaped(daemon_pid, pids, started):
    """Wait until no pid of ``pids`` is a child of the daemon any more."""
    alive = set(pids)
    while alive:
        alive = {p for p in alive if parent_of(p) == daemon_pid}
        if time.perf_counter() - started > LIMIT:
            raise RuntimeError(f"{len(alive)} children still there after {LIMIT:g}s")
        if alive:
            time.sleep(0.001)
    return time.perf_counter() - started


# ---------------------------------------------------------------- daemons ---

class Daemon:
    name = ""
    proc = None

    @property
    def pid(self):
        return self.proc.pid

    def close(self):
        """Stop gracefully, then kill by pid; then kill any sleep child left."""
        if self.proc is None:
            return
        kids = children(self.proc.pid)
        with contextlib.suppress(Exception):  # cleanup goes on whatever happens
            self.quit()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in kids:
            if sleep_arg(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def wait_group_gone(self):
        """After a failure: stop the group and wait (bounded) for its children."""
        with contextlib.suppress(Exception):
            self.stop_group()
        pids = {p for p in children(self.pid) if sleep_arg(p) == GROUP_ARG}
        try:
            reaped(self.pid, pids, time.perf_counter())
        except RuntimeError:
            pass


class Circusish(Daemon):
    """minisup or circusd: same INI, same wire protocol, same client."""

    def __init__(self, name, argv, folder, count, ctl, extra=""):
        self.name, self.ctl = name, ctl
        self.endpoint = f"ipc://{folder}/control.sock"
        ini = os.path.join(folder, f"{name}.ini")
        with open(ini, "w") as f:
            f.write(f"[circus]\nendpoint = {self.endpoint}\n"
                    f"pubsub_endpoint = ipc://{folder}/pubsub.sock\ncheck_delay = 5\n{extra}"
                    f"[watcher:group]\ncmd = {SLEEP} {GROUP_ARG.decode()}\n"
                    f"numprocesses = {count}\nautostart = false\nrespawn = false\n"
                    "graceful_timeout = 10\n"
                    f"[watcher:one]\ncmd = {SLEEP} {ONE_ARG.decode()}\nnumprocesses = 1\n"
                    "graceful_timeout = 10\n")
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
                    raise RuntimeError(f"{name} did not answer on {self.endpoint}") from None

    def ping(self):
        self.client.call("list")

    def start_group(self):
        self._check(self.client.call("start", name="group"))

    def stop_group(self):
        self._check(self.client.call("stop", name="group"))

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


class Supervisord(Daemon):
    name = "supervisord"

    def __init__(self, folder, count):
        self.conf = os.path.join(folder, "supervisord.conf")
        sock = os.path.join(folder, "supervisor.sock")
        with open(self.conf, "w") as f:
            f.write(f"[unix_http_server]\nfile = {sock}\n"
                    f"[supervisord]\nlogfile = {folder}/supervisord.log\nloglevel = warn\n"
                    f"pidfile = {folder}/supervisord.pid\nnodaemon = true\n"
                    f"childlogdir = {folder}\n"
                    "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = "
                    "supervisor.rpcinterface:make_main_rpcinterface\n"
                    f"[supervisorctl]\nserverurl = unix://{sock}\n"
                    f"[program:group]\ncommand = {SLEEP} {GROUP_ARG.decode()}\n"
                    f"numprocs = {count}\nprocess_name = %(program_name)s_%(process_num)d\n"
                    "autostart = false\nautorestart = false\nstartsecs = 0\n"
                    "stopwaitsecs = 10\nstdout_logfile = NONE\nstderr_logfile = NONE\n"
                    f"[program:one]\ncommand = {SLEEP} {ONE_ARG.decode()}\n"
                    "autostart = true\nautorestart = true\nstartsecs = 1\n"
                    "stopwaitsecs = 10\nstdout_logfile = NONE\nstderr_logfile = NONE\n")
        self.proc = subprocess.Popen([f"{ANCHORS}/supervisor/bin/supervisord", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.rpc = xmlrpc.client.ServerProxy("http://localhost",
                                             transport=UnixTransport(sock, LIMIT))
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rpc.supervisor.getState()
                return
            except (OSError, xmlrpc.client.Error, http.client.HTTPException):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("supervisord did not answer") from None
                time.sleep(0.05)

    def ping(self):
        self.rpc.supervisor.getState()

    def start_group(self):
        self.rpc.supervisor.startProcessGroup("group", False)

    def stop_group(self):
        self.rpc.supervisor.stopProcessGroup("group", False)

    def status_argv(self):
        # supervisorctl status exits 3 when some process is not running
        # (the stopped group): that is an answer, not a failure.
        return [f"{ANCHORS}/supervisor/bin/supervisorctl", "-c", self.conf, "status"], (0, 3)

    def quit(self):
        self.proc.send_signal(signal.SIGTERM)


# -------------------------------------------------------------- scenarios ---

def round_trip(daemon, calls):
    for _ in range(20):  # warm up: connection, caches
        daemon.ping()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        daemon.ping()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def start_stop(daemon, count):
    """One cycle: start N, RSS with them running, stop N.  Milliseconds, MiB."""
    started = time.perf_counter()
    daemon.start_group()
    start_s, pids = execd(daemon.pid, GROUP_ARG, count, started)
    time.sleep(0.3)  # let the daemon settle before reading its RSS
    rss = rss_mib(daemon.pid)
    started = time.perf_counter()
    daemon.stop_group()
    stop_s = reaped(daemon.pid, pids, started)
    return start_s * 1000, stop_s * 1000, rss


def the_one(daemon):
    started = time.perf_counter()
    _, pids = execd(daemon.pid, ONE_ARG, 1, started)
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


def status_command(daemon):
    argv, codes = daemon.status_argv()
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=LIMIT, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode not in codes:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-300:]}")
    return elapsed


# ---------------------------------------------------------------- running ---

class Suite:
    def __init__(self, daemons):
        self.daemons = daemons
        self.rows = {}  # label -> {daemon name: [samples]}
        self.errors = {}  # (label, daemon name) -> message
        self.skipped = []

    def record(self, label, daemon, value):
        self.rows.setdefault(label, {}).setdefault(daemon.name, []).append(value)

    def fail(self, label, daemon, exc):
        self.errors.setdefault((label, daemon.name), f"{type(exc).__name__}: {exc}")
        print(f"  {daemon.name}: {label} failed: {exc}", file=sys.stderr)

    def alive(self):
        return [d for d in self.daemons if d.proc.poll() is None]


def repeat(suite, label, runs, measure):
    """Record ``measure(daemon)`` for every live daemon, ``runs`` rounds."""
    suite.rows[label] = {}
    for _ in range(runs):
        for daemon in suite.alive():
            try:
                suite.record(label, daemon, measure(daemon))
            except Exception as exc:  # noqa: BLE001 - one failed cell, not the suite
                suite.fail(label, daemon, exc)


def run_all(suite, count, reps, calls, kills, status_runs):
    label = "1. control round trip (us)"
    print(f"{label}: {reps} x {calls} calls", file=sys.stderr)
    repeat(suite, label, reps, lambda daemon: round_trip(daemon, calls))

    labels = (f"2. start {count} until exec'd (ms)", f"3. stop {count} until reaped (ms)",
              f"4. daemon RSS with {count} (MiB)")
    print(f"start/stop {count}: {reps} cycles each", file=sys.stderr)
    for label in labels:
        suite.rows[label] = {}
    for _ in range(reps):
        for daemon in suite.alive():
            try:
                for label, value in zip(labels, start_stop(daemon, count)):
                    suite.record(label, daemon, value)
            except Exception as exc:  # noqa: BLE001
                for label in labels:
                    suite.fail(label, daemon, exc)
                daemon.wait_group_gone()
    time.sleep(0.5)

    label = "5. respawn after kill -9 (ms)"
    print(f"respawn: {kills} kills each", file=sys.stderr)
    suite.rows[label] = {}
    current = {}
    for daemon in suite.alive():
        try:
            current[daemon.name] = the_one(daemon)
        except Exception as exc:  # noqa: BLE001
            suite.fail(label, daemon, exc)
    for _ in range(kills):
        # the pids are at least 1.3 s old: no backoff, startsecs passed
        time.sleep(1.3)
        for daemon in suite.alive():
            if daemon.name not in current:
                continue
            try:
                elapsed, current[daemon.name] = respawn(daemon, current[daemon.name])
                suite.record(label, daemon, elapsed)
            except Exception as exc:  # noqa: BLE001
                suite.fail(label, daemon, exc)
                current.pop(daemon.name)

    print(f"status command: {status_runs} runs each", file=sys.stderr)
    repeat(suite, "6. status command (ms)", status_runs, status_command)


def number(value):
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(suite, names):
    width = 24
    head = f"{'scenario':34}" + "".join(f"{n:>{width}}" for n in names)
    head += f"{'minisup/circusd':>17}{'minisup/superv.':>17}"
    print(head)
    print("-" * len(head))
    for label, cells in suite.rows.items():
        line = f"{label:34}"
        medians = {}
        for name in names:
            samples = cells.get(name)
            if not samples:
                text = "failed" if (label, name) in suite.errors else "-"
            else:
                medians[name] = statistics.median(samples)
                text = (f"{number(medians[name])} ({number(min(samples))}-"
                        f"{number(max(samples))})")
                if (label, name) in suite.errors:
                    text += "!"
            line += f"{text:>{width}}"
        for other in ("circusd", "supervisord"):
            if "minisup" in medians and medians.get(other):
                ratio = medians["minisup"] / medians[other]
                line += f"{ratio:>16.2f}x" if ratio >= 0.1 else f"{ratio:>16.2g}x"
            else:
                line += f"{'-':>17}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 processes, 3 repetitions, 300 calls, 3 kills")
    parser.add_argument("--processes", type=int, help="N (default 500, --quick 100)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 3)")
    args = parser.parse_args()
    count = args.processes or (100 if args.quick else 500)
    reps = args.reps or (3 if args.quick else 5)
    calls = 300 if args.quick else 1000
    kills = 3 if args.quick else 5
    status_runs = 5
    began = time.monotonic()

    top = tempfile.mkdtemp(prefix="minisup-bench-")
    daemons, missing = [], []
    try:
        def folder(name):
            path = os.path.join(top, name)
            os.mkdir(path)
            return path

        daemons.append(Circusish("minisup", [sys.executable, "-m", "minisup", "run"],
                                 folder("minisup"), count,
                                 [sys.executable, "-m", "minisup", "ctl"]))
        circusd = f"{ANCHORS}/circus/bin/circusd"
        if os.path.exists(circusd):
            daemons.append(Circusish("circusd", [circusd], folder("circusd"), count,
                                     [f"{ANCHORS}/circus/bin/circusctl"],
                                     extra=f"multicast_endpoint =\n"
                                     f"stats_endpoint = ipc://{top}/circusd/stats.sock\n"))
        else:
            missing.append("circusd")
        if os.path.exists(f"{ANCHORS}/supervisor/bin/supervisord"):
            daemons.append(Supervisord(folder("supervisord"), count))
        else:
            missing.append("supervisord")
        suite = Suite(daemons)
        run_all(suite, count, reps, calls, kills, status_runs)
    finally:
        for daemon in daemons:
            daemon.close()
        shutil.rmtree(top, ignore_errors=True)

    names = ["minisup", "circusd", "supervisord"]
    print()
    print(f"minisup {minisup.__version__} vs circusd 0.19.0 vs supervisord 4.3.0; "
          f"N={count}, {reps} repetitions ({calls} calls each for 1, {kills} kills for 5, "
          f"{status_runs} runs for 6); median (min-max); lower is better")
    report(suite, names)
    skipped = [f"{n} (not installed under {ANCHORS}; bash bench/setup.sh)" for n in missing]
    skipped += [f"{label} for {name}: {message}"
                for (label, name), message in suite.errors.items()]
    print("skipped or failed: " + ("; ".join(skipped) if skipped else "none"))
    print(f"total {time.monotonic() - began:.0f} s")
    return 1 if suite.errors else 0


if __name__ == "__main__":
    sys.exit(main())
