"""atomic.py: two writers of one path at once each leave a whole file, never a mix; the file gets the
mode open() gives; nothing is left behind."""
import os
import stat
import threading

from atomic import atomic_write


def test_two_writers_at_once_leave_one_whole_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    both_open, errors = threading.Barrier(2), []

    def writer(byte):
        def write(f):  # half, then wait until the other writer is mid-file too, then the rest
            f.write(byte * 50_000)
            both_open.wait(timeout=10)
            f.write(byte * 50_000)
        try:
            atomic_write(path, write)
        except Exception as e:  # a thread's exception would not fail the test by itself
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(b,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and path.read_bytes() in (b"a" * 100_000, b"b" * 100_000)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # both temporary files renamed away


def test_mode_is_what_open_gives(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    atomic_write(tmp_path / "atomic", "x")
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
