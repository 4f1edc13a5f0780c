"""Packaging for minisup: one module, ``minisup.py``, plus pyzmq."""

import pathlib
import re

from setuptools import setup

HERE = pathlib.Path(__file__).parent
# Read the version as text: importing the module would need pyzmq first.
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "minisup.py").read_text(encoding="utf-8"), re.MULTILINE).group(1)

setup(
    name="minisup",
    version=VERSION,
    description="A process supervisor in one file that speaks Circus's protocol",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    py_modules=["minisup"],
    python_requires=">=3.11",
    install_requires=["pyzmq"],
    extras_require={
        "test": ["pytest", "hypothesis", "circus==0.19.0", "ruff", "docutils", "prometheus_client",
                 "pyte"],
    },
    entry_points={"console_scripts": ["minisup = minisup:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Monitoring",
    ],
)
