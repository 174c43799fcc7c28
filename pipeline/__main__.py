import sys

from advlens.cli import main

sys.exit(main())
