"""A script's command line run in this process: main() with sys.argv set, its output captured and its exit
code returned like subprocess.run's. A fresh interpreter per call costs seconds (importing torch), which
the suite cannot spend on every command-line test; kill-and-resume tests still start real processes."""
import contextlib
import importlib
import io
import os
import subprocess
import sys


def run_cli(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`script` relative to the repository root ("evaluate.py", "bench/gpu_check.py")."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(script))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    argv, here, code = sys.argv, os.getcwd(), 0
    sys.argv = [script, *map(str, args)]
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main()
            except SystemExit as e:  # sys.exit("error: ...") prints its message to stderr and exits with 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else e.code or 0
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
