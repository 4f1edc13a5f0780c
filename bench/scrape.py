"""Metrics endpoint of minisup: scrape time with N processes, and what
scraping costs the control round trip.

Runs ``python -m minisup run`` (a subprocess, so that the measuring client
does not share the daemon's GIL; minisup byte-compiled first, as pip does at
install, into a pycache prefix in the temp folder) on a private ipc control
endpoint, with ``[circus] metrics_endpoint = 127.0.0.1:0`` (the bound port
is read from ``globaloptions``) and one watcher of N ``sleep 1000``
(N=500, --quick 100), and waits until all N are listed and have exec'd.

 1. scrape (ms): 200 (--quick 50) ``GET /metrics``, one after another, each
    on a connection of its own (http.client, one request per connection, as
    Prometheus with keep-alive off), timed from before the connect to the
    last byte of the body; median, p90 and max.  One scrape before them is
    not counted (shown as "first").  Also the body size in bytes and the
    number of samples (non-empty lines not starting with '#').
 2. control round trip (us): the median of 1000 (--quick 300) ``list``
    calls through minisup.Client, one after another, with nothing else
    going on ("quiet"), then with another process (this script with
    --scraper, started once, told by a pipe when to scrape) scraping
    /metrics 10 times per second, the first as the run begins
    ("scraping"); 5 repetitions (--quick 3), alternating quiet, scraping,
    quiet, ...  Shown: the median of the medians of each kind, their ratio,
    and the min-max of the quiet medians (the noise); under the table, each
    run's median and slowest call, and the scrapes that overlapped each
    scraping run (a run of 1000 calls lasts a few hundred ms: only a few).

Traffic goes only to 127.0.0.1 and to ipc:// paths in the temp folder.  At
the end (also on Ctrl-C or an error) the daemon is told to quit, then
killed if it does not, with every child left and any cgroup of its own
(minisup.DAEMON-PID.*) left; every minisup.* cgroup beside this script's
is listed before and after (another daemon's may come and go meanwhile).

    python bench/scrape.py [--quick] [--processes N]
"""

import argparse
import contextlib
import http.client
import json
import os
import py_compile
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# This process's import writes no __pycache__ into the repository; the
# daemon's bytecode goes to the temp folder (see compile_minisup).
sys.dont_write_bytecode = True

from run import cgroup_home, minisup_cgroups, remove_cgroup  # bench/run.py's own

import minisup

SLEEP = shutil.which("sleep") or "/bin/sleep"  # absolute: a child's PATH may be empty
SLEEP_EXE = os.path.realpath(SLEEP)
SCRAPE_RATE = 10.0  # scrapes per second while "scraping"
LIMIT = 60.0  # seconds: a wait longer than this is a failure


# ---------------------------------------------------------------- helpers ---

def percentile(values, fraction):
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil
    return ordered[int(rank) - 1]


def children(pid):
    found = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as stream:
                found.update(int(p) for p in stream.read().split())
    return found


