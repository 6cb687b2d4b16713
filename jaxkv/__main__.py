import sys

from jaxkv._cli import main

sys.exit(main())
