"""Build kvzip's one C extension, the rANS entropy coder (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("kvzip.codecs._rans", ["kvzip/codecs/_rans.c"], extra_compile_args=["-O3", "-std=c99"]),
    ],
)
