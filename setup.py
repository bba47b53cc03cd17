"""The C extension of the hot loops (gateway/_native.c); everything else is in pyproject.toml.

Optional: where no C compiler is at hand the install goes on and the Python twins run
(gateway/native.py says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gateway._native", ["gateway/_native.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"])])
