"""Declared column schemas and what is derived from them.

``table`` applies a declared schema to a raw frame (typed, bounded columns); ``encoding`` is
the feature encoding every site of a job applies to those columns, derived by the
orchestrator from the sites' declared schemas.
"""

from common.schema.encoding import EncodedFeature, FeatureEncoding, derive_encoding

__all__ = ["EncodedFeature", "FeatureEncoding", "derive_encoding"]
