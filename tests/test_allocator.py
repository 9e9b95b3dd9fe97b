"""On a CPU, ``resolve_device`` makes glibc keep freed memory in the process; ``TASNET_MALLOC=default`` opts out,
and where the C library is not glibc nothing is set."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from utils import InputError, REPO_ROOT, runtime

# A 64 MiB block, over glibc's largest dynamic mmap threshold (32 MiB): mallinfo2 counts it under hblkhd when it
# got its own mmap, and arena (the heap) shows whether freeing it gave the pages back.
CHILD = """
import ctypes, json
from utils import resolve_device

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
resolve_device("cpu")
before = libc.mallinfo2()
block = libc.malloc(64 << 20)
allocated = libc.mallinfo2()
libc.free(ctypes.c_void_p(block))
freed = libc.mallinfo2()
print(json.dumps({"mmapped": allocated.hblkhd - before.hblkhd, "heap_allocated": allocated.arena,
                  "heap_freed": freed.arena}))
"""


@pytest.fixture(autouse=True)
def fresh_decision():
    """keep_freed_memory decides once per process: every test here decides anew, and leaves no decision made
    with a stand-in libc behind for the rest of the suite."""
    runtime.keep_freed_memory.cache_clear()
    yield
    runtime.keep_freed_memory.cache_clear()


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_cpu_device_sets_no_mmap_and_no_trim_once_and_says_so(monkeypatch, capsys):
    libc = FakeLibc()
    monkeypatch.setattr(runtime, "glibc", lambda: libc)
    monkeypatch.delenv(runtime.MALLOC_ENV, raising=False)
    runtime.resolve_device("cpu")
    runtime.resolve_device("cpu")
    assert libc.calls == [(runtime.M_MMAP_MAX, 0), (runtime.M_TRIM_THRESHOLD, runtime.NEVER_TRIM)]
    err = capsys.readouterr().err
    assert err.count("note: CPU memory: glibc keeps freed memory") == 1 and "TASNET_MALLOC=default" in err


def test_opt_out_sets_nothing(monkeypatch, capsys):
    libc = FakeLibc()
    monkeypatch.setattr(runtime, "glibc", lambda: libc)
    monkeypatch.setenv(runtime.MALLOC_ENV, "default")
    runtime.resolve_device("cpu")
    assert not runtime.keep_freed_memory() and libc.calls == [] and capsys.readouterr().err == ""


def test_without_glibc_nothing_is_set(monkeypatch, capsys):
    """macOS, musl: the C library has no ``gnu_get_libc_version``, so the lookup finds no glibc."""
    class OtherLibc:
        pass

    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: OtherLibc())
    monkeypatch.delenv(runtime.MALLOC_ENV, raising=False)
    assert runtime.glibc() is None
    assert not runtime.keep_freed_memory() and capsys.readouterr().err == ""


def test_unknown_value_is_refused(monkeypatch):
    monkeypatch.setenv(runtime.MALLOC_ENV, "jemalloc")
    with pytest.raises(InputError, match="TASNET_MALLOC=jemalloc: unknown value; use keep .* or default"):
        runtime.resolve_device("cpu")


@pytest.mark.slow
@pytest.mark.skipif(runtime.glibc() is None or not hasattr(runtime.glibc(), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_on_glibc_large_blocks_come_from_the_heap_and_stay_there():
    def child(choice: str) -> dict:
        env = {**os.environ, runtime.MALLOC_ENV: choice}
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    kept, default = child("keep"), child("default")
    assert kept["mmapped"] == 0 and kept["heap_freed"] == kept["heap_allocated"]
    assert default["mmapped"] >= 64 << 20
