"""Script configuration: a dict of defaults at the top of each script, overridden by `--key=value` or `--key value`;
nested keys joined by `_` (`{"lora": {"r": 8}}` -> `--lora_r`), values typed from the default (lists and dicts as
JSON; a default of None takes any string, `none`/`null` meaning None). `--help` lists every key with its default."""
import copy
import difflib
import json
import sys

from utils.errors import UserError, install_error_hook

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


class ConfigError(UserError, ValueError):
    pass


def slots(config: dict, prefix="") -> dict:
    """{flat key: (the dict that holds the value, its key there)}."""
    found = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found.update(slots(value, name + "_"))
        else:
            found[name] = (config, key)
    return found


def flatten(config: dict) -> dict:
    return {name: holder[key] for name, (holder, key) in slots(config).items()}


def set_flat(config: dict, flat_key: str, value):
    """Write `value` at the nested place that `flat_key` names (nowhere if it names none)."""
    holder, key = slots(config).get(flat_key, ({}, None))
    holder[key] = value


def convert(key: str, text: str, default):
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in TRUE | FALSE:
                return lowered in TRUE
            raise ValueError(f"expected one of {sorted(TRUE | FALSE)}")
        if isinstance(default, (int, float)):
            return type(default)(text)
        if isinstance(default, (list, dict)):
            value = json.loads(text)
            if not isinstance(value, type(default)):
                raise ValueError(f"expected a JSON {type(default).__name__}")
            return value
        if default is None:
            return None if text.lower() in ("none", "null") else text
        return text
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"--{key}: cannot read {text!r} as {type(default).__name__} ({err})") from err


class Config(dict):
    """A script's config: a plain dict that also knows which (flat) keys the command line set, in `given`, so that
    settings read from elsewhere (a run's train_args.json) fill in only what the user left out."""

    given = frozenset()


def apply_overrides(defaults: dict, argv, renamed=None) -> dict:
    """A copy of `defaults` with the `--key=value` / `--key value` pairs of argv applied (a Config). `renamed` maps
    old option names to their current ones: an old name still works, with a note on stderr."""
    config = Config(copy.deepcopy(defaults))
    given = set()
    renamed = renamed or {}
    flat = slots(config)
    index = 0
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value or --key value")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in renamed:
            print(f"note: --{key} is now --{renamed[key]}; the old name will be removed in the next release", file=sys.stderr)
            key = renamed[key]
        if key not in flat:
            close = difflib.get_close_matches(key, flat, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (--help lists all)")
        holder, name = flat[key]
        if not has_value:
            if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                index += 1
                text = argv[index]
            elif isinstance(holder[name], bool):
                text = "true"  # a bare boolean flag switches it on
            else:
                raise ConfigError(f"--{key} needs a value")
        holder[name] = convert(key, text, holder[name])
        given.add(key)
        index += 1
    config.given = frozenset(given)
    return config


def describe(defaults: dict) -> str:
    return "\n".join(f"  --{key}={json.dumps(value, ensure_ascii=False)}" for key, value in flatten(defaults).items())


def parse_config(defaults: dict, argv=None, description="", renamed=None) -> dict:
    """The script's config: defaults overridden by the command line (bad input exits with a message). Installs
    utils/errors.py's hook: an input error prints one line and exits 1 (`--debug`, any script's, adds the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own_debug_key = "debug" in flatten(defaults)  # a script may list it among its options
    debug = not own_debug_key and "--debug" in argv
    argv = [arg for arg in argv if own_debug_key or arg != "--debug"]
    if "-h" in argv or "--help" in argv:
        print((description.strip() + "\n\n" if description else "") + "Options (defaults shown):\n" + describe(defaults)
              + ("" if own_debug_key else "\n  --debug  (show the traceback of an error, not only its message)"))
        sys.exit(0)
    try:
        config = apply_overrides(defaults, argv, renamed)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    install_error_hook(config["debug"] if own_debug_key else debug)
    return config
