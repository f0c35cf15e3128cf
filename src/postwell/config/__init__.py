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
from .master import MasterService, listen_address  # noqa: F401
from .registry import (register_implemented, unimplemented_parameters,  # noqa: F401
                       unused_parameters)
