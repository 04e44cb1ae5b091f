"""Task-mix files (``--tasks FILE``): which of the app's own tasks the Locust users publish, how often, with which
arguments and publish options. Parsed and checked against the app's registered tasks and their signatures before
any stack starts; a bad file is one sentence naming the file, the task or line, and what is accepted.

    tasks:
      - name: shopapp.tasks.add          # the registered task name
        weight: 3
        args: [2, 3]
      - name: shopapp.tasks.charge
        weight: 2
        kwargs: {order_id: {$range: [1, 1000]}, amount: 9.5, note: {$bytes: 256}}
        queue: payments
      - name: shopapp.tasks.ship
        hook: shopapp.load:ship_arguments  # returns (args, kwargs) for each publish

A value anywhere in ``args`` or ``kwargs`` may be a generator: ``{$one_of: [a, b]}`` (one of the list),
``{$range: [low, high]}`` (an integer from low to high, both included) or ``{$bytes: N}`` (a text of N bytes).
"""
from __future__ import annotations

import difflib
import inspect
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadlab.config.settings import Settings, SettingsError
from loadlab.reports.gates import StrictLoader, construct_strict_mapping, read_yaml

TASK_KEYS = ("name", "weight", "args", "kwargs", "queue", "countdown", "expires", "priority", "hook")
GENERATORS = ("$one_of", "$range", "$bytes")
MAX_GENERATED_BYTES = 8 * 1024 * 1024
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_HOOK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TaskMixError(SettingsError):
    """A bad task-mix file: one sentence, exit 2."""


# --- value generators ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneOf:
    values: tuple

    def draw(self):
        return draw(random.choice(self.values))


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def draw(self):
        return random.randint(self.low, self.high)


