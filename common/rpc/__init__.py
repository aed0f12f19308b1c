"""The wire: the only package that translates domain types to protobuf (``serde``), holds the
mTLS identities (``tls``) and the gRPC settings both ends share (``transport``)."""
