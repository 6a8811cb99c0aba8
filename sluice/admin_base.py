"""The base of every ModelAdmin in Sluice's platform console."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters


class SluiceModelAdmin(admin.ModelAdmin):
    def get_changelist_instance(self, request):
        # Django's date hierarchy turns ?created_at__year=... into a datetime and catches
        # ValueError but not OverflowError (a 20-digit year): make that what it is, a bad
        # lookup, which the changelist answers by redirecting to ?e=1.
        try:
            return super().get_changelist_instance(request)
        except OverflowError as exc:
            raise IncorrectLookupParameters(exc) from exc
