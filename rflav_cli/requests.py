"""What each subcommand can be asked, checked without importing torch.

The command line builds one of these requests from its flags and checks it here first, so a
bad value is reported in a fraction of a second instead of after the heavy imports.
"""

from __future__ import annotations
