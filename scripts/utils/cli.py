"""The command lines of the bundle: real ``--help`` and unknown options refused before any work is done.

``python -m scripts.<tool>`` commands go through :func:`main`. fire alone turns a function's keyword arguments
into ``--options`` but runs the function with a misspelled option left over (failing only afterwards), and its help
for a dict of commands is one synopsis line. :func:`main` first checks the command line against the function's
signature (an unknown option is an error naming it and the closest valid ones), prints the module's and the
function's docstrings for ``--help``, then hands the command line to fire, which parses the values as it always did.
A user's error (``ValueError``, ``FileNotFoundError``, ...) ends in one line ``error: ...`` and exit status 2.

``python -m monai.bundle run`` passes every ``--key value`` into the config as an override, adding keys the config
does not have. :func:`check_bundle_command_line`, the first item of each config's ``initialize``, refuses a key
that is in none of the merged config files (``train#trainer#max_epochs`` paths included) before the datalist is
prepared or anything is written, and prints the config's options for ``--help``.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["USER_ERRORS", "UsageError", "check_arguments", "check_bundle_command_line", "help_text", "main"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
EXIT_USAGE = 2  # as argparse: a command line or input the command refuses
HELP_FLAGS = ("-h", "--help")
# keys a config item may take besides its target's arguments (MONAI's ConfigComponent)
COMPONENT_KEYS = ("_target_", "_disabled_", "_desc_", "_requires_", "_mode_")
# config ids that hold the workflow's expressions, not options
WORKFLOW_IDS = ("imports", "initialize", "run", "finalize")


class UsageError(ValueError):
    """A command line the command refuses: unknown option, surplus value, missing required option."""


def _is_flag(argument: str) -> bool:
    """fire's rule: ``--name``/``-n`` are flags, ``-1`` is a value."""
    return argument.startswith("--") or re.match("^-[a-zA-Z]", argument) is not None


def _flags(args: Sequence[str]):
    """Yield (key, value or None, token) per flag and (None, token, token) per positional value, as fire reads them.

    ``--key value`` and ``--key=value`` carry a value; a flag followed by another flag or by nothing is a boolean.
    Everything after a bare ``--`` is fire's own (``-- --trace``) and is skipped.
    """
    args = list(args)
    if "--" in args:
        args = args[: args.index("--")]
    skip = False
    for i, argument in enumerate(args):
        if skip:
            skip = False
            continue
        if not _is_flag(argument):
            yield None, argument, argument
            continue
        key, _, value = argument.lstrip("-").partition("=")
        if "=" in argument:
            yield key.replace("-", "_"), value, argument
        elif i + 1 == len(args) or _is_flag(args[i + 1]):
            yield key.replace("-", "_"), None, argument
        else:
            skip = True
            yield key.replace("-", "_"), args[i + 1], argument


def _closest(name: str, valid: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)


def _unknown(name: str, valid: Sequence[str], what: str) -> str:
    close = _closest(name, valid)
    hint = (
        f"did you mean {' or '.join('--' + c for c in close)}?"
        if close
        else f"valid: {', '.join('--' + v for v in valid)}"
    )
    return f"unknown option --{name} for {what}: {hint}"


def _parameters(fn: Callable) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def check_arguments(fn: Callable, args: Sequence[str], what: str) -> None:
    """Raise :class:`UsageError` for an option ``fn`` does not take, a surplus value or a missing required option.

    Mirrors fire's reading of ``args``: ``--name value``, ``--name=value``, ``--name``/``--noname`` for booleans and
    positional values filling the remaining parameters in order.
    """
    params = _parameters(fn)
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params}
    given, positional = set(), []
    for key, value, _ in _flags(args):
        if key is None:
            positional.append(value)
        elif key in names or (value is None and key.startswith("no") and key[2:] in names):
            name = key if key in names else key[2:]
            if value is None and not isinstance(defaults[name], bool):
                raise UsageError(f"option --{name} of {what} needs a value: --{name} VALUE")
            given.add(name)
        else:
            raise UsageError(_unknown(key, names, what))
    free = [n for n in names if n not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected value {positional[len(free)]!r} for {what}: give options as --name value")
    given.update(free[: len(positional)])
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in given]
    if missing:
        raise UsageError(f"{what} needs {' '.join('--' + m + ' ' + m.upper() for m in missing)}")


def _doc(obj: Any) -> str:
    return inspect.getdoc(obj) or ""


