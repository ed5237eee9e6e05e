"""Build of lstm_fast's Cython extensions.

OpenMP is detected by compiling and running a tiny program; without it the build warns loudly and
goes serial (prange becomes a plain loop). LSTM_FAST_DEBUG=1 turns Cython's bounds checks back on.
LSTM_FAST_PORTABLE=1 drops -march=native (set it when building wheels for other machines).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ["_cpuid", "_threading", "_forward", "_backward", "_step", "_lowp"]

OPENMP_TEST = textwrap.dedent(
    r"""
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return 0;
    }
    """
)


def _compiler_kind(compiler):
    if compiler.compiler_type == "msvc":
        return "msvc"
    cc = " ".join(compiler.compiler or []) if hasattr(compiler, "compiler") else ""
    if sys.platform == "darwin" and "gcc" not in cc:
        return "apple-clang"
    return "gcc"


def _openmp_flags(kind):
    if kind == "msvc":
        return ["/openmp"], []
    if kind == "apple-clang":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _try_compile(compiler, source, extra_compile, extra_link, run=False):
    """Compile (and optionally run) a C snippet; True when it works."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=extra_compile)
        exe = os.path.join(tmp, "probe")
        compiler.link_executable(objs, exe, extra_postargs=extra_link)
        if run:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and out.stdout.strip() == "1"
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Adds the flags this compiler supports: OpenMP (or a serial fallback), -O3, -march=native."""

    def build_extensions(self):
        kind = _compiler_kind(self.compiler)
        compile_args, link_args = [], []
        if kind == "msvc":
            compile_args.append("/O2")
        else:
            compile_args += ["-O3", "-fno-math-errno", "-Wno-unused-function"]
            if os.environ.get("LSTM_FAST_PORTABLE", "0") != "1":
                if _try_compile(self.compiler, "int main(void){return 0;}", ["-march=native"], []):
                    compile_args.append("-march=native")
                    # gcc keeps 256-bit vectors on AVX-512 CPUs unless told; the gate loops run
                    # twice as wide with 512 (ignored where the CPU has no AVX-512)
                    if _try_compile(self.compiler, "int main(void){return 0;}",
                                    ["-mprefer-vector-width=512"], []):
                        compile_args.append("-mprefer-vector-width=512")
        omp_compile, omp_link = _openmp_flags(kind)
        use_openmp = os.environ.get("LSTM_FAST_NO_OPENMP", "0") != "1" and _try_compile(
            self.compiler, OPENMP_TEST, omp_compile, omp_link, run=True
        )
        if use_openmp:
            compile_args += omp_compile
            link_args += omp_link
        else:
            warnings.warn(
                "\n\n*** lstm_fast: the C compiler does not support OpenMP; building a SERIAL "
                "extension (all work runs on one thread). ***\n",
                stacklevel=1,
            )
        sanitize = os.environ.get("LSTM_FAST_SANITIZE", "")
        if sanitize and kind != "msvc":
            compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
            link_args += [f"-fsanitize={sanitize}"]
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + compile_args
            ext.extra_link_args = list(ext.extra_link_args) + link_args
            ext.define_macros = list(ext.define_macros) + [
                ("LSTM_FAST_OPENMP", "1" if use_openmp else "0"),
                ("LSTM_FAST_CFLAGS", '"' + " ".join(compile_args).replace('"', "") + '"'),
            ]
        super().build_extensions()


def extensions():
    debug = os.environ.get("LSTM_FAST_DEBUG", "0") == "1"
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": False,
        "initializedcheck": debug,
        "nonecheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    exts = [
        Extension(
            f"lstm_fast.{name}",
            [os.path.join("src", f"{name}.pyx")],
            include_dirs=[np.get_include(), "src"],
            # C headers the .pyx files include: a change to one rebuilds the modules
            depends=sorted(os.path.join("src", f) for f in os.listdir("src") if f.endswith(".h")),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        )
        for name in MODULES
        if os.path.exists(os.path.join("src", f"{name}.pyx"))
    ]
    return cythonize(exts, compiler_directives=directives, include_path=["src"],
                     nthreads=int(os.environ.get("LSTM_FAST_CYTHON_JOBS", "0")))


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
