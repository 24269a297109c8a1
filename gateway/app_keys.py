"""Typed application keys: the only way handlers reach shared resources."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import KeyCache
from shared.email.tracking.notifications import SnsHttp
from shared.infra.broker import Broker
from shared.infra.db import Database
from shared.infra.settings import Settings
from shared.keys.request_rates import KeyRates
from shared.keys.usage import LastUse

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
BROKER = web.AppKey("broker", Broker)
KEY_CACHE = web.AppKey("key_cache", KeyCache)
KEY_RATES = web.AppKey("key_rates", KeyRates)
ENDPOINTS = web.AppKey("endpoints", list)
SNS_HTTP = web.AppKey("sns_http", SnsHttp)
KEY_USE = web.AppKey("key_use", LastUse)
