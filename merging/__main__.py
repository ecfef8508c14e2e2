import sys

from .cli.main import main
from .engine import keep_freed_memory

# `python -m merging` is a one-shot process: it may keep freed tensor memory for reuse (process-wide, so it is
# set here and not in main(), which tests and the app call in long-lived processes with a memory budget)
keep_freed_memory()
sys.exit(main())
