"""Channel authorization: a browser may listen on its own user's channel, and no other.

The relay publishes a user's events on `CHANNEL_NAME` with `{recipient}` filled
in (`private-user-42`). Pusher and Ably both ask the app's server before letting
a browser subscribe; these views answer for the logged-in user only. The
provider secret never leaves the server: the browser gets a signature for one
channel (Pusher) or a signed token request for one channel (Ably).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseForbidden, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from . import conf

# Pusher socket ids are two integers joined by a dot ("1234.1234"). Anything else
# (a ':' above all) could change the meaning of the signed string.
_SOCKET_ID = re.compile(r"[0-9]+\.[0-9]+")


def _own_channel(request: HttpRequest) -> str | None:
    user = request.user
    if not user.is_authenticated:
        return None
    return conf.channel_for(user.pk)


def pusher_signature(secret: str, socket_id: str, channel_name: str) -> str:
    """Private-channel authorization signature: HMAC-SHA256 hex of "<socket_id>:<channel_name>".

    https://pusher.com/docs/channels/library_auth_reference/auth-signatures/
    """
    message = f"{socket_id}:{channel_name}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@never_cache
@require_POST
def pusher_auth(request: HttpRequest) -> HttpResponse:
    """pusher-js `channelAuthorization.endpoint`: form fields socket_id and channel_name."""
    own = _own_channel(request)
    if own is None:
        # 403, not a redirect to the login page: pusher-js reads the status.
        return HttpResponseForbidden("log in first")
    socket_id = request.POST.get("socket_id", "")
    channel_name = request.POST.get("channel_name", "")
    if not _SOCKET_ID.fullmatch(socket_id):  # fullmatch: "$" would let a trailing newline in
        return HttpResponseBadRequest("invalid socket_id")
    if channel_name != own:
        return HttpResponseForbidden("not your channel")
    keys = conf.pusher_keys()
    return JsonResponse({"auth": f"{keys.key}:{pusher_signature(keys.secret, socket_id, channel_name)}"})


def ably_mac(secret: str, fields: dict[str, Any]) -> str:
    """MAC of a signed Ably TokenRequest.

    Base64 of HMAC-SHA256, keyed with the key secret, over keyName, ttl,
    capability, clientId, timestamp and nonce, each followed by a newline (an
    absent optional field is an empty line).
    https://ably.com/docs/api/token-request-spec
    """
    order = ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce")
    text = "".join(f"{'' if fields.get(k) is None else fields[k]}\n" for k in order)
    digest = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@never_cache
@require_http_methods(["GET", "POST"])
def ably_token(request: HttpRequest) -> HttpResponse:
    """ably-js `authUrl`: a signed TokenRequest for the user's own channel, subscribe only.

    ably-js may pass `clientId` (when the client was built with one); our own
    clients may pass `channel`. Either naming someone else is refused, and the
    capability never names another channel whatever was asked.
    """
    own = _own_channel(request)
    if own is None:
        # Ably's client library treats a 403 from authUrl as final, not as a retry.
        return HttpResponseForbidden("log in first")
    params = request.POST if request.method == "POST" else request.GET
    client_id = str(request.user.pk)
    if params.get("clientId") not in (None, "", client_id):
        return HttpResponseForbidden("not your client id")
    if params.get("channel") not in (None, "", own):
        return HttpResponseForbidden("not your channel")
    key = conf.ably_key()
    token_request: dict[str, Any] = {
        "keyName": key.key_name,
        "ttl": conf.ably_token_ttl_ms(),
        "capability": json.dumps({own: ["subscribe"]}, separators=(",", ":")),
        "clientId": client_id,
        "timestamp": int(time.time() * 1000),
        # "A cryptographically secure random string of at least 16 characters".
        "nonce": secrets.token_hex(16),
    }
    token_request["mac"] = ably_mac(key.secret, token_request)
    return JsonResponse(token_request)
