"""Admin pages: the ledger (read-only, with the dead-letter actions), the outbox,
preferences and contacts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from . import ledger
from .models import CONSENT_CHANNELS, Delivery, NotificationContact, NotificationPreference, OutboxEvent


class RecipientFilter(admin.SimpleListFilter):
    """A text box rather than a list: a ledger has as many recipients as users.

    `?recipient=42` shows one user's deliveries (the ledger keeps the recipient as text).
    """

    title = "recipient"
    parameter_name = "recipient"
    template = "admin/outbox_relay/input_filter.html"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return []

    def has_output(self) -> bool:
        return True

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(recipient=value.strip()) if value else queryset

    # Any: the template (input_filter.html) reads this filter's own keys, not a list entry's.
    def choices(self, changelist: Any) -> Iterator[Any]:
        # The form must carry the other filters and the search along.
        keep = changelist.get_filters_params()
        keep.pop(self.parameter_name, None)
        hidden = [(k, v[-1] if isinstance(v, list) else v) for k, v in keep.items()]
        if changelist.query:
            hidden.append(("q", changelist.query))
        yield {"value": self.value() or "", "hidden": hidden, "name": self.parameter_name}


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "source",
        "operation",
        "channel",
        "event",
        "recipient",
        "status",
        "attempts",
        "provider",
        "short_error",
        "committed_at",
        "sent_at",
    )
    list_filter = ("status", "channel", "event", RecipientFilter)
    # get_search_results below does the matching; a field here makes the box appear.
    search_fields = ("source_pk",)
    search_help_text = (
        "A source row: table#pk (e.g. outbox_relay_outboxevent#42, schema optional), "
        "a primary key alone, or part of a table name."
    )
    actions = ("retry_dead_letters", "discard_dead_letters")
    # count(*) over a large ledger on every page view is not worth it.
    show_full_result_count = False
    list_per_page = 50

    @admin.display(description="source row", ordering="source_pk")
    def source(self, obj: Delivery) -> str:
        return f"{obj.source_table}#{obj.source_pk}"

    @admin.display(description="last error")
    def short_error(self, obj: Delivery) -> str:
        error = obj.last_error or ""
        return error if len(error) <= 60 else error[:59] + "…"

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        table, sep, pk = term.rpartition("#")
        if sep:
            in_table = Q(source_table=table) | Q(source_table__endswith="." + table)
            return queryset.filter(in_table, source_pk=pk), False
        if term.isdigit():
            return queryset.filter(source_pk=term), False
        return queryset.filter(source_table__icontains=term), False

    # The relay owns the ledger: nothing is added, edited or deleted here.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("outbox_relay.retry_delivery")

    def has_discard_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("outbox_relay.discard_delivery")

    def _report(self, request: HttpRequest, done: int, selected: int, verb: str) -> None:
        text = f"{done} delivery(ies) {verb}"
        if selected > done:
            text += f"; {selected - done} left alone (only dead or failed deliveries can be)"
        self.message_user(request, text, messages.SUCCESS if done else messages.WARNING)

    @admin.action(
        description="Retry selected dead/failed deliveries (as `outbox-relay dead-letters retry`)",
        permissions=["retry"],
    )
    def retry_dead_letters(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        self._report(request, ledger.retry(ids), len(ids), "queued again")

    @admin.action(
        description="Discard selected dead/failed deliveries (as `outbox-relay dead-letters discard`)",
        permissions=["discard"],
    )
    def discard_dead_letters(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        self._report(request, ledger.discard(ids), len(ids), "discarded")


@admin.register(OutboxEvent)
class OutboxEventAdmin(admin.ModelAdmin):
    list_display = ("id", "event_type", "recipient", "channels", "created_at", "deliveries")
    list_filter = ("event_type",)
    list_select_related = ("recipient",)
    search_fields = ("=id", "event_type")
    raw_id_fields = ("recipient",)

    @admin.display(description="deliveries")
    def deliveries(self, obj: OutboxEvent) -> str:
        url = reverse("admin:outbox_relay_delivery_changelist")
        term = quote(f"{OutboxEvent._meta.db_table}#{obj.pk}")
        return format_html('<a href="{}?q={}">ledger</a>', url, term)

    # Adding a row here would notify its recipient, and editing one changes
    # nothing that was sent: the outbox is written by code, in transactions.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NotificationPreference)
class NotificationPreferenceAdmin(admin.ModelAdmin):
    list_display = ("recipient", "channel", "event", "enabled")
    list_filter = ("channel", "enabled")
    search_fields = ("event",)
    raw_id_fields = ("recipient",)


@admin.register(NotificationContact)
class NotificationContactAdmin(admin.ModelAdmin):
    list_display = ("user", "phone", "sms_opt_in", "whatsapp_opt_in")
    list_filter = ("sms_opt_in", "whatsapp_opt_in")
    raw_id_fields = ("user",)
    readonly_fields = tuple(f"{c}_opt_in_at" for c in CONSENT_CHANNELS)

    def save_model(self, request: HttpRequest, obj: NotificationContact, form: Any, change: bool) -> None:
        # A consent changed by staff is dated like one changed by the user.
        for channel in CONSENT_CHANNELS:
            if f"{channel}_opt_in" in form.changed_data:
                setattr(obj, f"{channel}_opt_in_at", timezone.now())
        super().save_model(request, obj, form, change)
