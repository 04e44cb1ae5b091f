"""``loadlab run --locustfile FILE``: the user's own locustfile (written against :mod:`loadlab.loadtests.api`) runs
in place of the scenario's users, on loadlab's stack, ledger and report. The file is imported once per process and
checked before any stack starts: a missing file, one that fails to import or one without a User class to run is one
sentence, exit 2."""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

from locust import LoadTestShape, User

from loadlab.config.settings import Settings, SettingsError
from loadlab.loadtests.api import CeleryUser
from loadlab.loadtests.scenarios import Scenario
from loadlab.loadtests.users import build_user_classes

_modules: dict[Path, object] = {}  # resolved path -> the imported locustfile: its code runs once per process


class LocustfileError(SettingsError):
    """A locustfile that cannot be run: one sentence, exit 2."""


def _import(path: Path, given: str):
    module = _modules.get(path)
    if module is not None:
        return module
    # as Locust does: the locustfile's own directory is importable (its helper modules), after what is installed
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    # a name of its own: a locustfile named like a module already loaded (celery.py, locust.py) replaces nothing
    name = f"loadlab_locustfile_{len(_modules)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LocustfileError(f"--locustfile {given!r} is not a Python file; give a .py locustfile.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - anything the user's module raises is reported
        del sys.modules[name]
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise LocustfileError(f"--locustfile {given!r} cannot be imported ({detail}); fix the file, or check that "
                              f"what it imports is importable from {os.getcwd()}.") from None
    _modules[path] = module
    return module


def locustfile_user_classes(settings: Settings) -> list[type[User]]:
    """The concrete Locust ``User`` classes of ``settings.locustfile`` (defined or imported there, as Locust finds
    them). Raises LocustfileError with the sentence."""
    given = settings.locustfile  # a file: Settings checked it
    path = Path(given).resolve()
    if settings.app:
        from loadlab.stack.app import import_user_app

        import_user_app(settings.app)  # puts the project directory on sys.path, as for the workers
    module = _import(path, given)
    classes = [value for value in vars(module).values()
               if inspect.isclass(value) and issubclass(value, User) and not value.abstract]
    if not classes:
        raise LocustfileError(f"--locustfile {given!r} defines no User class to run; subclass "
                              "loadlab.loadtests.api.CeleryUser (without abstract = True) and give it @task methods.")
    for cls in classes:
        if not cls.tasks:
            raise LocustfileError(f"--locustfile {given!r}: {cls.__name__} has no tasks; give it @task methods, or "
                                  "abstract = True if it is only a base class.")
    return classes


def locustfile_shape(settings: Settings) -> LoadTestShape | None:
    """An instance of the load shape ``settings.locustfile`` defines (a concrete ``LoadTestShape`` subclass, as Locust
    finds it), or None. Like the locust command, the shape then decides the users and when the load ends. Raises
    LocustfileError when the file defines more than one (the locust command refuses those too)."""
    if not settings.locustfile:
        return None
    module = _import(Path(settings.locustfile).resolve(), settings.locustfile)
    shapes = [value for value in vars(module).values()
              if inspect.isclass(value) and issubclass(value, LoadTestShape) and not getattr(value, "abstract", True)]
    if len(shapes) > 1:
        names = ", ".join(cls.__name__ for cls in shapes)
        raise LocustfileError(f"--locustfile {settings.locustfile!r} defines {len(shapes)} load shapes ({names}); "
                              "keep one, or mark the others abstract = True.")
    return shapes[0]() if shapes else None


def run_user_classes(settings: Settings, scenario: Scenario) -> list[type[User]]:
    """The user classes a run runs: the ``--locustfile``'s, each ``CeleryUser`` given the run's settings (as a
    subclass of its own, so the file's classes stay as written), or the scenario's built-in users."""
    if not settings.locustfile:
        return build_user_classes(settings, scenario)
    return [type(cls.__name__, (cls,), {"settings": settings, "__module__": cls.__module__})
            if issubclass(cls, CeleryUser) else cls for cls in locustfile_user_classes(settings)]
