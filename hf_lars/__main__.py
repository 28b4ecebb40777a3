import sys

from hf_lars.cli import main

sys.exit(main())
