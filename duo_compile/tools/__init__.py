"""Tools around the compiler: the end-to-end benchmark (``bench``) and the demo (``demo``), both reached through
the ``duo-compile`` command line."""
