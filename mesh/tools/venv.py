"""Start a launcher again under the repository's ``.venv`` when the Python running it lacks
livemesh's packages, so ``bin/mesh-up`` and ``bin/meshctl`` work on a fresh clone as
``bin/test`` does.  Only the standard library is imported here: it runs before the packages
are known to be there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: what the launchers import; any one missing means this Python is not set up for livemesh
NEEDED = ("tornado", "zmq", "msgpack", "click", "consul")


def missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def run_in_venv() -> None:
    """Return at once when this Python has the packages; otherwise have ``bin/venv`` create
    or update ``.venv`` and replace this process with the same command under its Python."""
    lacking = missing()
    if not lacking:
        return
    if os.environ.get("LIVEMESH_REEXEC"):  # already restarted once: do not loop
        sys.exit(f"{sys.argv[0]}: {sys.executable} lacks {', '.join(lacking)} even after bin/venv")
    print(f"{os.path.basename(sys.argv[0])}: {sys.executable} lacks {', '.join(lacking)}; "
          "using the repository's .venv (bin/venv)", file=sys.stderr)
    python = subprocess.run([os.path.join(REPO, "bin", "venv")], check=True,
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    os.environ["LIVEMESH_REEXEC"] = "1"
    os.execv(python, [python, os.path.abspath(sys.argv[0]), *sys.argv[1:]])
