import sys

from kvmstate.cli import main

sys.exit(main())
