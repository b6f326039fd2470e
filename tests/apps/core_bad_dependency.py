"""The module exists but imports something that does not."""

import tiamat_no_such_dependency  # noqa: F401

application = None
