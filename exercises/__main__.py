import sys

from exercises.checker import main

sys.exit(main())
