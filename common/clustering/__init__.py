"""Federated, differentially private Gaussian-mixture clustering.

The maths by concern (:mod:`.model`, :mod:`.statistics`, :mod:`.release`,
:mod:`.initialisation`, :mod:`.selection`, :mod:`.merge`, :mod:`.bootstrap`), the wire
messages (:mod:`.wire`), the federated EM and bootstrap state machines (:mod:`.em_machine`,
:mod:`.em_state`, :mod:`.federated_em`, :mod:`.federated_bootstrap`) and reading a released
mixture (:mod:`.released`, the package's only file I/O). Derivations: docs/clustering.md.
"""
