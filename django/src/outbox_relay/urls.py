"""`path("outbox-relay/", include("outbox_relay.urls"))` serves these two endpoints."""

from django.urls import path

from . import views

app_name = "outbox_relay"

urlpatterns = [
    path("pusher/auth", views.pusher_auth, name="pusher-auth"),
    path("ably/token", views.ably_token, name="ably-token"),
]
