"""Build script. The package itself is pure Python; compiled backends are added here."""

from setuptools import setup

setup()
