import sys

from projectionist.cli import main

sys.exit(main())
