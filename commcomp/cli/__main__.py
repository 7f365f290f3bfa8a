import sys

from commcomp.cli import main

sys.exit(main())
