"""``python -m recorder.serve --config FILE``: see ``_entry.main``."""

from ._entry import main

main()
