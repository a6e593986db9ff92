import sys

from sd3serve.cli import main

sys.exit(main())
