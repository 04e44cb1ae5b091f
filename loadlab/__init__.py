"""loadlab: an observability and load-testing harness for Celery stacks."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loadlab")
except PackageNotFoundError:  # run from a checkout that was not installed
    __version__ = "0+unknown"
