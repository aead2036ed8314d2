"""Artifact store of a lineage: content-addressed objects, step manifests and head records.

Usage::

    from lethe_trainer.store import open_lineage_store, ObjectRef, StoreError

    store = open_lineage_store("s3://bucket/prefix", namespace="default", lineage="demo")
    ref = store.put_object(path, suffix=".safetensors")
    store.commit_step(step_id, {"step_id": step_id, "sequence": 1, "parent_step_id": None,
                                "objects": {"task_vector": ref.to_dict()},
                                "method": {"negation_scale": 1.0}, "request": {"name": "forget-x"}})
    store.set_head(step_id, "promote")

See ``lineage.py`` for the key layout. Importing this package never imports
torch, so the operator can read lineages without it.
"""

from lethe_trainer.store.errors import ConflictError, IntegrityError, ObjectMissingError, StoreError
from lethe_trainer.store.lineage import LineageStore, open_lineage_store
from lethe_trainer.store.objects import ObjectRef
from lethe_trainer.store.uri import EXPECTED_FORM, StoreLocation, parse_store_uri

__all__ = [
    "ConflictError",
    "EXPECTED_FORM",
    "IntegrityError",
    "LineageStore",
    "ObjectMissingError",
    "ObjectRef",
    "StoreError",
    "StoreLocation",
    "open_lineage_store",
    "parse_store_uri",
]
