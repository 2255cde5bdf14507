import sys

from megamod.train.cli import main

sys.exit(main())