@dataclass(frozen=True)
class Text:
    size: int

    def draw(self):
        return random.randbytes((self.size + 1) // 2).hex()[:self.size]


def draw(spec):
    """A concrete value from a spec: generators drawn, lists and mappings walked."""
    if isinstance(spec, (OneOf, IntRange, Text)):
        return spec.draw()
    if isinstance(spec, list):
        return [draw(v) for v in spec]
    if isinstance(spec, dict):
        return {k: draw(v) for k, v in spec.items()}
    return spec


def _constant(spec) -> bool:
    if isinstance(spec, (OneOf, IntRange, Text)):
        return False
    if isinstance(spec, list):
        return all(_constant(v) for v in spec)
    if isinstance(spec, dict):
        return all(_constant(v) for v in spec.values())
    return True


# --- the mix ------------------------------------------------------------------------------------------------------
@dataclass
class MixTask:
    name: str
    weight: float
    line: int
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # apply_async options: queue, countdown, expires, priority
    hook: Callable[[], tuple] | None = None
    hook_ref: str | None = None

    def __post_init__(self):
        self._fixed = _constant(self.args) and _constant(self.kwargs)

    def arguments(self) -> tuple[list, dict]:
        """The (args, kwargs) of one publish."""
        if self.hook is not None:
            args, kwargs = self.hook()
            return list(args), dict(kwargs)
        if self._fixed:
            return self.args, self.kwargs
        return draw(self.args), draw(self.kwargs)

    def describe(self) -> dict:
        """What the report shows of this entry."""
        return {"name": self.name, "weight": self.weight, "line": self.line, **self.options,
                **({"hook": self.hook_ref} if self.hook_ref else {})}


@dataclass
class TaskMix:
    source: str
    tasks: list[MixTask]

    @property
    def queues(self) -> list[str]:
        return list(dict.fromkeys(t.options["queue"] for t in self.tasks if "queue" in t.options))


# --- parsing ------------------------------------------------------------------------------------------------------
class _Loader(StrictLoader):
    """Keeps the line of each mapping, so a sentence can name the entry's line."""


class _Located(dict):
    line = 0


def _construct_located(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = _Located(construct_strict_mapping(loader, node, deep=deep))
    mapping.line = node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located)


def parse_file(path: str | Path) -> TaskMix:
    """The file's structure checked (names not yet against an app); raises TaskMixError."""
    source = str(path)
    data = read_yaml(Path(path), f"--tasks {source!r}", TaskMixError,
                     "give a task-mix YAML file: a mapping with a 'tasks:' list (see `loadlab tasks`)", _Loader)
    if not isinstance(data, dict) or "tasks" not in data:
        raise TaskMixError(f"--tasks {source!r} has no top-level 'tasks:' list; write 'tasks:' followed by entries "
                           "with at least a name (see `loadlab tasks`).")
    extra = sorted(str(k) for k in data if k != "tasks")
    if extra:
        raise TaskMixError(f"--tasks {source!r} has the unknown top-level key {extra[0]!r}; only 'tasks' is accepted.")
    entries = data["tasks"]
    if not isinstance(entries, list) or not entries:
        raise TaskMixError(f"--tasks {source!r}: 'tasks' must be a non-empty list of entries, each with at least "
                           "a name.")
    return TaskMix(source, [_parse_task(source, index, raw) for index, raw in enumerate(entries, 1)])


def _parse_task(source: str, index: int, raw) -> MixTask:
    if not isinstance(raw, dict):
        raise TaskMixError(f"--tasks {source!r}: entry {index} is not a mapping; write each entry as "
                           "'- name: your.task' with optional weight, args, kwargs, queue, countdown, expires, "
                           "priority, hook.")
    line = getattr(raw, "line", 0)
    name = raw.get("name")
    where = f"--tasks {source!r} line {line}"
    if not isinstance(name, str) or not name.strip():
        raise TaskMixError(f"{where}: entry {index} has no task name; add 'name:' with a registered task name "
                           "(`loadlab tasks --app …` lists them).")
    where = f"{where} (task {name!r})"
    for key in raw:
        if key not in TASK_KEYS:
            close = difflib.get_close_matches(str(key), TASK_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TaskMixError(f"{where}: {key!r} is not a task-mix key{hint}; use {', '.join(TASK_KEYS)}.")
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight != weight:
        raise TaskMixError(f"{where}: weight {weight!r} is not accepted; use a number greater than 0.")
    args = raw.get("args", [])
    if not isinstance(args, list):
        raise TaskMixError(f"{where}: args {args!r} is not a list; write positional arguments as a list, e.g. "
                           "args: [2, 3].")
    kwargs = raw.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TaskMixError(f"{where}: kwargs is not a mapping of argument names to values; write e.g. "
                           "kwargs: {order_id: 17}.")
    options = _options(raw, where)
    hook = hook_ref = None
    if "hook" in raw:
        if "args" in raw or "kwargs" in raw:
            raise TaskMixError(f"{where}: give either a hook or args/kwargs, not both; the hook returns "
                               "(args, kwargs) itself.")
        hook_ref = raw["hook"]
        hook = _import_hook(hook_ref, where)
    return MixTask(name=name, weight=weight, line=line, args=_spec(args, where, "args"),
                   kwargs=_spec(dict(kwargs), where, "kwargs"), options=options, hook=hook, hook_ref=hook_ref)


def _options(raw: dict, where: str) -> dict:
    options = {}
    if "queue" in raw:
        queue = raw["queue"]
        if not isinstance(queue, str) or not _QUEUE_RE.match(queue):
            raise TaskMixError(f"{where}: queue {queue!r} is not accepted; use a queue name of 1 to 200 letters, "
                               "digits, '_', '.', ':' or '-'.")
        options["queue"] = queue
    for key in ("countdown", "expires"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value \
                    or (key == "expires" and value == 0):
                low = "greater than 0" if key == "expires" else "of 0 or more"
                raise TaskMixError(f"{where}: {key} {value!r} is not accepted; use a number of seconds {low}.")
            options[key] = value
    if "priority" in raw:
        value = raw["priority"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise TaskMixError(f"{where}: priority {value!r} is not accepted; use a whole number from 0 to 255 "
                               "(Redis honours 0 to 9).")
        options["priority"] = value
    return options


def _spec(value, where: str, path: str):
    """YAML value -> spec: generator mappings become generators; raises TaskMixError."""
    if isinstance(value, list):
        return [_spec(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        generator_keys = [k for k in value if isinstance(k, str) and k.startswith("$")]
        if not generator_keys:
            return {k: _spec(v, where, f"{path}.{k}") for k, v in value.items()}
        key = generator_keys[0]
        if key not in GENERATORS or len(value) != 1:
            raise TaskMixError(f"{where}: {path} {dict(value)!r} is not a value generator; use exactly one of "
                               "{$one_of: [a, b]}, {$range: [low, high]} or {$bytes: N}.")
        argument = value[key]
        if key == "$one_of":
            if not isinstance(argument, list) or not argument:
                raise TaskMixError(f"{where}: {path} $one_of {argument!r} is not accepted; use a non-empty list of "
                                   "values, e.g. {$one_of: [eu, us]}.")
            return OneOf(tuple(_spec(v, where, path) for v in argument))
        if key == "$range":
            if (not isinstance(argument, list) or len(argument) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in argument)
                    or argument[0] > argument[1]):
                raise TaskMixError(f"{where}: {path} $range {argument!r} is not accepted; use two whole numbers "
                                   "[low, high] with low <= high, e.g. {$range: [1, 100]}.")
            return IntRange(*argument)
        if isinstance(argument, bool) or not isinstance(argument, int) or not 0 <= argument <= MAX_GENERATED_BYTES:
            raise TaskMixError(f"{where}: {path} $bytes {argument!r} is not accepted; use a whole number of bytes "
                               f"from 0 to {MAX_GENERATED_BYTES}.")
        return Text(argument)
    return value


def _import_hook(ref, where: str) -> Callable:
    from celery.utils.imports import symbol_by_name

    if not isinstance(ref, str) or not _HOOK_RE.match(ref):
        raise TaskMixError(f"{where}: hook {ref!r} is not module:function; write e.g. hook: myproject.load:order_args.")
    try:
        hook = symbol_by_name(ref)
    except Exception as exc:  # noqa: BLE001 - the user's module: any import error is reported the same way
        raise TaskMixError(f"{where}: hook {ref!r} cannot be imported ({type(exc).__name__}: {exc}); give "
                           "module:function importable from the project directory.") from None
    if not callable(hook):
        raise TaskMixError(f"{where}: hook {ref!r} is a {type(hook).__name__}, not a function; give a function that "
                           "takes no arguments and returns (args, kwargs).")
    return hook


# --- against the app ----------------------------------------------------------------------------------------------
def signature_of(task) -> inspect.Signature | None:
    """The signature callers bind to: of ``task.run`` (a bound task's ``self`` left out), through ``__wrapped__``."""
    try:
        return inspect.signature(task.run)
    except (TypeError, ValueError):
        return None


def check_against(mix: TaskMix, tasks: dict, serializer: str) -> None:
    """Every name is a registered task and one sample of its arguments binds to its signature and encodes with
    ``serializer``; raises TaskMixError."""
    from kombu.serialization import dumps

    for entry in mix.tasks:
        where = f"--tasks {mix.source!r} line {entry.line} (task {entry.name!r})"
        task = tasks.get(entry.name)
        if task is None:
            close = difflib.get_close_matches(entry.name, list(tasks), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TaskMixError(f"{where}: no such task is registered in the app; {hint}use one of "
                               f"{', '.join(tasks) or 'none (the app registers no task)'}.")
        try:
            args, kwargs = entry.arguments()
        except TaskMixError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's hook
            if entry.hook is not None:
                raise TaskMixError(f"{where}: hook {entry.hook_ref!r} did not return (args, kwargs) "
                                   f"({type(exc).__name__}: {exc}); return a list and a mapping, e.g. "
                                   "return [2, 3], {}.") from None
            raise
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TaskMixError(f"{where}: hook {entry.hook_ref!r} returned kwargs that are not a mapping of names; "
                               "return (args, kwargs) with kwargs a dict.")
        signature = signature_of(task)
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TaskMixError(f"{where}: the arguments do not bind to {entry.name}{signature} ({exc}); give "
                                   "args and kwargs that the task accepts.") from None
        try:
            dumps({"args": args, "kwargs": kwargs}, serializer=serializer)
        except Exception as exc:  # noqa: BLE001 - kombu raises EncodeError or the serializer's own
            raise TaskMixError(f"{where}: the arguments cannot be encoded with {serializer} ({exc}); give values "
                               f"{serializer} can encode, or choose another --serializer.") from None


def load_task_mix(settings: Settings) -> TaskMix | None:
    """The run's task mix (``--tasks``), parsed and checked against the app the workers run; None without
    ``--tasks``. Raises SettingsError (TaskMixError) with the sentence."""
    if not settings.tasks:
        return None
    from loadlab.stack.app import import_user_app, registered_tasks

    if settings.app:
        import_user_app(settings.app)  # the working directory on sys.path: hooks live in the project too
    mix = parse_file(settings.tasks)
    check_against(mix, registered_tasks(settings), settings.serializer)
    return mix


def with_run_queues(settings: Settings, mix: TaskMix | None) -> Settings:
    """Without --queues, the workers consume the app's queues (its default, declared and routed ones; --queue for
    the reference app) plus every queue the task mix publishes to; without --queue, the app's default queue is the
    run's (the one its depth is sampled on)."""
    from loadlab.stack.app import app_queues

    queues = app_queues(settings) if settings.app else [settings.queue]
    update = {} if "queue" in settings.explicit else {"queue": queues[0]}
    if not settings.queues:
        names = list(dict.fromkeys([*queues, *(mix.queues if mix else ())]))
        if names != [settings.queue]:
            update["queues"] = ",".join(names)
    return settings.model_copy(update=update) if update else settings


# --- a first file for an app --------------------------------------------------------------------------------------
_PLACEHOLDERS = {int: 1, float: 1.0, str: "text", bool: False, list: [], dict: {}}


def starting_file(tasks: dict) -> str:
    """A task-mix file with every task once, each required argument given a placeholder of its annotated type."""
    lines = ["# loadlab task mix: edit the weights and values, drop the tasks you do not want to load.",
             "# A value may be {$one_of: [a, b]}, {$range: [low, high]} or {$bytes: N}; an entry may give",
             "# queue, countdown, expires, priority, or hook: module:function returning (args, kwargs).",
             "tasks:"]
    for name, task in tasks.items():
        lines.append(f"  - name: {name}")
        lines.append("    weight: 1")
        signature = signature_of(task)
        kwargs = {}
        for parameter in (signature.parameters.values() if signature else ()):
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.default is parameter.empty:
                kwargs[parameter.name] = _PLACEHOLDERS.get(parameter.annotation, None) \
                    if not isinstance(parameter.annotation, str) else \
                    _PLACEHOLDERS.get({"int": int, "float": float, "str": str, "bool": bool}.get(
                        parameter.annotation), None)
        if kwargs:
            text = yaml.safe_dump(kwargs, default_flow_style=True, width=10_000, sort_keys=False).strip()
            lines.append(f"    kwargs: {text}")
    return "\n".join(lines) + "\n"
