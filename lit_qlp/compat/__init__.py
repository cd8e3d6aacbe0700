"""The private names and replaced attributes of third-party libraries that lit_qlp relies on, one module per library.

``deepspeed``, ``lightning``, ``transformers``, ``bitsandbytes`` and ``torch`` each have a module here, and nothing
else in lit_qlp touches their private names (``tests/compat/test_private_names.py`` scans for them). Every entry
first checks that its target still exists (and, for a hook lit_qlp overrides, that the library still calls it); when
an upgrade removed it, the entry raises a ``RuntimeError`` that names the library version, the missing name and the
module to update, instead of lit_qlp silently doing something else. ``tests/compat`` runs every entry against the
installed libraries. The libraries are imported inside the functions, so these modules import without any of them.
"""
