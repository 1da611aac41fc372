"""Build and load the compiled CPU library of the ops (kernels/csrc/), without torch.

Run it as a script (below): `python -m kernels.build_ext` works too, but imports the `kernels`
package (and torch) first.

    python kernels/build_ext.py            # build if missing (what `make setup` runs)
    python kernels/build_ext.py --force    # rebuild
    python kernels/build_ext.py --print    # the library paths

The sources are compiled with the system g++ into one shared library per variant under
build/ext/: a portable one (-O3, the compiler's default target) and, on x86-64, an AVX2 one and
an AVX2 + AVX-VNNI one. `load()` opens the portable one, asks it which the CPU runs, and opens
the fastest of those. Each file name carries a hash of the sources and the flags, so an edited
source is never served by a stale library: `load()` finds no file and the op fails, naming this
command. Paths are relative to the repository root (not the working directory), so the Triton
stub processes that import `kernels` find the same files. -march=native is not used: the
variants are chosen at run time, so a library built on one x86-64 host runs on any other.

-ffp-contract=off: no fused multiply-add, so `float(dot) * query_scale * item_scale` rounds twice
exactly as the torch path does and the scores are bit-identical to it.
"""

import argparse
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "kernels/csrc/ivf_int8_search.cpp"]
OUT_DIR = ROOT / "build/ext"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra"]
# variant -> extra flags; the symbols of variant v end in `_v` (IAM_ISA)
VARIANTS: Dict[str, List[str]] = {"portable": []}
if platform.machine() in ("x86_64", "AMD64"):
    VARIANTS["avx2"] = ["-mavx2"]
    VARIANTS["avxvnni"] = ["-mavx2", "-mavxvnni"]
# bit of iam_cpu_features() each non-portable variant needs, fastest first
FEATURE_BITS = {"avxvnni": 2, "avx2": 1}
COMPILER = os.environ.get("CXX", "g++")
BUILD_COMMAND = "make setup  (or: .venv/bin/python kernels/build_ext.py)"


def _flags(variant: str) -> List[str]:
    return BASE_FLAGS + VARIANTS[variant] + [f"-DIAM_ISA={variant}"]


def library_path(variant: str) -> Path:
    """build/ext/libiam_cpu-<variant>-<hash of sources and flags>.so"""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(" ".join([COMPILER] + _flags(variant)).encode())
    return OUT_DIR / f"libiam_cpu-{variant}-{digest.hexdigest()[:16]}.so"


def build(force: bool = False, quiet: bool = False) -> List[Path]:
    """Compile every variant whose library is missing (or all with force). Writes to a temporary
    file first and renames, so a concurrent loader never opens half a library."""
    if shutil.which(COMPILER) is None:
        raise SystemExit(f"kernels.build_ext: the C++ compiler {COMPILER!r} is not on PATH "
                         "(apt-get install g++, or set CXX)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for variant in VARIANTS:
        path = library_path(variant)
        paths.append(path)
        if path.exists() and not force:
            continue
        with tempfile.NamedTemporaryFile(dir=OUT_DIR, suffix=".so.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        cmd = [COMPILER] + _flags(variant) + [str(s) for s in SOURCES] + ["-o", str(tmp_path)]
        if not quiet:
            print(" ".join(cmd), flush=True)
        try:
            subprocess.run(cmd, check=True)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        # older builds of this variant are stale: remove them
        for old in OUT_DIR.glob(f"libiam_cpu-{variant}-*.so"):
            if old != path:
                old.unlink(missing_ok=True)
    return paths


_LOADED: Dict[str, Optional["CpuLibrary"]] = {}


class CpuLibrary:
    """The opened library: `variant` (portable or avx2) and the ctypes functions."""

    def __init__(self, variant: str, handle: ctypes.CDLL):
        self.variant = variant
        self.path = library_path(variant)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.ivf_int8_search = getattr(handle, f"iam_ivf_int8_search_{variant}")
        self.ivf_int8_search.restype = i64
        self.ivf_int8_search.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, ptr, i64, ptr, ptr,
                                         i64, i64, i64, i64, i64, ptr, ptr, ptr]


def load(variant: str = "best") -> Optional[CpuLibrary]:
    """The library of `variant` ("best": the fastest this CPU runs), cached; None when it was not
    built (or "avx2" on a CPU without AVX2)."""
    if variant not in _LOADED:
        _LOADED[variant] = _open(variant)
    return _LOADED[variant]


def _open(variant: str) -> Optional[CpuLibrary]:
    portable = library_path("portable")
    if not portable.exists():
        return None
    handle = ctypes.CDLL(str(portable))
    if variant == "portable":
        return CpuLibrary("portable", handle)
    features = handle.iam_cpu_features_portable()
    runnable = [v for v, bit in FEATURE_BITS.items() if v in VARIANTS and features & bit]
    if variant != "best":
        runnable = [v for v in runnable if v == variant]
        if not runnable:
            return None
    for v in runnable:  # a build this CPU runs but that is missing: not built (None)
        return CpuLibrary(v, ctypes.CDLL(str(library_path(v)))) if library_path(v).exists() \
            else None
    return CpuLibrary("portable", handle)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--quiet", action="store_true", help="print nothing when up to date")
    ap.add_argument("--print", action="store_true", dest="print_paths",
                    help="print the library paths and exit")
    args = ap.parse_args(argv)
    if args.print_paths:
        for variant in VARIANTS:
            path = library_path(variant)
            print(f"{variant}: {path} ({'built' if path.exists() else 'missing'})")
        return
    for path in build(force=args.force, quiet=args.quiet):
        if not args.quiet:
            print(f"ok: {path.relative_to(ROOT)}")
    if not args.quiet:
        lib = load()
        print(f"this CPU runs: {lib.variant if lib else 'nothing (load failed)'}")


if __name__ == "__main__":
    sys.exit(main())
