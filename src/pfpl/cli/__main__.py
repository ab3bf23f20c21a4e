import sys

from pfpl.cli import main

sys.exit(main())
