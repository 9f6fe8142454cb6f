"""The archive: what arrives over DICOM or by import, checked, indexed and queried.

:class:`~.service.ArchiveService` (the SCP's service: who may connect, C-STORE ingest
through :mod:`.ingest` and :mod:`.dataset_check`, C-FIND/C-MOVE/C-GET selection through
:mod:`.query`); :class:`~.filesets.FilesetService` (per-study DICOMDIR file-sets);
:class:`~.peers.RemotePeers` (remote AEs, audited); :class:`~.study_search.StudySearch`
(staff search); bulk import (:mod:`.importer`: candidates found by
:mod:`.import_sources`, CD names by :mod:`.dicomdir_refs`, each object checked by
:mod:`.object_check`) with its limits
(:mod:`.limits`) and
reconciliation to the hospital's patient identity (:mod:`.reconciliation`); the UID
rule for what peers send (:mod:`.uids`). See docs/architecture.md.
"""
