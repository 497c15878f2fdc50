"""Sub-commands of the ``skysense`` CLI, one module each (see :mod:`skysense.cli`)."""
