"""Uplinks: one interface (base.py), one module per cloud, chosen by ``broker.transport``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.config import DeviceSettings
    from runtime.transports.base import Uplink

__all__ = ["create_uplink"]


def create_uplink(settings: DeviceSettings) -> Uplink:
    """Build the configured uplink; SDK-backed modules are imported only when chosen."""
    kind = settings.broker.transport
    if kind == "mqtt":
        from runtime.transports.mqtt import MqttUplink

        return MqttUplink.from_settings(settings)
    if kind == "aws-iot":
        from runtime.transports.aws_iot import AwsIotUplink

        return AwsIotUplink.from_settings(settings)
    if kind == "greengrass":
        from runtime.transports.greengrass import GreengrassUplink

        return GreengrassUplink.from_settings(settings)
    if kind in ("azure-iot", "azure-edge"):
        from runtime.transports.azure_iot import AzureIotUplink

        return AzureIotUplink.from_settings(settings)
    if kind == "memory":
        from runtime.transports.memory import MemoryUplink

        return MemoryUplink.from_settings(settings)
    raise AssertionError(f"unknown transport {kind!r}")  # settings validation makes this unreachable
