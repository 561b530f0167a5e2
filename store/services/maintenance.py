"""Housekeeping: delete blobs no row references (left by a process killed between writing a blob and
committing the row that points to it, or by deleted listings).

Uploads and jobs write their blob first and commit the row after, so a blob without a row is normal for
a moment; only blobs older than ``older_than`` seconds are deleted. A put of content that already exists
refreshes the blob's modification time (see BlobStore.modified), so a blob being re-used is young again."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from edgemart.core.errors import NotFoundError, UsageError
from store.context import StoreContext
from store.models import Build, ListingVersion

log = logging.getLogger("edgemart.store.maintenance")
DEFAULT_GRACE_SECONDS = 3600


@dataclass
class SweepReport:
    scanned: int = 0
    referenced: int = 0
    young: int = 0  # unreferenced but within the grace period: may belong to a request in flight
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "scanned": self.scanned,
            "referenced": self.referenced,
            "young": self.young,
            "deleted": len(self.deleted),
            "deleted_keys": self.deleted,
        }


def referenced_blobs(ctx: StoreContext) -> set[str]:
    """Every blob key a row points to."""
    refs: set[str] = set()
    with ctx.Session() as s:
        for model_blob, calibration_blob in s.execute(
            select(ListingVersion.model_blob, ListingVersion.calibration_blob)
        ):
            refs.update(k for k in (model_blob, calibration_blob) if k)
        for blob_key, html_key in s.execute(select(Build.blob_key, Build.quality_html_blob)):
            refs.update(k for k in (blob_key, html_key) if k)
    return refs


def sweep_orphan_blobs(
    ctx: StoreContext, *, older_than: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False
) -> SweepReport:
    """Delete (or with ``dry_run`` only count) unreferenced blobs older than ``older_than`` seconds."""
    if older_than < 0:
        raise UsageError("older_than must be >= 0 seconds")
    report = SweepReport()
    keys = list(ctx.blobs.list())  # listed before the references are read: a blob put after is not seen
    refs = referenced_blobs(ctx)
    cutoff = ctx.clock() - older_than
    for key in keys:
        report.scanned += 1
        if key in refs:
            report.referenced += 1
            continue
        try:
            young = ctx.blobs.modified(key) > cutoff
        except NotFoundError:
            continue
        if young:
            report.young += 1
            continue
        if not dry_run:
            ctx.blobs.delete(key)
            log.info("deleted orphan blob %s", key)
        report.deleted.append(key)
    return report
