"""``python -m gateway`` and the ``agent-gateway`` command."""

import sys

from gateway import stopsignals


def run() -> None:
    stopsignals.hold()  # before the heavy imports: a stop meanwhile is taken once a handler is in place
    from gateway.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
