"""Helpers shared by tests that run real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from typing import Dict, Optional


#: Children start outside the checkout, so that `python -c` (which puts the
#: working directory first on sys.path) imports the installed package.
CHILD_CWD = tempfile.gettempdir()


def child_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    full = dict(os.environ)
    full.pop("HEADRACE_FAULT", None)
    full.update(env or {})
    return full


def run_child(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a real process) and return its result."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env(env), cwd=CHILD_CWD,
                          capture_output=True, text=True, timeout=timeout)


def spawn(code: str, *args: object, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start `code` with `args` in a fresh interpreter; stdout is piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env),
                            cwd=CHILD_CWD)


def model_settings(ci_examples: int, examples: int, steps: int) -> object:
    """Hypothesis settings for a stateful model test: CI can afford a deeper
    search than an edit-test loop; HEADRACE_MODEL_EXAMPLES overrides both."""
    from hypothesis import HealthCheck, settings
    default = ci_examples if os.environ.get("CI") else examples
    return settings(max_examples=int(os.environ.get("HEADRACE_MODEL_EXAMPLES", str(default))),
                    stateful_step_count=steps, deadline=None, suppress_health_check=[HealthCheck.too_slow])
