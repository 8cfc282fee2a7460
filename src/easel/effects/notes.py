"""What happens to a job after it is final: its S3 upload and its webhook deliveries.

The job store settles a job once (``complete``/``fail``) and has no later update, so the
background uploader and webhook dispatcher keep their state here and :meth:`apply` lays it
over the stored record when the API shows a job. It is per process and bounded; a restart
forgets it (the images stay on disk, the ``uploaded`` event stays in the bus history).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from easel.jobs import Job

MAX_NOTES = 10_000


class JobNotes:
    def __init__(self, max_notes: int = MAX_NOTES) -> None:
        self._notes: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max = max_notes

    def update(self, job_id: str, **fields: Any) -> None:
        """Record fields of :class:`Job` for ``job_id`` (images, upload_error, webhook)."""
        note = self._notes.setdefault(job_id, {})
        note.update(fields)
        self._notes.move_to_end(job_id)
        while len(self._notes) > self._max:
            self._notes.popitem(last=False)

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._notes.get(job_id, {}))

    def apply(self, job: Job) -> Job:
        """The job with what happened after it was stored."""
        note = self._notes.get(job.id)
        return job.model_copy(update=note) if note else job
