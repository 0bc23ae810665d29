import sys

from mis_score.cli import main

sys.exit(main())
