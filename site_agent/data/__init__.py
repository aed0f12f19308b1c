"""The site's data: the one reader of CSV, Parquet and SQL sources under the declared schema
(``loading``), the per-record split (``split``), the lazily loaded datasets (``datasets``),
the row cache for tables larger than memory (``row_store``) and the catalog's DP counts."""
