import sys

try:
    from gateway.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command was still loading: nothing runs yet to stop
    sys.exit(0)

sys.exit(main())
