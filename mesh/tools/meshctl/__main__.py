"""``python -m mesh.tools.meshctl``."""
import sys

from mesh.tools.meshctl import main

if __name__ == "__main__":  # guard: multiprocessing "spawn" children import this file
    sys.exit(main())
