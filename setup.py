"""Only what pyproject.toml cannot say: the cffi extension ublkd.kernel._uring."""

from setuptools import setup

setup(cffi_modules=["ublkd/kernel/_uring_build.py:ffibuilder"])
