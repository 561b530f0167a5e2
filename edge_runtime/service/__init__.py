"""The device service: one system account owns the device dir, keys, sealed state and every decrypted
model; other local users reach it over a unix socket (peer credentials, group membership).

`wire` frames messages, `server` answers them (`edgemart device serve`), `client` is what the CLI uses,
`install` writes the account, directories and the systemd unit (`edgemart device install-service`)."""

from __future__ import annotations

DEFAULT_SOCKET = "/run/edgemart-device/device.sock"
SOCKET_ENV = "EDGEMART_DEVICE_SOCKET"
DEFAULT_USER = "edgemart-device"
DEFAULT_GROUP = "edgemart"
