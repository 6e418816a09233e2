import sys

from tests.cxenstored import main

sys.exit(main(sys.argv[1:]))