def _summary(fn: Callable, width: int = 100) -> str:
    """The first paragraph of ``fn``'s docstring on one line, cut to ``width`` characters."""
    text = " ".join(_doc(fn).split("\n\n")[0].split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _default(p: inspect.Parameter) -> str:
    if p.default is inspect.Parameter.empty:
        return p.name.upper() + "  (required)"
    value = p.default
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def help_text(commands: Mapping[str | None, Callable], prog: str, doc: str = "", command: str | None = None) -> str:
    """The help of ``prog``: the module's docstring and its commands, or one command's docstring and options."""
    if command is None and None not in commands:
        lines = [f"usage: {prog} COMMAND [--option value ...]    ({prog} COMMAND --help for its options)", ""]
        if doc:
            lines += [doc.strip(), ""]
        lines.append("commands:")
        width = max(len(name) for name in commands)
        lines += [f"  {name:<{width}}  {_summary(fn)}" for name, fn in commands.items()]
        return "\n".join(lines) + "\n"
    fn = commands[command]
    params = _parameters(fn)
    usage = f"{prog}{'' if command is None else ' ' + command}"
    required = " ".join(f"--{p.name} {p.name.upper()}" for p in params if p.default is inspect.Parameter.empty)
    lines = [f"usage: {usage} {required + ' ' if required else ''}[--option value ...]", ""]
    if doc and len(commands) == 1:  # the module's docstring is the tool's manual
        lines += [doc.strip(), ""]
    if _doc(fn):
        lines += [_doc(fn), ""]
    if params:
        width = max(len(p.name) for p in params) + 2
        lines.append('options (values are Python literals, e.g. --name "[1, 2]"; booleans also --name / --noname):')
        lines += [f"  --{p.name:<{width}}{_default(p)}" for p in params]
    return "\n".join(lines) + "\n"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def main(
    commands: Callable | Mapping[str, Callable],
    doc: str = "",
    prog: str | None = None,
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
    **fire_kwargs: Any,
) -> Any:
    """Run one command (a function, or a dict of named functions) from ``argv`` (default ``sys.argv[1:]``).

    ``--help``/``-h`` prints :func:`help_text` and exits 0; a command line :func:`check_arguments` refuses, or an
    exception of ``errors`` raised by the command, prints one ``error:`` line and exits 2. Otherwise fire parses the
    values and calls the command (``fire_kwargs``, e.g. ``serialize``, go to ``fire.Fire``); returns its result.
    """
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python -m {Path(sys.argv[0]).stem}"
    table: dict[str | None, Callable] = dict(commands) if isinstance(commands, Mapping) else {None: commands}
    name = None
    if None not in table:
        if not args or args[0] in HELP_FLAGS or args[0] == "help":
            print(help_text(table, prog, doc), end="", file=sys.stdout if args else sys.stderr)
            raise SystemExit(0 if args else EXIT_USAGE)  # no command at all is a usage error
        name = args.pop(0)
        if name not in table:
            close = _closest(name, [str(n) for n in table])
            _fail(
                f"unknown command {name!r} for {prog}: "
                + (f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(map(str, table))}")
            )
    fn = table[name]
    before_separator = args[: args.index("--")] if "--" in args else args
    if any(a in HELP_FLAGS for a in before_separator):
        print(help_text(table, prog, doc, name), end="")
        raise SystemExit(0)
    what = prog if name is None else f"{prog} {name}"
    try:
        check_arguments(fn, args, what)
    except UsageError as error:
        _fail(f"{error} ({what} --help lists the options)")
    try:
        return fire.Fire(fn, command=args, name=what, **fire_kwargs)
    except errors as error:
        _fail(str(error))


# ---- python -m monai.bundle run ---------------------------------------------------------------------------------


def _is_bundle_run(argv: Sequence[str]) -> bool:
    return len(argv) > 1 and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py") and argv[1] == "run"


def _run_arguments() -> set[str]:
    """The names ``monai.bundle run`` keeps for itself (run, create_workflow, ConfigWorkflow), not config overrides."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    return {p.name for f in (run, create_workflow, ConfigWorkflow.__init__) for p in _parameters(f)} - {"self"}


def _component_arguments(component: dict) -> set[str] | None:
    """The keys a ``_target_`` item accepts (None: any, as its target takes ``**kwargs`` or cannot be inspected)."""
    from pydoc import locate

    from monai.bundle import ConfigComponent

    try:
        name = ConfigComponent(config=component).resolve_module_name()
        signature = inspect.signature(locate(name) if isinstance(name, str) else name)
    except Exception:  # noqa: BLE001 (an unresolvable target fails at instantiation with MONAI's own message)
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {p.name for p in signature.parameters.values()} | set(COMPONENT_KEYS)


def _lookup(config: Any, parts: Sequence[str]) -> tuple[int | None, Any, list[str]]:
    """Walk ``parts`` into ``config``: (the depth that is missing or None, the node there, the ids valid there)."""
    node = config
    for depth, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            valid = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
            prefix = "#".join(parts[:depth])
            return depth, node, [f"{prefix}#{v}" if prefix else str(v) for v in valid]
    return None, node, []


def unknown_bundle_options(config: dict, keys: Sequence[str], what: str = "this config") -> list[str]:
    """One message per override key that names no item of ``config`` (nor an argument of the item's ``_target_``).

    ``a#b#c`` (or ``a::b::c``) must exist in ``config``, except that the last part may be a new argument of a
    ``_target_`` item whose target takes it (MONAI passes it to the constructor).
    """
    messages = []
    for key in keys:
        parts = key.replace("::", "#").split("#")
        depth, node, valid = _lookup(config, parts)
        if depth is None:
            continue
        if depth == len(parts) - 1 and isinstance(node, dict) and "_target_" in node:
            accepted = _component_arguments(node)
            if accepted is None or parts[-1] in accepted:
                continue
            prefix = "#".join(parts[:-1])
            valid = [f"{prefix}#{a}" for a in sorted(accepted - set(COMPONENT_KEYS))]
        if depth == 0:
            valid = [k for k in valid if k not in WORKFLOW_IDS]
        messages.append(_unknown("#".join(parts), valid, what))
    return messages


def _options_text(config: dict, files: Sequence[str]) -> str:
    lines = [
        f"usage: python -m monai.bundle run --config_file {files!r} [--KEY VALUE ...]",
        "",
        "Every key below, and any nested one (--network_def#drop_rate 0.1), can be set on the command line;",
        "values are Python literals or config expressions.",
        "",
        "options and their defaults:",
    ]
    for key, value in config.items():
        if key in WORKFLOW_IDS or key.startswith("_") or isinstance(value, dict):
            continue
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            continue
        text = repr(value)
        lines.append(f"  --{key:<28} {text if len(text) <= 80 else text[:77] + '...'}")
    lines += [
        "",
        "monai.bundle's own: --meta_file, --logging_file, --args_file, --tracking mlflow "
        "(with --tracking_uri, --experiment_name, --run_name)",
    ]
    return "\n".join(lines) + "\n"


def check_bundle_command_line(argv: Sequence[str] | None = None) -> bool:
    """Refuse a ``monai.bundle run`` override that names no config item, before any work; ``--help`` lists options.

    Reads ``argv`` (default ``sys.argv``) only when it is ``python -m monai.bundle run ...``; a workflow built in
    code (MONAI Label, ``scripts.clinical.pacs``) passes its overrides itself and is not checked. The config is the
    merge of ``--config_file`` (and ``--args_file``) as MONAI merges it, plus the tracking settings' keys with
    ``--tracking``. Prints one ``error:`` line and exits 2 on an unknown key; returns True otherwise.
    """
    argv = list(sys.argv if argv is None else argv)
    if not _is_bundle_run(argv):
        return True
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    overrides = {key: value for key, value, _ in _flags(argv[2:]) if key is not None}
    reserved = _run_arguments()
    args = dict(ConfigParser.load_config_file(overrides["args_file"])) if "args_file" in overrides else {}
    args.update({k: DefaultParseValue(v) if v is not None else True for k, v in overrides.items()})
    files = args.get("config_file")
    if files is None:
        return True  # monai.bundle itself refuses a run without a config
    config = ConfigParser.load_config_files(files)
    if "help" in args or "h" in args:
        print(_options_text(config, files), end="", flush=True)
        raise SystemExit(0)
    tracking = args.get("tracking")
    if tracking:
        settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else tracking
        settings = settings if isinstance(settings, dict) else ConfigParser.load_config_files(tracking)
        config = {**settings.get("configs", {}), **config}  # MONAI adds these keys unless the config has them
    keys = [k for k in args if k not in reserved and not k.startswith("_meta_")]
    messages = unknown_bundle_options(config, keys, " + ".join(map(str, files)) if isinstance(files, list) else files)
    if messages:
        _fail("\nerror: ".join(messages) + "\n(nothing was run; add --help to the command to list the options)")
    return True
