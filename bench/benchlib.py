"""
bench/benchlib.py: what the benchmarks share: the repository root on sys.path, and the peak memory of a
process tree.

Memory is measured from outside, the same way for every benchmark: a sampler thread reads /proc while the
measured command runs and sums VmRSS over the process and all its descendants. The sum is what the
machine must hold: prepare.py's tokenizer workers and bpe.py's counting workers are children, and
resource.getrusage's ru_maxrss would give only the largest single process. Sampling can miss a peak
shorter than its interval, so the figures are a slight underestimate. Linux only (/proc).
"""
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmarks import the library modules (bpe, checkpoint, shards, ...)


def tree_rss_kb(pid):
    """VmRSS (kB) of pid plus all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += map(int, f.read().split())
        except (OSError, StopIteration):
            pass  # it exited between listing and reading
    return total


def watch_rss(proc, every):
    """Sample tree_rss_kb of the running subprocess proc every `every` seconds, on a daemon thread, until it
    exits. Returns (samples, thread): samples fills with (time.perf_counter(), kB); join the thread after
    proc has ended, then samples is complete."""
    samples = []

    def sample():
        while proc.poll() is None:
            samples.append((time.perf_counter(), tree_rss_kb(proc.pid)))
            time.sleep(every)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return samples, thread
