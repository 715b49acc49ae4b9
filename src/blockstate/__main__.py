import sys

from blockstate.cli.main import main

sys.exit(main())
