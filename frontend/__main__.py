"""``livemesh-frontend [--config FILE] [--set section.key=value ...]``"""

from mesh.io.launch import node_main

from .node import run


def main() -> None:
    node_main("frontend", run)


if __name__ == "__main__":
    main()
