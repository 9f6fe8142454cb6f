"""Index tables: remote AEs and the patient / study / series / instance hierarchy.

Names and other text are stored decoded (Unicode), whatever SpecificCharacterSet the
instance used; ``*_key`` columns hold the upper-cased form used for matching.
Counters on study and series rows are kept up to date at ingest, so C-FIND never
has to count a million instance rows.
"""

from __future__ import annotations

import peewee

database_proxy = peewee.DatabaseProxy()


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class RemoteAE(BaseModel):
    """A DICOM peer allowed to associate with the node."""

    ae_title = peewee.CharField(max_length=16, unique=True)
    host = peewee.CharField(max_length=255)
    port = peewee.IntegerField()
    #: Comma-separated services beyond C-ECHO: store, find, move, get.
    allow = peewee.CharField(max_length=64, default="")
    created_at = peewee.DoubleField()

    @property
    def allowed(self) -> frozenset[str]:
        """Services this AE may use (C-ECHO is always allowed)."""
        return frozenset(s for s in self.allow.split(",") if s)


class Patient(BaseModel):
    patient_id = peewee.CharField(max_length=64, index=True)
    issuer = peewee.CharField(max_length=64, default="")
    name = peewee.CharField(max_length=324, default="")
    name_key = peewee.CharField(max_length=324, default="", index=True)
    birth_date = peewee.CharField(max_length=8, default="", index=True)
    sex = peewee.CharField(max_length=16, default="")
    num_studies = peewee.IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


class Study(BaseModel):
    study_uid = peewee.CharField(max_length=64, unique=True)
    patient = peewee.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    #: Generated 8-character name of the study's file-set folder.
    key = peewee.CharField(max_length=8, unique=True)
    study_date = peewee.CharField(max_length=8, default="", index=True)
    study_time = peewee.CharField(max_length=16, default="")
    accession = peewee.CharField(max_length=16, default="", index=True)
    study_id = peewee.CharField(max_length=16, default="")
    description = peewee.CharField(max_length=64, default="")
    referring_physician = peewee.CharField(max_length=324, default="")
    institution = peewee.CharField(max_length=64, default="")
    charset = peewee.CharField(max_length=128, default="")
    modalities = peewee.CharField(max_length=128, default="")
    num_series = peewee.IntegerField(default=0)
    num_instances = peewee.IntegerField(default=0)
    size_bytes = peewee.BigIntegerField(default=0)
    first_received = peewee.DoubleField()
    last_received = peewee.DoubleField(index=True)
    #: ``last_received`` value the current file-set was built from (None: never built).
    fileset_built_from = peewee.DoubleField(null=True)


class Series(BaseModel):
    series_uid = peewee.CharField(max_length=64, unique=True)
    study = peewee.ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    modality = peewee.CharField(max_length=16, default="", index=True)
    series_number = peewee.CharField(max_length=12, default="")
    description = peewee.CharField(max_length=64, default="")
    body_part = peewee.CharField(max_length=16, default="")
    num_instances = peewee.IntegerField(default=0)
    size_bytes = peewee.BigIntegerField(default=0)


class Instance(BaseModel):
    sop_uid = peewee.CharField(max_length=64, unique=True)
    series = peewee.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    sop_class = peewee.CharField(max_length=64)
    instance_number = peewee.CharField(max_length=12, default="")
    transfer_syntax = peewee.CharField(max_length=64)
    #: Generated file-store key: the file's only name on disk.
    key = peewee.CharField(max_length=32, unique=True)
    size_bytes = peewee.BigIntegerField()
    received_at = peewee.DoubleField()
    source_ae = peewee.CharField(max_length=16, default="")


ALL_MODELS = [RemoteAE, Patient, Study, Series, Instance]
