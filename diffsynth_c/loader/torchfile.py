"""Moved to ``diffsynth_c.core.torchfile`` (the package's bottom layer); this path stays so code that
imports it here keeps working. It is the same module object (aliased in ``sys.modules``), so an
attribute set through this path reaches the code that reads it."""

import sys

from ..core import torchfile as _module

sys.modules[__name__] = _module
