"""cffi build script for the native core (API mode).

It lives outside the package so that the package never imports a module
that has not been built.  One cdef file per C area is read in sorted order.
"""
from __future__ import annotations

import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["fault.c", "group.c", "heap.c", "hset.c", "ops.c", "reqring.c", "segment.c", "slots.c", "wait.c"]

ffibuilder = FFI()
for cdef in sorted((HERE / "cdef").glob("*.cdef")):
    ffibuilder.cdef(cdef.read_text())

ffibuilder.set_source(
    "engine._core",
    '#include "headrace.h"',
    sources=[str((HERE / s).relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"],
    libraries=["pthread", "m"] if sys.platform.startswith("linux") else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