def is_sleep(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe") == SLEEP_EXE
    except OSError:
        return False  # not exec'd yet, or gone


def compile_minisup(prefix):
    """Byte-compile minisup.py into the pycache prefix ``prefix`` (where a
    Python with PYTHONPYCACHEPREFIX=prefix looks for it), as pip does at
    install: else the daemon would compile the module at each start."""
    saved = sys.pycache_prefix
    sys.pycache_prefix = prefix
    try:
        return py_compile.compile(minisup.__file__, doraise=True)
    finally:
        sys.pycache_prefix = saved


# --------------------------------------------------------------- scraping ---

def scrape(host, port):
    """One GET /metrics on a connection of its own: (seconds from before the
    connect to the body's last byte, status, body)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return elapsed, response.status, body


def scraper(address):
    """--scraper HOST:PORT: read commands on stdin, one a line: ``on``
    starts scraping SCRAPE_RATE times per second, the first at once;
    ``off`` stops and writes, as a JSON line, each scrape's start
    (time.monotonic, comparable across processes) and duration, and the
    errors.  Ends at end of input.  Writes ``ready`` first, once started
    (its interpreter's start-up would else eat into the first run)."""
    host, _, port = address.rpartition(":")
    port = int(port)
    period = 1.0 / SCRAPE_RATE
    pending = b""
    active = False
    done, errors = [], []
    next_at = 0.0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        now = time.monotonic()
        if active and now >= next_at:
            try:
                elapsed, status, _ = scrape(host, port)
                if status != 200:
                    errors.append(f"HTTP {status}")
                done.append((now, elapsed))
            except OSError as exc:
                errors.append(repr(exc))
            next_at += period
            if next_at < time.monotonic():  # late: no burst to catch up
                next_at = time.monotonic() + period
            continue
        wait = max(0.0, next_at - now) if active else None
        readable, _, _ = select.select([0], [], [], wait)
        if not readable:
            continue
        data = os.read(0, 4096)
        if not data:
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line == b"on":
                active, done, errors = True, [], []
                next_at = time.monotonic()
            elif line == b"off":
                active = False
                sys.stdout.write(json.dumps({"scrapes": done, "errors": errors}) + "\n")
                sys.stdout.flush()


class Scraper:
    """The --scraper process, driven through its stdin and stdout."""

    def __init__(self, address):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--scraper", address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        if self._line() != b"ready\n":
            raise RuntimeError("the scraper did not say ready")

    def _line(self):
        readable, _, _ = select.select([self.process.stdout], [], [], LIMIT)
        if not readable:
            raise RuntimeError("the scraper does not answer")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the scraper ended (status {self.process.wait()})")
        return line

    def _send(self, command):
        self.process.stdin.write(command + b"\n")
        self.process.stdin.flush()

    def on(self):
        """Start scraping; the first scrape begins at once."""
        self._send(b"on")

    def off(self):
        """Stop scraping; return the scraper's report (see ``scraper``)."""
        self._send(b"off")
        return json.loads(self._line())

    def close(self):
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdout.close()


# ------------------------------------------------------------------ daemon ---

def config(endpoint, count):
    return (f"[circus]\nendpoint = {endpoint}\nmetrics_endpoint = 127.0.0.1:0\n"
            f"[watcher:sleep]\ncmd = {SLEEP} 1000\nnumprocesses = {count}\n")


def wait_running(client, daemon, count):
    """Wait until the watcher lists ``count`` pids, each a child of the
    daemon that has exec'd sleep; return the pids."""
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon ended (status {daemon.returncode})")
        try:
            pids = client.call("list", name="sleep").get("pids") or []
        except minisup.CallError:
            pids = []
        if len(pids) == count and set(pids) <= children(daemon.pid) and all(map(is_sleep, pids)):
            return pids
        time.sleep(0.05)
    raise RuntimeError(f"not {count} sleeps running within {LIMIT:.0f} s")


def stop_daemon(daemon, endpoint, pids, home, notes):
    """Quit the daemon; if it does not go, kill it, its children and any
    minisup.* cgroup it left."""
    if daemon.poll() is None:
        try:
            with minisup.Client(endpoint, timeout=5) as client:
                client.call("quit")
        except (minisup.CallError, OSError):
            # Not serving yet (interrupted as it started): SIGTERM is a
            # quit too, once its handlers are in; before, it just ends.
            with contextlib.suppress(OSError):
                daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(LIMIT)
        except subprocess.TimeoutExpired:
            notes.append("the daemon did not quit: killed")
            daemon.kill()
            daemon.wait()
    left = [p for p in pids if is_sleep(p)]
    if left:
        notes.append(f"{len(left)} sleeps outlived the daemon: killed")
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    # Only its own (minisup.PID.START.N): another daemon on this machine,
    # a test suite's say, may make and remove minisup.* cgroups meanwhile.
    ours = [n for n in minisup_cgroups(home) if n.startswith(f"minisup.{daemon.pid}.")]
    for name in ours:
        remove_cgroup(os.path.join(home, name))
    if ours:
        notes.append(f"the daemon left cgroups {ours}: killed, removed")


# -------------------------------------------------------------- measuring ---

def containment(client):
    """What the daemon contains its children with, and, in a cgroup,
    where the metrics' memory figure comes from."""
    found = client.call("health").get("containment") or {}
    text = f"containment: {found.get('mode', 'unknown')}"
    if found.get("mode") != "cgroup":
        return text
    try:
        with open(os.path.join(found["cgroup"], "cgroup.controllers")) as stream:
            controllers = stream.read().split()
    except OSError:
        controllers = []
    if "memory" in controllers:
        return f"{text} {found['cgroup']}, memory from memory.current"
    return (f"{text} {found['cgroup']}, no memory controller there: "
            "memory summed from /proc, process by process")


def round_trips(client, calls):
    """The median and the max of ``calls`` ``list`` calls, one after
    another, in s."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        client.call("list")
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), max(samples)


def measure(args, endpoint, daemon, notes):
    with minisup.Client(endpoint, timeout=10) as client:
        pids = wait_running(client, daemon, args.processes)
        notes.append(containment(client))
        address = client.call("globaloptions")["options"]["metrics_endpoint"]
        host, _, port = address.rpartition(":")
        if host != "127.0.0.1":
            raise RuntimeError(f"metrics bound on {address}, not 127.0.0.1")
        port = int(port)

        first, status, body = scrape(host, port)
        if status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {status}: {body[:200]!r}")
        times, sizes, samples = [], set(), set()
        for _ in range(args.scrapes):
            elapsed, status, body = scrape(host, port)
            if status != 200:
                raise RuntimeError(f"GET /metrics: HTTP {status}: {body[:200]!r}")
            times.append(elapsed)
            sizes.add(len(body))
            samples.add(sum(1 for line in body.decode().splitlines()
                            if line and not line.startswith("#")))
        scrapes = {"first": first, "times": times, "sizes": sizes, "samples": samples}

        runs = {"quiet": [], "scraping": []}
        overlapping, errors, durations = [], [], []
        helper = Scraper(address)
        try:
            for _ in range(args.reps):
                runs["quiet"].append(round_trips(client, args.calls))
                helper.on()
                started = time.monotonic()
                runs["scraping"].append(round_trips(client, args.calls))
                ended = time.monotonic()
                report = helper.off()
                errors += report["errors"]
                durations += [d for _, d in report["scrapes"]]
                # Those that began in the run, or were under way when it began.
                overlapping.append(sum(1 for at, d in report["scrapes"]
                                       if at < ended and at + d > started))
        finally:
            helper.close()
        if errors:
            notes.append(f"scraper errors: {errors[:3]} ({len(errors)} in all)")
        if sorted(set(children(daemon.pid)) & set(pids)) != sorted(pids):
            notes.append("some sleeps were replaced during the run")
    return pids, scrapes, runs, overlapping, durations


def print_report(args, scrapes, runs, overlapping, durations, home, before, after, notes):
    ms = [t * 1000 for t in scrapes["times"]]
    quiet = [median * 1e6 for median, _ in runs["quiet"]]
    busy = [median * 1e6 for median, _ in runs["scraping"]]
    quiet_median, busy_median = statistics.median(quiet), statistics.median(busy)
    rows = [
        (f"1. scrape, {args.processes} processes (ms, n={len(ms)})", "", ""),
        ("   median", f"{statistics.median(ms):.2f}", "<= 20"),
        ("   p90", f"{percentile(ms, 0.9):.2f}", ""),
        ("   max", f"{max(ms):.2f}", ""),
        ("   first (not counted)", f"{scrapes['first'] * 1000:.2f}", ""),
        ("   body (bytes)", "/".join(str(s) for s in sorted(scrapes["sizes"])), ""),
        ("   samples", "/".join(str(s) for s in sorted(scrapes["samples"])), ""),
        (f"2. list round trip (us, median of {len(quiet)} medians of {args.calls})", "", ""),
        ("   quiet", f"{quiet_median:.1f}", ""),
        (f"   {SCRAPE_RATE:g} scrapes/s", f"{busy_median:.1f}", "within noise"),
        ("   ratio scraping/quiet", f"{busy_median / quiet_median:.3f}", ""),
        ("   noise (quiet min-max)", f"{min(quiet):.1f}-{max(quiet):.1f}", ""),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"minisup metrics endpoint: {args.processes} x sleep, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'':{width}}{'value':>14}  target")
    for label, value, target in rows:
        print(f"{label:{width}}{value:>14}  {target}")
    print()
    where = "within"
    if busy_median < min(quiet):
        where = "below"
    elif busy_median > max(quiet):
        where = "above"
    print(f"scrape with {args.processes} processes, target <= 20 ms: median "
          f"{statistics.median(ms):.2f} ms ({'met' if statistics.median(ms) <= 20 else 'missed'}), "
          f"max {max(ms):.2f} ms ({'met' if max(ms) <= 20 else 'missed'})")
    print(f"round trip while scraping {busy_median:.1f} us: "
          f"{where} the quiet noise "
          f"{min(quiet):.1f}-{max(quiet):.1f} us")
    for kind in ("quiet", "scraping"):
        print(f"{kind} runs, median (slowest call), us: " + "  ".join(
            f"{median * 1e6:.1f} ({slowest * 1e6:.0f})" for median, slowest in runs[kind]))
    print(f"scrapes during each scraping run: {overlapping}; the scraper's own "
          f"scrape times (ms): median {statistics.median(durations) * 1000:.2f}, "
          f"max {max(durations) * 1000:.2f}, n={len(durations)}")
    print(f"minisup.* cgroups in {home}: before {before}, after {after}")
    for note in notes:
        print(f"note: {note}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N=100, 50 scrapes, 300 calls a run, 3 repetitions")
    parser.add_argument("--processes", type=int, help="N (default 500, --quick 100)")
    parser.add_argument("--scraper", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scraper:
        return scraper(args.scraper)
    if args.processes is None:
        args.processes = 100 if args.quick else 500
    args.scrapes = 50 if args.quick else 200
    args.calls = 300 if args.quick else 1000
    args.reps = 3 if args.quick else 5

    home = cgroup_home()
    before = minisup_cgroups(home)
    notes = []
    with tempfile.TemporaryDirectory(prefix="minisup-scrape-") as folder:
        endpoint = f"ipc://{folder}/control.sock"
        ini = os.path.join(folder, "scrape.ini")
        with open(ini, "w") as stream:
            stream.write(config(endpoint, args.processes))
        prefix = os.path.join(folder, "pycache")
        compile_minisup(prefix)
        env = dict(os.environ, PYTHONPYCACHEPREFIX=prefix)
        # A session of its own: Ctrl-C reaches this script only, whose
        # finally then stops the daemon cleanly.
        daemon = subprocess.Popen([sys.executable, "-m", "minisup", "run", ini,
                                   "--log-level", "error"],
                                  cwd=ROOT, env=env, start_new_session=True)
        pids = []
        try:
            pids, scrapes, runs, overlapping, durations = measure(args, endpoint, daemon, notes)
        finally:
            if not pids:  # failed or interrupted before: whatever it started
                pids = [p for p in children(daemon.pid) if is_sleep(p)]
            stop_daemon(daemon, endpoint, pids, home, notes)
    after = minisup_cgroups(home)
    print_report(args, scrapes, runs, overlapping, durations, home, before, after, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
