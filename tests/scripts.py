"""Run an experiments/ script in this process, as ``python script.py args`` would run it.

A fresh interpreter costs 2 to 4 s on 2 cores (torch, pyro, and torch._dynamo for the
optimiser) before a script does anything; the scripts' smoke tests start dozens of them.
:func:`run_script` takes the command a test would give ``subprocess.run`` and runs the
script's ``__main__`` here instead, with its arguments, working folder and environment,
its output captured, and its exit status returned, and then puts back what a script may
change for the rest of the process (the folder, the environment, ``sys.path``, torch's
threads, random state and default dtype, Pyro's parameters, the softplus form, warning
filters, open figures). Scripts still start their own subprocesses (training rows,
torchrun) as they would.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pyro
import torch


def run_script(command, cwd=None, env=None, check=False, **_ignored) -> subprocess.CompletedProcess:
    """``subprocess.run(command, cwd=cwd, env=env, check=check, capture_output=True,
    text=True)`` for ``command = [sys.executable, script, *args]``, run in this process (a
    ``timeout`` is not enforced)."""
    if Path(command[0]) != Path(sys.executable):
        raise ValueError(f"run_script runs Python scripts: {command!r} does not start with sys.executable")
    script, args = str(command[1]), [str(a) for a in command[2:]]
    from pyro_vae import networks

    saved = (sys.argv[:], list(sys.path), os.getcwd(), dict(os.environ), torch.get_num_threads(),
             torch.get_rng_state(), torch.get_default_dtype(), list(networks._cpu_form))
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).resolve().parent))  # as python puts a script's folder first
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        pyro.clear_param_store()
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:  # sys.exit("message"): python prints it and exits with 1
                    print(stop.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        argv, path, folder, environ, threads, rng, dtype, form = saved
        sys.argv[:], sys.path[:] = argv, path
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.set_default_dtype(dtype)
        networks._cpu_form[:] = form
        pyro.clear_param_store()
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    done = subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())
    if check:
        done.check_returncode()
    return done
