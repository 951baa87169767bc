"""The C extension only; everything else is in pyproject.toml.

``streams._moderation_c`` is moderation's hot path (normalise and match in one pass);
``streams.moderation`` falls back to its Python reference when it is missing."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streams._moderation_c",
            ["streams/_native/moderation.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-missing-braces"],
            # No compiler (a slim image): install anyway; the Python reference runs.
            # tests/test_native_moderation.py fails if the extension is missing.
            optional=True,
        )
    ]
)
