"""Peak extra memory of a piece of code on the CPU, measured in a fresh subprocess.

The CPU has no ``max_memory_allocated``; the kernel does keep the process's
peak resident set (``VmHWM``), and writing ``5`` to ``/proc/self/clear_refs``
resets it. So: run ``setup`` (inputs), collect garbage, reset the peak, run
``code``, and report ``VmHWM - VmRSS_before``. Large tensors are ``mmap``-ed and
returned to the system when freed, so the figure is the true high-water mark of
what ``code`` allocated and touched.
"""
import json
import os
import subprocess
import sys
import textwrap

_TEMPLATE = """
import gc, json, re
import torch
torch.set_num_threads(1)

def _status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

{setup}
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
_before = _status("VmRSS")
{code}
print(json.dumps({{"peak_extra": _status("VmHWM") - _before}}))
"""


def peak_extra_bytes(setup: str, code: str, env: dict | None = None) -> int:
    """Bytes of peak resident memory that ``code`` adds on top of what ``setup`` left."""
    script = _TEMPLATE.format(setup=textwrap.dedent(setup), code=textwrap.dedent(code))
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra"]
