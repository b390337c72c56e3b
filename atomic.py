"""
atomic.py: write a file so that a reader sees the old file or the new one, never half of either.

Every file this repository writes that something else later trusts (checkpoints, token shards, the
tokenizer, the data card) goes through atomic_write: the bytes go to a temporary file of its own in the
same directory (NAME.<random>.tmp, so two writers of one path at once never share one), are flushed
and fsync'ed to the disk, and only then is the temporary renamed over the real name. os.replace is
atomic on POSIX and Windows within one filesystem, so a crash, a SIGKILL or a full disk mid-write
leaves at worst a stray *.tmp file, which no reader looks for; of two writers at once, the last
rename wins, whole. The file gets the mode open() would give it (0666 less the umask), not
mkstemp's private 0600.
"""
import os
import tempfile

# the umask can only be read by setting it, which would race with another thread creating a file:
# read once, at import, before this repository starts any thread
UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path, data):
    """Write data (str, bytes, or a function that writes to a binary file object) to path atomically."""
    # same directory, hence same filesystem: the rename cannot be a copy
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name says the file is complete
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C mid-write: leave no partial file behind either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
