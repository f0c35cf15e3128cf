"""Configuration: main.cf / master.cf in Postfix's model.

Stable API used by every other part (keep it stable; extend, don't rename):

    load_config(config_dir=None) -> Config        # MAIL_CONFIG or /etc/postfix when None
    Config.get(name) -> str                       # fully $-expanded value, default if unset
    Config.raw(name) -> str | None                # unexpanded value as written (or default)
    Config.is_set(name) -> bool                   # explicitly set in main.cf or an -o override
    Config.get_int / get_bool / get_time / get_size / get_list
    Config.override({"name": "value"}) -> Config  # a copy with master.cf -o overrides
    Config.for_service(service) -> Config         # -o overrides plus $service_name
    Config.config_dir, Config.services            # services: list[MasterService]
    ConfigError(msg, file=None, line=None)
    master.listen_address(service) -> (host | None, port)
    registry.register_implemented(*names), unused_parameters(cfg),
    unimplemented_parameters(cfg)
"""

from .main import Config, ConfigError, load_config  # noqa: F401

# master.cf parsing and the parameter registry load on first use (PEP 562):
# most command-line tools read main.cf only.
_LAZY = {
    "MasterService": "master", "listen_address": "master",
    "register_implemented": "registry", "unimplemented_parameters": "registry",
    "unused_parameters": "registry",
}


def __getattr__(name: str):
    import importlib
    if name in ("master", "registry"):      # the submodules themselves, as before
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["Config", "ConfigError", "load_config", *_LAZY]


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"master", "registry"})
