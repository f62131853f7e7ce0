"""What the front end hands the engine core and the workers: `VllmConfig.additional_config["adaspkv"]`.

vLLM starts its engine and workers in other processes; the plugin keeps no module state, so what a run
needs travels in the config: whether `--plugin adaspkv` was given, and which artifact is served.
"""

from __future__ import annotations

from typing import Any

PLUGIN_NAME = "adaspkv"
ADDITIONAL_CONFIG_KEY = "adaspkv"


def plugin_settings(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    return (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})


def enabled_in(additional_config: dict[str, Any] | None) -> bool:
    """Whether `--plugin adaspkv` (or a routed artifact) reached this process's additional_config."""
    return bool(plugin_settings(additional_config).get("enabled"))


def served_artifact_path(additional_config: dict[str, Any] | None) -> str | None:
    """The artifact the front end routed to the plugin, if any."""
    return plugin_settings(additional_config).get("artifact")


def served_model_dir(additional_config: dict[str, Any] | None) -> str | None:
    """The checkpoint the front end found for the routed artifact (its base model, or itself)."""
    return plugin_settings(additional_config).get("model_dir")


def with_settings(additional_config: dict[str, Any] | None, **settings: Any) -> dict[str, Any]:
    """A copy of additional_config with the plugin's settings updated."""
    config = dict(additional_config or {})
    config[ADDITIONAL_CONFIG_KEY] = {**plugin_settings(config), **settings}
    return config
