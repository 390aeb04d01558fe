import sys

from stoichconv.bench.cli import main

sys.exit(main())
