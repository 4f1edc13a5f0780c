"""Output capture: minisup beside circusd's FileStream and supervisord's
stdout_logfile, on the same child, in one run.

bench/run.py runs the same measurement as its scenarios 10 and 11 (and
imports this file's helpers).

The child is ``cat`` of a file of numbered lines made once (200 MiB by
default), so every supervisor gets the same bytes as fast as a pipe allows.
Each run starts the program through the supervisor's own control channel,
then times until the log holds every byte, and reads the daemon's CPU time
from /proc.  Runs alternate (minisup, circusd, supervisord, ...).  The log
is then compared with the input: "identical" or not.

    bash bench/setup.sh            # the anchors, in venvs of their own
    python bench/capture.py [--mib 200] [--runs 3]

Everything listens on ipc:// or unix sockets in a temp folder; every wait
is bounded; every daemon is killed by pid at the end.
"""

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import minisup

ANCHORS = os.environ.get("MINISUP_BENCH", os.path.expanduser("~/.cache/minisup-bench"))
CAT = shutil.which("cat")  # absolute: a child's PATH may be empty
LIMIT = 300.0  # seconds: a run slower than this is a failure, not a sample


def make_input(path, mib):
    line = b"%09d " + b"x" * 70 + b"\n"
    count = mib * (1 << 20) // 80
    with open(path, "wb") as out:
        out.writelines(b"".join(line % n for n in range(start, min(start + 10000, count)))
                       for start in range(0, count, 10000))
    return os.path.getsize(path)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_size(path, size, started):
    while time.monotonic() - started < LIMIT:
        if os.path.exists(path) and os.path.getsize(path) >= size:
            return time.monotonic() - started
        time.sleep(0.002)
    raise RuntimeError(f"{path} did not reach {size} bytes")


class Circusish:
    """minisup or circusd: same INI, same wire protocol, same client."""

    def __init__(self, name, argv, folder, data, out, extra=""):
        self.name, self.folder, self.out = name, folder, out
        self.endpoint = f"ipc://{folder}/{name}.sock"
        stream = "circus.stream.FileStream"
        ini = os.path.join(folder, f"{name}.ini")
        with open(ini, "w") as f:
            f.write(f"[circus]\nendpoint = {self.endpoint}\ncheck_delay = 5\n{extra}"
                    f"[watcher:cat]\ncmd = {CAT} {data}\nautostart = false\n"
                    f"respawn = false\nstdout_stream.class = {stream}\n"
                    f"stdout_stream.filename = {out}\n")
        self.proc = subprocess.Popen([*argv, ini], cwd=os.path.dirname(HERE),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = minisup.Client(self.endpoint, timeout=2.0)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.call("numwatchers")
                return
            except minisup.CallError:
                if time.monotonic() > deadline:
                    raise

    def start(self):
        self.client.call("start", name="cat")

    def stop(self):
        self.client.call("stop", name="cat", waiting=True)

    def close(self):
        # A graceful quit first: circusd's stats helper outlives a SIGKILL.
        with contextlib.suppress(minisup.CallError):
            self.client.call("quit", waiting=True)
        self.client.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisord:
    def __init__(self, name, folder, data, out):
        self.name, self.out = name, out
        self.conf = os.path.join(folder, "supervisord.conf")
        sock = os.path.join(folder, "supervisor.sock")
        with open(self.conf, "w") as f:
            f.write(f"[unix_http_server]\nfile = {sock}\n"
                    f"[supervisord]\nlogfile = {folder}/supervisord.log\n"
                    f"pidfile = {folder}/supervisord.pid\nnodaemon = true\n"
                    "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = "
                    "supervisor.rpcinterface:make_main_rpcinterface\n"
                    f"[supervisorctl]\nserverurl = unix://{sock}\n"
                    f"[program:cat]\ncommand = {CAT} {data}\nautostart = false\n"
                    "autorestart = false\nstartsecs = 0\n"
                    f"stdout_logfile = {out}\nstdout_logfile_maxbytes = 0\n")
        self.proc = subprocess.Popen([f"{ANCHORS}/supervisor/bin/supervisord", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self._ctl("status").returncode not in (0, 3):
            if time.monotonic() > deadline:
                raise RuntimeError("supervisord did not answer")
            time.sleep(0.05)

    def _ctl(self, *args):
        return subprocess.run([f"{ANCHORS}/supervisor/bin/supervisorctl", "-c", self.conf,
                               *args], capture_output=True, check=False, timeout=60)

    def start(self):
        # supervisorctl returns once the program is running; the clock runs
        # from before the call, as for the others.
        self._ctl("start", "cat")

    def stop(self):
        self._ctl("stop", "cat")

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(system, size):
    # Circus opens its log once, at start: the file is never removed, each
    # run appends to it, and the wait is for that many more bytes.
    before = os.path.getsize(system.out) if os.path.exists(system.out) else 0
    cpu = cpu_seconds(system.proc.pid)
    started = time.monotonic()
    system.start()
    elapsed = wait_size(system.out, before + size, started)
    cpu = cpu_seconds(system.proc.pid) - cpu
    system.stop()
    return elapsed, cpu


def digest(path, skip=0):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="minisup-bench-")
    try:
        data = os.path.join(folder, "input")
        size = make_input(data, args.mib)
        expected = digest(data)
        systems = [Circusish("minisup", [sys.executable, "-m", "minisup", "run"], folder,
                             data, f"{folder}/minisup.out")]
        if os.path.exists(f"{ANCHORS}/circus/bin/circusd"):
            # circusd's defaults would join a multicast group and bind TCP
            # ports: discovery off, pub/sub and stats on ipc in the folder.
            quiet = (f"multicast_endpoint =\npubsub_endpoint = ipc://{folder}/pub.sock\n"
                     f"stats_endpoint = ipc://{folder}/stats.sock\n")
            systems.append(Circusish("circusd", [f"{ANCHORS}/circus/bin/circusd"], folder,
                                     data, f"{folder}/circusd.out", quiet))
        if os.path.exists(f"{ANCHORS}/supervisor/bin/supervisord"):
            systems.append(Supervisord("supervisord", folder, data, f"{folder}/supervisord.out"))
        samples = {s.name: [] for s in systems}
        same = {}
        try:
            for _ in range(args.runs):
                for system in systems:
                    samples[system.name].append(one_run(system, size))
                    last = os.path.getsize(system.out) - size
                    same[system.name] = same.get(system.name, True) and (
                        digest(system.out, last) == expected)
        finally:
            for system in systems:
                system.close()
        report(samples, same, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(samples, same, size):
    mib = size / (1 << 20)
    rate = {n: statistics.median(mib / t for t, _ in runs) for n, runs in samples.items()}
    cpu = {n: statistics.median(c * 100 / mib for _, c in runs) for n, runs in samples.items()}
    print(f"capture {mib:.0f} MiB of stdout to a file, median of {len(samples['minisup'])} runs")
    print(f"{'':12} {'MiB/s':>8} {'(min-max)':>17} {'CPU s/100MiB':>13} {'bytes':>10} "
          f"{'minisup/this':>13}")
    for name, runs in samples.items():
        rates = [mib / t for t, _ in runs]
        ratio = rate["minisup"] / rate[name]
        print(f"{name:12} {rate[name]:8.0f} {min(rates):8.0f}-{max(rates):<8.0f} "
              f"{cpu[name]:13.2f} {'identical' if same[name] else 'ALTERED':>10} "
              f"{ratio:12.2f}x")


if __name__ == "__main__":
    main()
