import sys

from lipnorm.experiments.cli import main

sys.exit(main())
