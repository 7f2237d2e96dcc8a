from django.apps import AppConfig


class OutboxRelayConfig(AppConfig):
    name = "outbox_relay"
    verbose_name = "Notifications (outbox-relay)"
    default_auto_field = "django.db.models.BigAutoField"
