"""A dataset's declared schema: typed tables (``table``) and the feature encoding (``encoding``)."""
