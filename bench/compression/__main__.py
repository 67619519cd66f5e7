"""`python -m bench.compression [end-to-end options]`: the codec bench, then the end-to-end one."""

import sys

from bench.compression import main

main(sys.argv[1:])
