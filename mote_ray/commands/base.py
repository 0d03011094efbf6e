"""What every command shares: the `Command` model, flags derived from a config class, shared flags.

A command is a pydantic model whose fields are its flags. Fields that set a config value are copied
from the config class (`config_flags`: type, choices and help come from there, so a field added to
TrainConfig is a `mote-ray train` flag without touching this package); they default to None, which
means "not given", and `Command.layers` hands the given ones to `mote_ray.config.resolve`, the one
place where the YAML file, flags and `--set` overrides meet and are validated.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import CliImplicitFlag

ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local instance)"
RESTART_HELP = "discard what an earlier run left in --out and start over (needed when the configuration changed)"
SET_HELP = ("override any config field, e.g. mote.r=8 (value parsed as YAML; repeatable). Precedence, lowest "
            "first: defaults, --config YAML, flags, --set")
EngineChoice = Literal["auto", "vllm", "transformers"]


class Command(BaseModel):
    """Base of every command model; `run` does the work and returns the exit code."""

    model_config = ConfigDict(extra="forbid")

    def run(self) -> int:
        raise NotImplementedError

    def flags(self) -> dict[str, Any]:
        """The config flags given on the command line, keyed by their dotted config path."""
        out = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if "config_path" not in extra:
                continue
            if name in self.model_fields_set:
                out[extra["config_path"]] = getattr(self, name)
            elif "command_default" in extra:  # this command's own default for the field (generate-text: 48 tokens)
                out[extra["config_path"]] = extra["command_default"]
        return out

    def layers(self, config_cls: type[BaseModel], **extra_flags: Any):
        """The validated config: defaults < --config YAML < flags < --set (see mote_ray.config.resolve)."""
        from mote_ray.config import resolve

        return resolve(config_cls, getattr(self, "config", None), {**self.flags(), **extra_flags},
                       getattr(self, "set", []))


def _scalar(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return len(args) == 1 and _scalar(args[0])
    return annotation in (str, int, float, bool) or typing.get_origin(annotation) is Literal


def _field_at(config_cls: type[BaseModel], path: str) -> FieldInfo:
    cls = config_cls
    parts = path.split(".")
    for part in parts[:-1]:
        cls = cls.model_fields[part].annotation
    return cls.model_fields[parts[-1]]


def config_flags(config_cls: type[BaseModel], paths: dict[str, str] | None = None, help: dict[str, str] | None = None,
                 skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                 from_file: bool = True) -> dict[str, Any]:
    """Flag fields for `config_cls`: `paths` maps flag name -> dotted config path; without it every
    scalar top-level field (str, int, float, bool, Literal; nested models stay reachable by --set).
    `defaults`: this command's default for a flag where it differs from the config's. `from_file=False`
    (a command without --config / --set): a required config field is a required flag."""
    if paths is None:
        paths = {n: n for n, f in config_cls.model_fields.items() if n not in skip and _scalar(f.annotation)}
    help, defaults = help or {}, defaults or {}
    out = {}
    for name, path in paths.items():
        target = _field_at(config_cls, path)
        annotation = target.annotation
        if annotation is bool or annotation == bool | None:
            annotation = CliImplicitFlag[bool]  # default None: --x / --no-x
        else:
            annotation = annotation | None
        extra: dict[str, Any] = {"config_path": path}
        if name in defaults:
            default = extra["command_default"] = defaults[name]
        else:
            default = target.get_default(call_default_factory=True)
        text = help.get(name) or target.description or ""
        if target.is_required() and name not in defaults and not from_file:
            out[name] = (target.annotation, Field(description=text or None, json_schema_extra=extra))
            continue
        if target.is_required() and name not in defaults:
            text = f"{text} (required: here, in --config or by --set)".strip()
        elif default is not None and not isinstance(default, BaseModel):
            text = f"{text} (default: {default})".strip()
        out[name] = (annotation, Field(None, description=text or None, json_schema_extra=extra))
    return out


def app_flags(config_cls: type[BaseModel]) -> dict[str, Any]:
    """The flags of a Serve app's config (ServeConfig, ProxyConfig): every field under its own name,
    required ones required, but `loopback_only` (no flag: --host decides it, see shared.bind_policy) and
    `timeout_s`, which is `--timeout` (the flag's name before these configs existed)."""
    paths = {"timeout" if n == "timeout_s" else n: n for n in config_cls.model_fields if n != "loopback_only"}
    return config_flags(config_cls, paths, from_file=False)


def with_config_flags(base: type[Command], config_cls: type[BaseModel], **kwargs: Any) -> type[Command]:
    """`base` plus the flags `config_flags(config_cls, **kwargs)` derives (fields already on `base` win)."""
    return extend(base, config_flags(config_cls, **kwargs))


def extend(base: type[Command], fields: dict[str, Any]) -> type[Command]:
    """The command model: `base` (named `_Name`) plus `fields`, named `Name`."""
    fields = {k: v for k, v in fields.items() if k not in base.model_fields}
    return create_model(base.__name__.lstrip("_"), __base__=base, __doc__=inspect.cleandoc(base.__doc__ or ""),
                        __module__=base.__module__, **fields)


# Engine flags shared by info, generate-text, generate, anchored pairs, aligners data (EngineConfig fields).
ENGINE_FLAGS = {"model": "model", "engine": "engine", "gguf_file": "gguf_file", "device": "device",
                "max_model_len": "max_model_len"}
ENGINE_HELP = {"model": "HF id, local directory or .gguf file (default: $MOTE_MODEL, else the offline tiny model)",
               "gguf_file": "GGUF file name inside --model", "max_model_len": "context length"}


def engine_flags(prefix: str = "") -> dict[str, str]:
    return {flag: f"{prefix}{path}" for flag, path in ENGINE_FLAGS.items()}


def with_engine_flags(base: type[Command], config_cls: type[BaseModel], prefix: str = "engine.") -> type[Command]:
    return with_config_flags(base, config_cls, paths=engine_flags(prefix), help=ENGINE_HELP)


def address_field():
    return Field(None, description=ADDRESS_HELP)


def set_field(what: str, example: str, has_config: bool = True):
    text = SET_HELP.replace("config field", f"{what} field").replace("mote.r=8", example)
    return Field(default_factory=list, description=text if has_config else text.replace(" --config YAML,", ""))
