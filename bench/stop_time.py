"""Stop time of minisup: 100 processes that obey SIGTERM, and 100 that
ignore it with graceful_timeout = 1.

Runs ``python -m minisup run`` on a private ipc endpoint with both
watchers, then times ``stop NAME --waiting`` (request to reply, which comes
once every process is reaped), N times each.  Only minisup; bench/run.py
(scenarios 4 and 6) measures both beside circusd and supervisord.

    python bench/stop_time.py [-n 3] [--processes 100]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import minisup

OBEY = "import time; time.sleep(1000)"
IGNORE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"


def config(endpoint, count):
    def watcher(name, code):
        return (f"[watcher:{name}]\ncmd = {sys.executable} -c \"{code}\"\n"
                f"numprocesses = {count}\ngraceful_timeout = 1\nautostart = false\n")
    return f"[circus]\nendpoint = {endpoint}\n" + watcher("obey", OBEY) + watcher("ignore", IGNORE)


def time_stop(client, name, count):
    client.call("start", name=name, waiting=True)
    # Let each child install its handler: a SIGTERM during interpreter start
    # would kill an "ignore" child at once and flatter the figure.
    time.sleep(1.5)
    assert len(client.call("list", name=name)["pids"]) == count
    started = time.perf_counter()
    reply = client.call("stop", name=name, waiting=True)
    elapsed = time.perf_counter() - started
    assert reply["status"] == "ok", reply
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--processes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        endpoint = f"ipc://{folder}/bench.sock"
        ini = os.path.join(folder, "bench.ini")
        with open(ini, "w") as stream:
            stream.write(config(endpoint, args.processes))
        daemon = subprocess.Popen([sys.executable, "-m", "minisup", "run", ini,
                                   "--log-level", "error"], cwd=os.path.dirname(HERE))
        try:
            with minisup.Client(endpoint, timeout=30) as client:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        client.call("numwatchers")
                        break
                    except minisup.CallError:
                        pass
                results = {name: [time_stop(client, name, args.processes) for _ in range(args.n)]
                           for name in ("obey", "ignore")}
                client.call("quit")
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    for name, samples in results.items():
        print(f"stop {args.processes} that {name} SIGTERM: median {statistics.median(samples):.3f} s "
              f"(min {min(samples):.3f}, max {max(samples):.3f}, n={len(samples)})")


if __name__ == "__main__":
    main()
