import sys

from emuhba.cli import main

sys.exit(main())
